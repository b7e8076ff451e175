"""Guarded causal pairs per hour: the in-process oracle (serial, and with prompt-lookup
speculative decoding) vs llama.cpp's own server (slots with continuous batching, with and
without n-gram speculative decoding), side by side in one run.

The same causal tasks (the first N held-out helpful-base pairs with short answers, the first
fallback attribute, both directions, one greedy candidate) go through ``crome.augment`` with
each oracle setup, without a cache, in alternating rounds (A B A B …) so that whatever else
the machine does weighs on both alike. Validation (two judge requests per guarded rewrite)
is on unless ``--no-validate``: the figure that matters is pairs that pass, per hour.

Reported per setup: wall seconds, rewrite calls, pairs produced (guarded and, with
validation, validated), pairs/h and rewrites/h, and the ratios of rewrites/h and pairs/h to
the serial baseline with bootstrap 95% CIs over rounds. Each oracle is started and sent one
one-token request before its round is timed (a server's start-up is paid once per run).
The server setups need ``crome build-llama --server``; ``--setups`` picks a subset.

    python benchmarks/augment_throughput.py --pairs 8 --rounds 2 --parallel 4 --no-validate
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _common  # offline env, importable checkout, shared helpers
import numpy as np

from crome.augment import AugmentOptions, augment
from crome.data.schema import prompt_hash
from crome.embed import Embedder
from crome.oracle import OracleOptions, OracleRequest, Sampling, make_oracle
from crome.rubrics import FALLBACK_ATTRIBUTES, Rubric


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=10, help="draft tokens of the lookup setup")
    ap.add_argument("--parallel", type=int, default=4, help="slots of the server setups")
    ap.add_argument("--setups", default="serial,lookup,server,server+ngram",
                    help="comma-separated subset of serial, lookup, server, server+ngram")
    ap.add_argument("--max-chars", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/augment_throughput.json")
    args = ap.parse_args()

    records = _common.short_helpful_pairs(args.pairs, args.max_chars, args.data_dir)
    rubrics = {prompt_hash(r.prompt): Rubric(prompt_hash(r.prompt), [FALLBACK_ATTRIBUTES[0]],
                                             "fallback", 0, "bench") for r in records}
    opts = AugmentOptions(attributes_per_pair=1, candidates=1, validate=args.validate)
    embedder = Embedder()
    base_opts = OracleOptions(spec="llamacpp", cache="off", threads=args.threads)
    np_ = args.parallel
    catalogue = {  # --setups key: (name, oracle options)
        "serial": ("serial", base_opts),
        "lookup": (f"lookup{args.lookup}", replace(base_opts, lookup_tokens=args.lookup)),
        "server": (f"server-np{np_}", replace(base_opts, spec="llamaserver", server_spec="",
                                              concurrency=np_)),
        "server+ngram": (f"server-np{np_}+ngram",
                         replace(base_opts, spec="llamaserver", server_spec="ngram-simple",
                                 concurrency=np_)),
    }
    wanted = args.setups.split(",")
    unknown = sorted(set(wanted) - set(catalogue))
    if unknown:
        raise SystemExit(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(catalogue)}")
    setups = {name: o for key, (name, o) in catalogue.items() if key in wanted}
    if "serial" not in setups:
        raise SystemExit("--setups must include serial, the baseline")
    warm = OracleRequest.make([{"role": "user", "content": "Say OK."}], Sampling(max_tokens=1))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for rnd in range(args.rounds):
        for name, oracle_opts in setups.items():
            oracle = make_oracle(oracle_opts)
            oracle.generate([warm])
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                rep = augment(records, Path(tmp) / "causal.jsonl", opts, oracle=oracle,
                              rubrics=rubrics, embedder=embedder)
                seconds = time.perf_counter() - t0
            oracle.close()
            guarded = rep.n_produced + sum(v for k, v in rep.validation.items()
                                           if k != "passed")
            row = {"seconds": seconds, "tasks": rep.tasks, "produced": rep.n_produced,
                   "guarded": guarded, "pairs_per_hour": 3600 * rep.n_produced / seconds,
                   "rewrites_per_hour": 3600 * rep.tasks / seconds}
            rows[name].append(row)
            print(f"round {rnd + 1} {name:18} {seconds:7.1f} s  {rep.tasks} rewrites, "
                  f"{guarded} guarded, {rep.n_produced} produced; "
                  f"{row['rewrites_per_hour']:.0f} rewrites/h, "
                  f"{row['pairs_per_hour']:.0f} pairs/h; validation {dict(rep.validation)}",
                  flush=True)
    base = next(iter(setups))
    rng = np.random.default_rng(0)
    summary = {}
    for name in setups:
        t_base = np.array([r["seconds"] for r in rows[base]])
        t = np.array([r["seconds"] for r in rows[name]])
        speed = t_base / t  # same tasks: the time ratio is the throughput ratio
        pairs = (np.array([r["pairs_per_hour"] for r in rows[name]])
                 / max(np.mean([r["pairs_per_hour"] for r in rows[base]]), 1e-9))
        idx = rng.integers(0, len(speed), (2000, len(speed)))
        lo, hi = np.percentile(speed[idx].mean(axis=1), [2.5, 97.5])
        plo, phi = np.percentile(pairs[idx].mean(axis=1), [2.5, 97.5])
        summary[name] = {"rounds": rows[name], "speedup_vs_serial": float(speed.mean()),
                         "ci95": [float(lo), float(hi)],
                         "pairs_per_hour_ratio": float(pairs.mean()),
                         "pairs_ci95": [float(plo), float(phi)]}
        print(f"{name:18} mean {t.mean():7.1f} s; rewrites/h ×{speed.mean():.2f} vs {base} "
              f"[95% CI over rounds {lo:.2f}, {hi:.2f}]; pairs/h ×{pairs.mean():.2f} "
              f"[{plo:.2f}, {phi:.2f}]; produced per round "
              f"{[r['produced'] for r in rows[name]]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "setups": summary}, indent=2)
                              + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
