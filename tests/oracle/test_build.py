"""The CPU probe, the flags it picks, the wheel cache, and the llama.cpp build installed here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crome.oracle.build import (
    ALL_GGML_SWITCHES,
    PROBES,
    BuildInfo,
    BuildOptions,
    IsaProbe,
    ProbeResult,
    _run_one,
    build_wheel,
    cmake_args,
    installed_build,
    plan,
    probe,
    unpack_libs,
)


@pytest.fixture(scope="module")
def probed() -> ProbeResult:
    return probe()


def _switches(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("-DGGML_"))


def test_probe_runs_every_family_and_the_baseline_of_this_machine_kind(probed):
    assert list(probed.outcomes) == [p.name for p in PROBES]
    assert set(probed.outcomes.values()) <= {"runs", "faults", "fails", "no-compiler",
                                             "skipped"}
    # Every machine crome runs on (AVX2 EPYC, AVX-512 Xeon) executes these.
    for name in ("SSE4.2", "AVX", "AVX2", "FMA", "F16C"):
        assert probed.runs(name), probed.summary()


def test_an_instruction_that_faults_is_seen_as_faulting(tmp_path):
    """A real illegal instruction (ud2), not a mock: what a missing ISA does."""
    trap = IsaProbe("TRAP", (), "__builtin_trap(); r = n;", ())
    ok = IsaProbe("PLAIN", (), "r = n + 1;", ())
    assert _run_one(trap, tmp_path, "cc") == "faults"
    assert _run_one(ok, tmp_path, "cc") == "runs"


def test_an_avx2_only_cpu_gets_an_avx2_build():
    """The probe on an emulated Haswell (QEMU user mode: AVX2, no AVX-512, no AMX), the CPU
    class of the AVX2-only EPYC machines, whatever machine runs the tests."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is needed (Debian: apt-get install qemu-user; scripts/test does)"
    emulated = probe(runner=[qemu, "-cpu", "Haswell"])
    for name in ("SSE4.2", "AVX", "AVX2", "FMA", "F16C", "BMI2"):
        assert emulated.runs(name), emulated.summary()
    assert emulated.outcomes["AVX512"] == "faults"
    assert emulated.outcomes["AMX"] == "faults"
    assert emulated.outcomes["AVX512-VNNI"] == "skipped"
    on = _switches(cmake_args(emulated))
    assert on["GGML_AVX2"] == "ON" and on["GGML_FMA"] == "ON" and on["GGML_F16C"] == "ON"
    assert on["GGML_AVX512"] == "OFF" and on["GGML_AVX512_BF16"] == "OFF"
    assert all(on[g] == "OFF" for g in on if g.startswith("GGML_AMX"))


def test_flags_follow_what_ran_and_amx_is_never_on():
    everything = ProbeResult({p.name: "runs" for p in PROBES}, "gcc")
    on = _switches(cmake_args(everything))
    assert on["GGML_NATIVE"] == "OFF"
    assert {k: v for k, v in on.items() if k.startswith("GGML_AMX")} == \
        {"GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"}
    assert on["GGML_AVX512_BF16"] == "ON" and on["GGML_AVX2"] == "ON"
    assert set(on) == {"GGML_NATIVE", *ALL_GGML_SWITCHES}

    avx2_only = ProbeResult({p.name: "runs" for p in PROBES}, "gcc")
    for name in ("AVX512", "AVX512-VBMI", "AVX512-VNNI", "AVX512-BF16", "AMX", "AVX-VNNI"):
        avx2_only.outcomes[name] = "faults"
    on = _switches(cmake_args(avx2_only))
    assert on["GGML_AVX2"] == "ON" and on["GGML_FMA"] == "ON"
    assert all(on[g] == "OFF" for g in ("GGML_AVX512", "GGML_AVX512_VNNI",
                                        "GGML_AVX512_BF16", "GGML_AVX_VNNI"))


def test_native_variant_removes_amx_and_unknown_variants_are_refused(probed):
    args = cmake_args(probed, "native")
    assert "-DGGML_NATIVE=ON" in args
    assert all("-mno-amx-tile" in a for a in args if a.startswith("-DCMAKE_C"))
    with pytest.raises(ValueError, match="unknown build variant"):
        cmake_args(probed, "fastest")


def test_key_depends_on_flags_and_a_cached_wheel_is_reused(tmp_path, probed):
    portable = plan(BuildOptions(cache_dir=str(tmp_path)), probed)
    native = plan(BuildOptions(variant="native", cache_dir=str(tmp_path)), probed)
    assert portable.key != native.key
    assert plan(BuildOptions(), probed).key == portable.key  # stable
    folder = tmp_path / portable.key
    folder.mkdir()
    wheel = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"a wheel")
    info = BuildInfo(**{**portable.__dict__, "wheel": str(wheel)})
    (folder / "build.json").write_text(json.dumps(info.__dict__))
    found = build_wheel(BuildOptions(cache_dir=str(tmp_path)), portable, log=pytest.fail)
    assert found.wheel == str(wheel) and found.key == portable.key


@pytest.mark.slow
def test_the_installed_build_is_this_machines_portable_build(probed):
    """What the README's commands installed: crome's build for this CPU, no AMX anywhere."""
    build = installed_build()
    assert build is not None, "llama-cpp-python was not installed by `crome build-llama`"
    assert build["key"] == plan(BuildOptions(), probed).key
    assert build["variant"] == "portable"
    # The library reports what it was compiled with; ask it in a child (it may crash).
    info = subprocess.run(
        [sys.executable, "-c",
         "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert "AMX" not in info, info
    for name in probed.usable:  # the widest SIMD that runs is in the build
        if name != "SSE4.2":
            assert f"{name.replace('-', '_')} = 1" in info, (name, info)


@pytest.mark.slow
def test_no_amx_instruction_in_the_native_libraries():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the libraries' code"
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    libs = sorted((Path(next(iter(spec.submodule_search_locations))) / "lib").glob("*.so"))
    assert any(lib.name.startswith("libggml-cpu") for lib in libs), libs
    for lib in libs:
        code = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)],
                              capture_output=True, text=True, check=True).stdout
        amx = [ln for ln in code.splitlines()
               if any(op in ln.split("\t")[-1].split(" ")[0] for op in
                      ("tilezero", "ldtilecfg", "tileloadd", "tdpb", "tilerelease"))]
        assert not amx, f"{lib.name}: {amx[:3]}"


@pytest.mark.slow
def test_the_avx2_build_runs_on_an_emulated_avx2_cpu(tmp_path):
    """What an AVX2-only machine would build, run there: the build for an emulated Haswell
    (cached wheel; built on first use, minutes) loads the packaged model and generates
    under QEMU's Haswell, AVX-512 and AMX absent. (About a minute of emulation.)"""
    from crome.oracle.llamacpp import packaged_model_path

    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is needed (Debian: apt-get install qemu-user; scripts/test does)"
    cpu = [qemu, "-cpu", "Haswell"]
    info = build_wheel(BuildOptions(), plan(BuildOptions(), probe(runner=cpu)), log=print)
    lib = unpack_libs(info.wheel, tmp_path)
    proc = subprocess.run(
        [*cpu, sys.executable, "-m", "crome.oracle.guard", str(packaged_model_path()),
         "--threads", "2"], capture_output=True, text=True, timeout=1200,
        env={**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "AVX2 = 1" in out["system_info"] and "AVX512" not in out["system_info"]
    assert out["text"].strip()
