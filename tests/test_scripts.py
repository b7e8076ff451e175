"""scripts/test, the one test entry point: the README's second command, and all that .ci/run runs.

Its set-up is tried for real where it can fail without installing anything: a machine with no
apt-get, and a user who is neither root nor allowed sudo (as root, the test drops to the user
``nobody`` with setpriv). The happy path, which installs and builds, is what CI runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "test"


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    assert text.index(block.group(0)) < text.index("\n## "), "the commands come first"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_two_commands_the_second_being_scripts_test():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[1] == "./scripts/test"
    assert os.access(SCRIPT, os.X_OK), "scripts/test must be executable"


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run is the README's second command and nothing more, apart from environment variables
    and moving to the repository's root."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    commands = []
    for line in code:
        for part in re.split(r"\s*&&\s*", line):
            words = shlex.split(part)
            if words[0] in ("export", "set", "cd") or re.fullmatch(r"\w+=.*", words[0]):
                continue
            commands.append(part)
    assert commands == [_readme_commands()[1]]


def _sandbox(*tools: str) -> tuple[Path, dict[str, str]]:
    """A world-readable copy of scripts/test and a PATH that holds only ``tools`` (real binaries),
    so that chromium and qemu-x86_64 are missing whatever this machine has."""
    root = Path(tempfile.mkdtemp(prefix="crome-scripts-"))
    (root / "scripts").mkdir()
    shutil.copy2(SCRIPT, root / "scripts" / "test")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id", "env", *tools):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    for path in (root, root / "scripts", bin_dir):
        path.chmod(0o755)
    return root, {"PATH": str(bin_dir), "HOME": str(root)}


def _run(root: Path, env: dict[str, str], as_nobody: bool = False) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    command = [bash, str(root / "scripts" / "test")]
    if as_nobody:
        command = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                   *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_user_without_root_or_sudo_gets_one_line_naming_the_packages():
    if shutil.which("apt-get") is None:
        pytest.fail("this test reads the apt-get branch: run it on Debian", pytrace=False)
    root, env = _sandbox("apt-get")
    try:
        as_nobody = os.geteuid() == 0
        if as_nobody and shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) is needed to drop root", pytrace=False)
        proc = _run(root, env, as_nobody=as_nobody)
    finally:
        shutil.rmtree(root)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "neither root nor allowed sudo" in lines[0]
    assert "sudo apt-get install -y chromium qemu-user cmake g++" in lines[0]
    assert proc.stdout == ""


def test_a_machine_without_apt_get_gets_one_line_naming_the_packages():
    root, env = _sandbox()
    try:
        proc = _run(root, env)
    finally:
        shutil.rmtree(root)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "chromium qemu-user cmake g++" in lines[0] and "no apt-get" in lines[0]
