"""A llama.cpp build that runs on the machine it lands on: CPU probe, flags, cached wheel.

pip's default build of ``llama-cpp-python`` compiles with ``-march=native``, which turns on
every instruction set the CPU *advertises*. Some virtual machines advertise AMX and fault on
it (SIGILL in ``libggml-cpu.so`` at the first matrix multiply). So crome never trusts the
flags: :func:`probe` compiles one tiny program per instruction-set family and runs it; what
ran is what the build may use, and AMX is never enabled (it is probed only to report it).

:func:`build_wheel` builds the pinned sdist with ``GGML_NATIVE=OFF`` and explicit
``GGML_<ISA>`` switches into a wheel cached under ``~/.cache/crome/llama-wheels/<key>``, where
the key covers the version, the CMake arguments, the compiler and the Python tag: a second
virtual environment on the same machine installs it in seconds. pip's own wheel cache is
bypassed, since it keys by source only and would hand back a ``-march=native`` build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crome.oracle.cache import crome_cache_dir

LLAMA_CPP_VERSION = "0.3.36"
VARIANTS = ("portable", "native")
REBUILD_COMMAND = "crome build-llama --force"


@dataclass(frozen=True)
class IsaProbe:
    """One instruction-set family: the GCC flags, a program that executes it, and the GGML
    switches it allows."""

    name: str
    cflags: tuple[str, ...]
    body: str  # C statements; ``n`` (an int from argv) keeps the compiler from folding them
    ggml: tuple[str, ...]
    requires: tuple[str, ...] = ()
    includes: str = "#include <immintrin.h>"


_AVX512_FLAGS = ("-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw")

PROBES: tuple[IsaProbe, ...] = (
    IsaProbe("SSE4.2", ("-msse4.2",),
             "r = _mm_crc32_u32((unsigned)n, 7u);", ("GGML_SSE42",)),
    IsaProbe("AVX", ("-mavx",),
             "__m256 a = _mm256_set1_ps((float)n); a = _mm256_add_ps(a, a);"
             " r = (int)_mm256_cvtss_f32(a);", ("GGML_AVX",), ("SSE4.2",)),
    IsaProbe("AVX2", ("-mavx2",),
             "__m256i a = _mm256_set1_epi32(n); a = _mm256_add_epi32(a, a);"
             " r = _mm256_extract_epi32(a, 3);", ("GGML_AVX2",), ("AVX",)),
    IsaProbe("FMA", ("-mfma",),
             "__m256 a = _mm256_set1_ps((float)n); a = _mm256_fmadd_ps(a, a, a);"
             " r = (int)_mm256_cvtss_f32(a);", ("GGML_FMA",), ("AVX",)),
    IsaProbe("F16C", ("-mf16c",),
             "__m128i h = _mm_set1_epi16((short)(0x3c00 + n)); __m256 a = _mm256_cvtph_ps(h);"
             " r = (int)_mm256_cvtss_f32(a);", ("GGML_F16C",), ("AVX",)),
    IsaProbe("BMI2", ("-mbmi2",),
             "r = (int)_pdep_u64((unsigned long long)n, 0xF0F0ull);", ("GGML_BMI2",)),
    IsaProbe("AVX-VNNI", ("-mavx2", "-mavxvnni"),
             "__m256i a = _mm256_set1_epi32(n);"
             " a = _mm256_dpbusd_avx_epi32(a, a, a); r = _mm256_extract_epi32(a, 1);",
             ("GGML_AVX_VNNI",), ("AVX2",)),
    IsaProbe("AVX512", _AVX512_FLAGS,
             "__m512i a = _mm512_set1_epi8((char)n); a = _mm512_add_epi8(a, a);"
             " a = _mm512_conflict_epi32(a); __m512d d = _mm512_and_pd(_mm512_set1_pd(n),"
             " _mm512_set1_pd(3.0)); __m256i v = _mm256_maskz_add_epi32(0x5, "
             "_mm256_set1_epi32(n), _mm256_set1_epi32(2));"
             " r = _mm512_reduce_add_epi32(a) + (int)_mm512_reduce_add_pd(d)"
             " + _mm256_extract_epi32(v, 0);", ("GGML_AVX512",), ("AVX2", "FMA", "F16C")),
    IsaProbe("AVX512-VBMI", (*_AVX512_FLAGS, "-mavx512vbmi"),
             "__m512i a = _mm512_set1_epi8((char)n);"
             " a = _mm512_permutexvar_epi8(a, a); r = _mm512_reduce_add_epi32(a);",
             ("GGML_AVX512_VBMI",), ("AVX512",)),
    IsaProbe("AVX512-VNNI", (*_AVX512_FLAGS, "-mavx512vnni"),
             "__m512i a = _mm512_set1_epi32(n);"
             " a = _mm512_dpbusd_epi32(a, a, a); r = _mm512_reduce_add_epi32(a);",
             ("GGML_AVX512_VNNI",), ("AVX512",)),
    IsaProbe("AVX512-BF16", (*_AVX512_FLAGS, "-mavx512bf16"),
             "__m512 a = _mm512_set1_ps((float)n); __m512bh b = _mm512_cvtne2ps_pbh(a, a);"
             " a = _mm512_dpbf16_ps(a, b, b); r = (int)_mm512_reduce_add_ps(a);",
             ("GGML_AVX512_BF16",), ("AVX512",)),
    # Probed to be reported, never enabled: on some VMs it is advertised and faults.
    IsaProbe("AMX", ("-mamx-tile",),
             "struct { unsigned char palette, start; unsigned char pad[14];"
             " unsigned short colsb[16]; unsigned char rows[16]; } __attribute__((aligned(64)))"
             " cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1; cfg.colsb[0] = 64;"
             " cfg.rows[0] = 16; syscall(SYS_arch_prctl, 0x1023, 18);"
             " _tile_loadconfig(&cfg); _tile_zero(0); _tile_release(); r = n;", (),
             includes="#include <immintrin.h>\n#include <string.h>\n#include <unistd.h>\n"
                      "#include <sys/syscall.h>"),
)
NEVER_ENABLED = ("AMX",)
ALL_GGML_SWITCHES = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C",
                     "GGML_BMI2", "GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI",
                     "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AMX_TILE", "GGML_AMX_INT8",
                     "GGML_AMX_BF16")


@dataclass
class ProbeResult:
    """What each instruction-set family did when executed: ``runs``, ``faults`` (killed by
    a signal, e.g. SIGILL), ``fails`` (ran and exited non-zero), ``no-compiler`` (the
    compiler cannot emit it) or ``skipped`` (a family it needs does not run)."""

    outcomes: dict[str, str] = field(default_factory=dict)
    compiler: str = ""

    def runs(self, name: str) -> bool:
        return self.outcomes.get(name) == "runs"

    @property
    def usable(self) -> list[str]:
        return [p.name for p in PROBES if self.runs(p.name) and p.name not in NEVER_ENABLED]

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.outcomes.items())


def compiler_id(cc: str = "cc") -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else ""


def _run_one(probe: IsaProbe, folder: Path, cc: str, runner: Sequence[str] = ()) -> str:
    src = folder / f"{probe.name}.c"
    exe = folder / probe.name
    src.write_text(f"{probe.includes}\n#include <stdio.h>\n#include <stdlib.h>\n"
                   f"int main(int argc, char **argv) {{ int n = argc > 1 ? atoi(argv[1]) : 1;"
                   f" volatile int r = 0; {probe.body} printf(\"%d\\n\", (int)r);"
                   f" return 0; }}\n")
    comp = subprocess.run([cc, "-O1", *probe.cflags, str(src), "-o", str(exe)],
                          capture_output=True, timeout=120)
    if comp.returncode != 0:
        return "no-compiler"
    try:
        run = subprocess.run([*runner, str(exe), "3"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "faults"
    if run.returncode < 0 or run.returncode >= 128:  # a signal (re-raised by an emulator)
        return "faults"
    return "runs" if run.returncode == 0 else "fails"


def probe(cc: str | None = None, runner: Sequence[str] = ()) -> ProbeResult:
    """Compile and run one program per instruction-set family (a few seconds in all).

    ``runner`` prefixes each run, e.g. ``["qemu-x86_64", "-cpu", "Haswell"]`` to see what an
    AVX2-only CPU would choose (the tests do)."""
    cc = cc or os.environ.get("CC") or "cc"
    result = ProbeResult(compiler=compiler_id(cc))
    if not result.compiler:
        raise OSError(f"no C compiler ({cc}): llama.cpp is built from source; "
                      "install gcc (Debian: apt-get install build-essential)")
    with tempfile.TemporaryDirectory(prefix="crome-isa-") as tmp:
        for p in PROBES:
            if any(not result.runs(dep) for dep in p.requires):
                result.outcomes[p.name] = "skipped"
                continue
            result.outcomes[p.name] = _run_one(p, Path(tmp), cc, runner)
    return result


_AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_args(result: ProbeResult, variant: str = "portable") -> list[str]:
    """The CMake arguments of a build: ``portable`` switches on exactly the families that ran
    (never AMX); ``native`` is ``-march=native`` with AMX removed, the fastest build that can
    run here, kept as the benchmark's yardstick."""
    if variant == "native":
        return ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={_AMX_OFF}",
                f"-DCMAKE_CXX_FLAGS={_AMX_OFF}"]
    if variant != "portable":
        raise ValueError(f"unknown build variant {variant!r}; use one of: {', '.join(VARIANTS)}")
    on = {g for p in PROBES if p.name in result.usable for g in p.ggml}
    return ["-DGGML_NATIVE=OFF", *(f"-D{g}={'ON' if g in on else 'OFF'}"
                                   for g in ALL_GGML_SWITCHES)]


@dataclass
class BuildOptions:
    variant: str = "portable"
    version: str = LLAMA_CPP_VERSION
    force: bool = False  # rebuild even if a cached wheel exists
    jobs: int | None = None  # parallel compile jobs (None: all cores)
    cache_dir: str | None = None  # None: $CROME_WHEELS or ~/.cache/crome/llama-wheels


@dataclass
class BuildInfo:
    """What is recorded beside a cached wheel (``build.json``)."""

    version: str
    variant: str
    cmake_args: list[str]
    compiler: str
    python_tag: str
    probe: dict[str, str]
    key: str
    wheel: str = ""
    build_seconds: float = 0.0


def wheels_dir(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("CROME_WHEELS")
    if env:
        return Path(env)
    return crome_cache_dir() / "llama-wheels"


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{sysconfig.get_platform()}"


def plan(options: BuildOptions, result: ProbeResult | None = None) -> BuildInfo:
    """The build a machine gets: probe, CMake arguments and the cache key."""
    result = result or probe()
    args = cmake_args(result, options.variant)
    tag = _python_tag()
    key = hashlib.sha256(json.dumps([options.version, args, result.compiler, tag]).encode()
                         ).hexdigest()[:16]
    return BuildInfo(version=options.version, variant=options.variant, cmake_args=args,
                     compiler=result.compiler, python_tag=tag, probe=dict(result.outcomes),
                     key=key)


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def build_wheel(options: BuildOptions, info: BuildInfo | None = None,
                log: Callable[[str], None] = print) -> BuildInfo:
    """The cached wheel for this machine's build, building it if needed (4-10 min on 2
    cores; a failed build leaves its log in a ``<key>.*`` folder beside the cache entries)."""
    info = info or plan(options)
    folder = wheels_dir(options.cache_dir) / info.key
    record = folder / "build.json"
    if record.is_file() and not options.force:
        cached = BuildInfo(**json.loads(record.read_text()))
        if Path(cached.wheel).is_file():
            return cached
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{info.key}.", dir=folder.parent))
    env = dict(os.environ, CMAKE_ARGS=shlex.join(info.cmake_args),
               CMAKE_BUILD_PARALLEL_LEVEL=str(options.jobs or os.cpu_count() or 1))
    log(f"building llama-cpp-python {info.version} ({info.variant}) with "
        f"{shlex.join(info.cmake_args)}; 4-10 min on 2 cores")
    t0 = time.perf_counter()
    logfile = tmp / "build.log"
    with logfile.open("w") as out:
        proc = subprocess.run(_pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary",
                                   "llama-cpp-python", "-w", str(tmp),
                                   f"llama-cpp-python=={info.version}"),
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise OSError(f"building llama-cpp-python failed (exit {proc.returncode}); log: "
                      f"{logfile}\n" + "\n".join(tail))
    wheels = sorted(tmp.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise OSError(f"building llama-cpp-python left {len(wheels)} wheels in {tmp}")
    info.build_seconds = round(time.perf_counter() - t0, 1)
    os.replace(tmp, folder)  # whole or not at all: a killed build leaves no cache entry
    info.wheel = str(folder / wheels[0].name)
    record.write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info


def unpack_libs(wheel: str | os.PathLike[str], into: Path) -> Path:
    """The wheel's native libraries, unpacked to ``into``: a folder to point
    ``LLAMA_CPP_LIB_PATH`` at, to load that build without installing it."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("llama_cpp/lib/"):
                z.extract(name, into)
    return into / "llama_cpp" / "lib"


def installed_build() -> dict[str, object] | None:
    """The ``build.json`` of the llama-cpp-python installed here by crome, if any."""
    pkg = package_dir()
    if pkg is None:
        return None
    marker = pkg / "crome-build.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def package_dir() -> Path | None:
    """The installed ``llama_cpp`` package folder, found without importing it (importing it
    loads the native library, which is what may crash)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def install(options: BuildOptions, log: Callable[[str], None] = print,
            extras: Sequence[str] = ("server",)) -> BuildInfo:
    """Build (or reuse) the wheel and install it, with its server extras, in this Python.

    Nothing is reinstalled when the installed build already has the planned key."""
    info = plan(options)
    current = installed_build()
    if current and current.get("key") == info.key and not options.force:
        log(f"llama-cpp-python {info.version} ({info.variant}, build {info.key}) is installed")
        return BuildInfo(**current)  # type: ignore[arg-type]
    info = build_wheel(options, info, log)
    spec = f"{info.wheel}[{','.join(extras)}]" if extras else info.wheel
    log(f"installing {Path(info.wheel).name} (build {info.key})")
    for args in (("--force-reinstall", "--no-deps", info.wheel),
                 (spec,)):  # the wheel, then its extras' dependencies
        if subprocess.run(_pip("install", "-q", *args)).returncode != 0:
            raise OSError(f"pip could not install {' '.join(args)} (its output is above)")
    target = package_dir()
    if target is None:
        raise OSError("llama-cpp-python was installed but cannot be found")
    (target / "crome-build.json").write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info


# -- llama.cpp's own server ------------------------------------------------------------------

SERVER_BINARY = "llama-server"
# The server alone: no web UI (nothing to fetch), no HTTPS (it serves loopback), one static
# binary that does not depend on the wheel's shared libraries.
SERVER_CMAKE_ARGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                     "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
                     "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release"]


def server_dir(options: BuildOptions, info: BuildInfo) -> Path:
    return wheels_dir(options.cache_dir) / f"{info.key}-server"


def server_binary(options: BuildOptions | None = None,
                  info: BuildInfo | None = None) -> Path | None:
    """The cached ``llama-server`` built for this machine, or None if it is not built."""
    options = options or BuildOptions()
    binary = server_dir(options, info or plan(options)) / SERVER_BINARY
    return binary if binary.is_file() else None


def build_server(options: BuildOptions, info: BuildInfo | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """llama.cpp's own ``llama-server`` (continuous batching over ``-np`` slots, n-gram
    speculative decoding), built from the llama.cpp vendored in the same pinned sdist with the
    same CMake arguments as the wheel (so the same probe decides its instruction sets), and
    cached as ``<key>-server/llama-server`` beside the wheels. 5-10 min on 2 cores."""
    import tarfile

    info = info or plan(options)
    folder = server_dir(options, info)
    if (folder / SERVER_BINARY).is_file() and not options.force:
        return folder / SERVER_BINARY
    if shutil.which("cmake") is None:
        raise OSError("building llama-server needs cmake: apt-get install cmake (or pip "
                      "install cmake)")
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{info.key}-server.", dir=folder.parent))
    logfile = tmp / "build.log"
    args = [*info.cmake_args, *SERVER_CMAKE_ARGS]
    log(f"building llama-server from llama-cpp-python {info.version}'s sdist with "
        f"{shlex.join(args)}; 5-10 min on 2 cores")
    t0 = time.perf_counter()
    jobs = str(options.jobs or os.cpu_count() or 1)
    with logfile.open("w") as out:
        def step(cmd: list[str]) -> None:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
            if code != 0:
                out.flush()
                tail = logfile.read_text(errors="replace").splitlines()[-15:]
                raise OSError(f"building llama-server failed (exit {code}) at "
                              f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''}; log: {logfile}\n"
                              + "\n".join(tail))

        step(_pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
                  f"llama-cpp-python=={info.version}"))
        (sdist,) = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data")
        (source,) = sorted((tmp / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
        step(["cmake", "-S", str(source), "-B", str(tmp / "build"), *args])
        step(["cmake", "--build", str(tmp / "build"), "--target", SERVER_BINARY,
              "-j", jobs])
    built = tmp / "build" / "bin" / SERVER_BINARY
    if not built.is_file():
        raise OSError(f"building llama-server left no {built}; log: {logfile}")
    staged = tmp / "out"
    staged.mkdir()
    shutil.copy2(built, staged / SERVER_BINARY)
    shutil.copy2(logfile, staged / "build.log")
    record = {**asdict(info), "binary": SERVER_BINARY,
              "build_seconds": round(time.perf_counter() - t0, 1)}
    (staged / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staged, folder)  # whole or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / SERVER_BINARY
