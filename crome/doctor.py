"""``crome doctor``: what this machine has for crome, what is missing, and how to fix it.

Every check is measured, not read off a label: bf16 by a timed matmul, the CPU's instruction
sets by running them (:mod:`crome.oracle.build`), llama.cpp by loading the model in a child
process (:mod:`crome.oracle.guard`). A check is ``ok``, ``warn`` (crome runs, something is
slow or optional) or ``fail`` (the main job cannot run); every non-ok check says its fix.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_GB = 5.0  # the oracle model (1.1 GB), a llama.cpp build and the runs
PINNED_TORCH = "2.13.0"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


@dataclass
class DoctorOptions:
    data_dir: str | None = None
    native_check: bool = True  # load the oracle model in a child process (seconds, cached)
    recheck: bool = False  # ignore the cached llama.cpp check


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers ("AMD EPYC (family 26 model
    2)"): a VM's name alone can hide which generation it is, and the figures differ by it."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    return fields["model name"]


def check_python() -> list[Check]:
    checks = [Check("python", OK if sys.version_info >= (3, 11) else FAIL,
                    f"{platform.python_version()} ({sys.executable})",
                    "" if sys.version_info >= (3, 11) else "use Python 3.11 or newer")]
    torch_v = _version("torch")
    if torch_v is None:
        checks.append(Check("torch", FAIL, "not installed", "pip install -e ."))
    else:
        pinned = torch_v.split("+")[0] == PINNED_TORCH
        checks.append(Check("torch", OK if pinned else WARN, torch_v,
                            "" if pinned else f"crome is tested on torch=={PINNED_TORCH} "
                            f"(CPU build): pip install torch=={PINNED_TORCH}"))
    tf = _version("transformers")
    checks.append(Check("transformers", OK if tf else FAIL, tf or "not installed",
                        "" if tf else "pip install -e ."))
    return checks


def check_threads() -> Check:
    import torch

    cores = os.cpu_count() or 1
    n = torch.get_num_threads()
    return Check("threads", OK if n <= cores else WARN,
                 f"torch {n}, CPU cores {cores}"
                 + (f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
                    if "OMP_NUM_THREADS" in os.environ else ""),
                 "" if n <= cores else "set OMP_NUM_THREADS to the core count")


def check_bf16() -> Check:
    import torch

    from crome.score import bf16_speed

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return Check("bf16 autocast", OK, f"CUDA, bf16 {'native' if ok else 'not supported'}")
    s = bf16_speed()
    kind = "native" if s.native else "emulated"
    return Check("bf16 autocast", OK if s.native else WARN,
                 f"{kind}: a bf16 matmul takes {s.ratio:.2f}x the fp32 time; training "
                 f"--bf16 auto = {'bf16' if s.native else 'fp32'}",
                 "" if s.native else "nothing to do: auto trains in fp32 here; "
                 "--bf16 would be slower")


def check_cpu() -> Check:
    from crome.oracle.build import NEVER_ENABLED, probe

    try:
        result = probe()
    except OSError as e:
        return Check("cpu", FAIL, f"{cpu_name()}; {e}", "apt-get install build-essential")
    faults = [k for k, v in result.outcomes.items() if v == "faults"]
    never = [k for k in NEVER_ENABLED if k in result.outcomes]
    detail = (f"{cpu_name()}; runs: {' '.join(result.usable) or 'none'}"
              + (f"; faults: {' '.join(faults)}" if faults else "")
              + (f"; never used by crome's llama.cpp build: {' '.join(never)} "
                 f"({', '.join(result.outcomes[k] for k in never)})" if never else ""))
    return Check("cpu", OK, detail)


def check_llama(options: DoctorOptions, model: Path | None) -> list[Check]:
    from crome.oracle.build import REBUILD_COMMAND, installed_build
    from crome.oracle.guard import check_native, features_of, library_dir

    version = _version("llama-cpp-python")
    if version is None or library_dir() is None:
        return [Check("llama.cpp build", FAIL, "llama-cpp-python is not installed",
                      "crome build-llama")]
    build = installed_build()
    origin = (f"crome build {build.get('key')} ({build.get('variant')})" if build
              else "not built by crome (pip's -march=native build?)")
    rows = [Check("llama.cpp build", OK if build else WARN, f"llama-cpp-python {version}, "
                  f"{origin}", "" if build else REBUILD_COMMAND)]
    if not options.native_check:
        return rows
    if model is None:
        rows.append(Check("llama.cpp runs", FAIL, "no model to check it with",
                          "see the oracle model row"))
        return rows
    result = check_native(model, use_cache=not options.recheck)
    if not result.ok:
        rows.append(Check("llama.cpp runs", FAIL, f"the native library {result.reason}",
                          REBUILD_COMMAND))
        return rows
    feats = features_of(result.system_info)
    amx = [f for f in feats if f.startswith("AMX")]
    rows[0].detail += f"; features: {' '.join(feats)}"
    if amx:
        rows[0].status = WARN
        rows[0].fix = (f"this build has {' '.join(amx)}, which faults on some VMs that "
                       f"advertise it: {REBUILD_COMMAND}")
    rows.append(Check("llama.cpp runs", OK,
                      f"loaded {model.name} and generated {result.text!r} in a child "
                      f"process ({'cached' if result.cached else f'{result.seconds:.1f} s'})"))
    return rows


def check_oracle_model() -> tuple[Check, Path | None]:
    from crome.oracle.llamacpp import ModelAssemblyError, packaged_model_path

    try:
        path = packaged_model_path()  # assembles once (as first use would), checks sha256
    except ModelAssemblyError as e:
        return Check("oracle model", FAIL, str(e).splitlines()[0],
                     "pip install -e '.[oracle]'"), None
    size = path.stat().st_size / 1e9
    return Check("oracle model", OK, f"{path} ({size:.2f} GB), sha256 ok"), path


def check_backbone() -> Check:
    try:
        from transformers import AutoConfig

        from crome.backbones import default_backbone

        path = default_backbone()
        config = AutoConfig.from_pretrained(path)
    except (ImportError, OSError, ValueError) as e:
        return Check("backbone", FAIL, f"packaged MiniLM not loadable: {e}"[:200],
                     "pip install -e .")
    return Check("backbone", OK, f"{config.model_type}, {config.num_hidden_layers} layers, "
                 f"{path}")


def _count_lines(path: Path) -> int:
    from crome.data.io import open_maybe_gz

    with open_maybe_gz(path) as fh:
        return sum(1 for line in fh if line.strip())


# Files no named source reads, counted as records (one JSON object a line).
EXTRA_FILES = ("gsm8k/train.jsonl", "gsm8k/example_model_solutions.jsonl",
               "humaneval/HumanEval.jsonl.gz")


def check_data(options: DoctorOptions) -> list[Check]:
    from crome.data.sources import SOURCES, DataDirError, load_source, resolve_data_dir

    try:
        root = resolve_data_dir(options.data_dir)
    except DataDirError as e:
        return [Check("data folder", FAIL, str(e).splitlines()[0],
                      "--data-dir PATH or CROME_DATA=PATH (the layout: crome sources)")]
    rows = [Check("data folder", OK, str(root))]
    for name in SOURCES:
        try:
            res = load_source(name, data_dir=root)
        except (OSError, ValueError) as e:
            rows.append(Check(f"data: {name}", FAIL, str(e).splitlines()[0],
                              f"restore {name} under {root}"))
            continue
        skipped = sum(res.skipped.values())
        rows.append(Check(f"data: {name}", OK if res.records else FAIL,
                          f"{len(res.records)} pairs" + (f", {skipped} skipped at load"
                                                          if skipped else ""),
                          "" if res.records else f"restore {name} under {root}"))
    for rel in EXTRA_FILES:
        path = root / rel
        if path.is_file():
            rows.append(Check(f"data: {rel}", OK, f"{_count_lines(path)} records"))
        else:
            rows.append(Check(f"data: {rel}", WARN, "missing (not used by the main job)",
                              f"put {rel} under {root}"))
    return rows


def check_chromium() -> Check:
    exe = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                               "google-chrome")) if p), None)
    if exe is None:
        return Check("chromium", WARN, "not found (only the report's browser test needs it)",
                     "apt-get install chromium")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        version = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("chromium", WARN, f"{exe} does not run: {e}", "apt-get install chromium")
    return Check("chromium", OK, f"{version} ({exe})")


def check_disk() -> Check:
    from crome.oracle.llamacpp import models_dir

    places = {"working dir": Path.cwd(), "cache": models_dir()}
    parts, worst = [], float("inf")
    for label, place in places.items():
        while not place.exists():
            place = place.parent
        free = shutil.disk_usage(place).free / 1e9
        worst = min(worst, free)
        parts.append(f"{label} {free:.1f} GB free")
    ok = worst >= MIN_FREE_GB
    return Check("disk", OK if ok else FAIL, ", ".join(parts),
                 "" if ok else f"free at least {MIN_FREE_GB:.0f} GB")


def check_oracle_auto() -> Check:
    """What ``--oracle auto`` picked on this machine and build, with the probe's figures;
    the probe itself runs on the first use (it loads both backends: about a minute)."""
    from crome.oracle.auto import cached_choice

    try:
        choice = cached_choice()
    except Exception as exc:  # noqa: BLE001 -- torch or transformers missing: other rows say so
        return Check("oracle auto", WARN, f"cannot tell: {exc}")
    if choice is None:
        return Check("oracle auto", OK, "not probed yet on this machine and build: the first "
                     "--oracle auto run probes llama.cpp (and transformers where bf16 is fast) "
                     "and keeps the pick")
    return Check("oracle auto", OK, choice.summary())


def run_checks(options: DoctorOptions | None = None) -> list[Check]:
    """Every check, in the table's order."""
    opts = options or DoctorOptions()
    model_check, model = check_oracle_model()
    return [*check_python(), check_threads(), check_bf16(), check_cpu(),
            *check_llama(opts, model), model_check, check_oracle_auto(), check_backbone(),
            *check_data(opts),
            check_chromium(), check_disk()]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def print_report(checks: list[Check]) -> None:
    """The table, then one ``STATUS NAME: fix: …`` line per row that has a fix, then the
    verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table("check", "status", "detail", title="crome doctor")
    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    for c in checks:
        table.add_row(escape(c.name), f"[{colour[c.status]}]{c.status}[/]", escape(c.detail))
    console.print(table)
    for c in checks:
        if c.fix:
            console.print(f"{c.status} {c.name}: fix: {c.fix}", markup=False, highlight=False)
    console.print("the main job can run here" if exit_code(checks) == 0 else
                  "something the main job needs is missing (the fail rows above)")
