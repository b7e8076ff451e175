"""Guarded causal pairs per hour: today's in-process oracle vs the same with prompt-lookup
speculative decoding, side by side in one run.

The same causal tasks (the first N held-out helpful-base pairs with short answers, the first
fallback attribute, both directions, one greedy candidate) go through ``crome.augment`` with
each oracle setup, without a cache, in alternating rounds (A B A B …) so that whatever else
the machine does weighs on both alike. Validation (two judge requests per guarded rewrite)
is on unless ``--no-validate``: the figure that matters is pairs that pass, per hour.

Reported per setup: wall seconds, rewrite calls, pairs produced (guarded and, with
validation, validated), pairs/h and rewrites/h, and the ratio to the baseline with a
bootstrap 95% CI over rounds.

    python benchmarks/augment_throughput.py --pairs 6 --rounds 2 --lookup 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (offline env, importable checkout)
import numpy as np

from crome.augment import AugmentOptions, augment
from crome.data.schema import prompt_hash
from crome.data.sources import load_source
from crome.embed import Embedder
from crome.oracle import OracleOptions, make_oracle
from crome.rubrics import FALLBACK_ATTRIBUTES, Rubric


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=10, help="draft tokens of the lookup setup")
    ap.add_argument("--max-chars", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/augment_throughput.json")
    args = ap.parse_args()

    records = [r for r in load_source("hh-rlhf/helpful-base",
                                      data_dir=Path(args.data_dir) if args.data_dir else None
                                      ).records
               if max(len(r.chosen), len(r.rejected)) <= args.max_chars][:args.pairs]
    rubrics = {prompt_hash(r.prompt): Rubric(prompt_hash(r.prompt), [FALLBACK_ATTRIBUTES[0]],
                                             "fallback", 0, "bench") for r in records}
    opts = AugmentOptions(attributes_per_pair=1, candidates=1, validate=args.validate)
    embedder = Embedder()
    setups = {"serial": 0, f"lookup{args.lookup}": args.lookup}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for rnd in range(args.rounds):
        for name, lookup in setups.items():
            oracle = make_oracle(OracleOptions(spec="llamacpp", cache="off",
                                               threads=args.threads, lookup_tokens=lookup))
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
            print(f"round {rnd + 1} {name:10} {seconds:7.1f} s  {rep.tasks} rewrites, "
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
        boots = [speed[rng.integers(0, len(speed), len(speed))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        summary[name] = {"rounds": rows[name], "speedup_vs_serial": float(speed.mean()),
                         "ci95": [float(lo), float(hi)]}
        print(f"{name:10} mean {t.mean():7.1f} s; rewrites/h ×{speed.mean():.2f} vs {base} "
              f"[95% CI over rounds {lo:.2f}, {hi:.2f}]; produced per round "
              f"{[r['produced'] for r in rows[name]]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "setups": summary}, indent=2)
                              + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
