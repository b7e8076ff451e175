"""Prompt and decode tokens/s of llama.cpp builds, side by side, on the packaged oracle model.

The builds come from crome's wheel cache (``crome build-llama --wheel-only``): ``portable``,
what the README installs (the instruction sets a probe ran, never AMX), and ``native``
(``-march=native`` minus AMX: the fastest build that can run here), plus any ``--wheel``
(for example pip's own ``-march=native`` build, AMX included). Each build's libraries are
unpacked and loaded through ``LLAMA_CPP_LIB_PATH`` in a child process: first the crash guard
(does it run at all?), then rounds that alternate between builds so that drift in the
machine's speed hits all of them alike. A round loads the model and times a prompt of
``--prompt-tokens`` and ``--decode-tokens`` greedy tokens with llama.cpp's own counters;
ratios to the first build carry a paired bootstrap 95% CI over rounds.

    python benchmarks/llama_build.py                       # portable vs native, 5 rounds
    python benchmarks/llama_build.py --wheel pip=PATH.whl  # and another build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (offline env, importable checkout)
import numpy as np

from crome.doctor import cpu_name
from crome.oracle.build import BuildOptions, build_wheel, plan, probe, unpack_libs
from crome.oracle.guard import check_native
from crome.oracle.llamacpp import packaged_model_path

TEXT = ("Human: My tomato plants have yellow leaves at the bottom and brown spots. I water "
        "them every morning and they get six hours of sun. What is going on and what should "
        "I do about it this week? Assistant: ")


def child(model: str, threads: int, prompt_tokens: int, decode_tokens: int,
          reps: int) -> None:
    """One build, in its own process: the best of ``reps`` timed completions."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=prompt_tokens + decode_tokens + 64,
                          n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    ids = llm.tokenize(TEXT.encode())
    ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    prompt = llm.detokenize(ids).decode(errors="ignore")
    runs = []
    for i in range(reps + 1):  # the first one warms the caches and is not counted
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.create_completion(prompt, max_tokens=decode_tokens, temperature=0.0,
                              logit_bias={llm.token_eos(): -100.0})
        p = llama_cpp.llama_perf_context(llm.ctx)
        if i:
            runs.append({"prompt_tps": 1000 * p.n_p_eval / p.t_p_eval_ms,
                         "decode_tps": 1000 * p.n_eval / p.t_eval_ms,
                         "n_prompt": p.n_p_eval, "n_decode": p.n_eval})
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    print(json.dumps({"runs": runs, "system_info": info}), flush=True)


def paired_ratio(runs: list[dict], ref_runs: list[dict], key: str, rounds: int,
                 resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``key`` over rounds divided by the reference's, with a percentile bootstrap
    95% CI that resamples rounds (a round's machine state is shared by both builds)."""
    def per_round(rs: list[dict]) -> np.ndarray:
        return np.array([np.mean([x[key] for x in rs if x["round"] == r])
                         for r in range(rounds)])

    a, b = per_round(runs), per_round(ref_runs)
    idx = np.random.default_rng(seed).integers(0, rounds, size=(resamples, rounds))
    boot = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(a.mean() / b.mean()), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=None,
                    help="crome build variants (default: portable native); built if missing")
    ap.add_argument("--wheel", action="append", default=[], metavar="LABEL=PATH",
                    help="another llama-cpp-python 0.3.x wheel to measure")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="timed completions per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-tokens", type=int, default=240)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/bench/llama_build.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads, args.prompt_tokens, args.decode_tokens, args.reps)
        return

    model = packaged_model_path()
    result = probe()
    wheels: dict[str, Path] = {}
    for variant in args.variant or ["portable", "native"]:
        opts = BuildOptions(variant=variant)
        wheels[variant] = Path(build_wheel(opts, plan(opts, result)).wheel)
    for spec in args.wheel:
        label, _, path = spec.partition("=")
        wheels[label] = Path(path)

    machine = {"cpu": cpu_name(), "probe": result.summary(), "threads": args.threads,
               "python": platform.python_version()}
    print(f"CPU: {machine['cpu']}; probe: {machine['probe']}; {args.threads} threads")
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="crome-llama-builds-") as tmp:
        libs = {label: unpack_libs(w, Path(tmp) / label) for label, w in wheels.items()}
        runnable = []
        for label, lib in libs.items():
            os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
            check = check_native(model, use_cache=False, threads=args.threads)
            report[label] = {"wheel": str(wheels[label]), "runs": [], "ok": check.ok,
                             "reason": check.reason, "features": check.features}
            print(f"{label}: {'runs' if check.ok else check.reason}; "
                  f"features {' '.join(check.features)}")
            if check.ok:
                runnable.append(label)
        for r in range(args.rounds):
            for label in runnable:
                env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(libs[label])}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(model), "--threads",
                     str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                     "--decode-tokens", str(args.decode_tokens), "--reps", str(args.reps)],
                    capture_output=True, text=True, env=env, check=True)
                runs = json.loads(out.stdout.strip().splitlines()[-1])["runs"]
                report[label]["runs"] += [{**x, "round": r} for x in runs]
                print(f"round {r + 1} {label}: " + ", ".join(
                    f"prompt {x['prompt_tps']:.1f} tok/s, decode {x['decode_tps']:.1f} tok/s"
                    for x in runs), flush=True)
    for label in runnable:
        runs = report[label]["runs"]
        report[label]["prompt_tps"] = statistics.median(x["prompt_tps"] for x in runs)
        report[label]["decode_tps"] = statistics.median(x["decode_tps"] for x in runs)
    if runnable:
        ref = runnable[0]
        print(f"\nratios to {ref}: mean over rounds, paired bootstrap 95% CI over the "
              f"{args.rounds} rounds (each round ran every build once, back to back)")
        print("\n| build | prompt tok/s | decode tok/s | prompt ratio [95% CI] | "
              "decode ratio [95% CI] |\n|---|---:|---:|---:|---:|")
        for label in report:
            if label not in runnable:
                print(f"| {label} | {report[label]['reason']} | | | |")
                continue
            p, d = report[label]["prompt_tps"], report[label]["decode_tps"]
            cells = []
            for key in ("prompt_tps", "decode_tps"):
                ratio, lo, hi = paired_ratio(report[label]["runs"], report[ref]["runs"], key,
                                             args.rounds)
                report[label][f"{key}_ratio_to_{ref}"] = [ratio, lo, hi]
                cells.append(f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]")
            print(f"| {label} | {p:.1f} | {d:.1f} | {cells[0]} | {cells[1]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "builds": report}, indent=1))
    print(f"tok/s: medians over {args.rounds} rounds x {args.reps} completions; written to {args.out}")


if __name__ == "__main__":
    main()
