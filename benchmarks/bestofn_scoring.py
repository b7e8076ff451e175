"""Best-of-N scoring on a decoder: prefix-shared packs against one sequence per answer.

Two workloads of N answers per prompt (N = 16 by default):

* ``hh-rlhf``: held-out helpful-base prompts with at least ``--min-turns`` user turns (the
  multi-turn conversations that make most of hh-rlhf's tokens), each with N answers drawn
  (seeded) from the pool of every chosen and rejected answer of that set: what a reward model
  reads when it ranks N sampled replies to one conversation;
* ``gsm8k``: GSM8K test questions with their best-of-N candidate pools
  (``crome.evaluate.bon.build_candidates``: 4 real model solutions and 12 rule-made
  variants), the first N of each pool; questions whose pool is shorter are skipped and
  counted.

Both arms are ``crome.score.score_texts`` on the same RM (a fresh ``RewardModel.create`` on the
backbone, fp32 unless ``--bf16``), the same prompts and answers, the same batch size; only
``ScoreOptions.prefix_sharing`` differs. The arms alternate over ``--repeats`` runs (median
reported). The token bound is the ratio of tokens the two arms compute, N·(P+A) / (P+N·A) for
prompt length P and answer length A; it is printed both from the mean P and A of the workload
and exactly, from the token counts (``ScoreStats``). Target: prefix sharing reaches at least
80% of the exact bound. The largest |packed - plain| reward is printed as a check.

    python benchmarks/bestofn_scoring.py [--n 16] [--prompts 8] [--repeats 1]

No timed assertions: it prints, and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, set_threads, write_result

TARGET_OF_BOUND = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="qwen2.5-coder-0.5b-instruct",
                    help="a decoder backbone name or path (default: the packaged 0.5B)")
    ap.add_argument("--n", type=int, default=16, help="answers per prompt")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    ap.add_argument("--min-turns", type=int, default=2,
                    help="hh-rlhf: user turns a prompt has at least")
    ap.add_argument("--workloads", default="hh-rlhf,gsm8k")
    ap.add_argument("--batch-size", type=int, default=16, help="answers per forward pass")
    ap.add_argument("--max-pack-tokens", type=int, default=None,
                    help="ScoreOptions.max_pack_tokens (default: crome's)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    add_common_args(ap, "runs/bench/bestofn_scoring.json",
                    "torch threads (default: torch's own choice)")
    ap.set_defaults(max_length=1024)
    return ap.parse_args(argv)


def hh_workload(args: argparse.Namespace) -> tuple[list[Any], list[str], dict[str, int]]:
    from crome.data.sources import load_source

    records = load_source("hh-rlhf/helpful-base",
                          data_dir=Path(args.data_dir) if args.data_dir else None).records
    pool = [a for r in records for a in (r.chosen, r.rejected)]
    multi = [r for r in records if not isinstance(r.prompt, str)
             and sum(m["role"] == "user" for m in r.prompt) >= args.min_turns]
    rng = random.Random(args.seed)
    chosen = multi[:args.prompts]
    prompts, answers = [], []
    for r in chosen:
        for a in rng.sample(pool, args.n):
            prompts.append(r.prompt)
            answers.append(a)
    return prompts, answers, {"prompts": len(chosen), "multi_turn_available": len(multi)}


def gsm8k_workload(args: argparse.Namespace) -> tuple[list[Any], list[str], dict[str, int]]:
    from crome.data.sources import load_gsm8k
    from crome.evaluate.bon import build_candidates

    items = load_gsm8k("test", Path(args.data_dir) if args.data_dir else None)
    prompts, answers = [], []
    used = short = 0
    for item in items:
        if used == args.prompts:
            break
        pool = build_candidates(item, seed=args.seed).candidates
        if len(pool) < args.n:
            short += 1
            continue
        used += 1
        for c in pool[:args.n]:
            prompts.append(item.question)
            answers.append(c.text)
    return prompts, answers, {"prompts": used, "skipped_short_pools": short}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    import torch

    from crome.doctor import cpu_name
    from crome.model import ModelOptions, RewardModel
    from crome.score import ScoreOptions, ScoreStats, score_texts

    rm = RewardModel.create(ModelOptions(backbone=args.backbone, max_length=args.max_length,
                                         seed=args.seed))
    builders = {"hh-rlhf": hh_workload, "gsm8k": gsm8k_workload}
    results: dict[str, Any] = {}
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        prompts, answers, info = builders[name](args)
        encs = rm.formatter.encode_many(prompts, answers)
        p_mean = statistics.mean(e.prompt_tokens for e in encs)
        a_mean = statistics.mean(len(e) - e.prompt_tokens for e in encs)
        n = args.n
        formula = n * (p_mean + a_mean) / (p_mean + n * a_mean)
        score_texts(rm, prompts[:2], answers[:2])  # untimed warm-up
        times: dict[str, list[float]] = {"packed": [], "plain": []}
        scores: dict[str, list[float]] = {}
        stats: dict[str, ScoreStats] = {}
        for k in range(args.repeats):
            for arm in (("packed", "plain") if k % 2 == 0 else ("plain", "packed")):
                st = ScoreStats()
                opts = ScoreOptions(batch_size=args.batch_size, bf16=args.bf16,
                                    prefix_sharing=arm == "packed")
                if args.max_pack_tokens:
                    opts.max_pack_tokens = args.max_pack_tokens
                t0 = time.perf_counter()
                scores[arm] = score_texts(rm, prompts, answers, opts, st)
                times[arm].append(time.perf_counter() - t0)
                stats[arm] = st
                print(f"  {name} run {k + 1} {arm}: {len(answers) / times[arm][-1]:.2f} "
                      f"answers/s", flush=True)
        t_packed, t_plain = (statistics.median(times[a]) for a in ("packed", "plain"))
        exact = stats["plain"].real_tokens / stats["packed"].real_tokens
        speedup = t_plain / t_packed
        results[name] = {
            **info, "answers": len(answers), "mean_prompt_tokens": round(p_mean, 1),
            "mean_answer_tokens": round(a_mean, 1), "bound_formula": round(formula, 3),
            "bound_exact": round(exact, 3), "seconds": times, "speedup": round(speedup, 3),
            "of_bound": round(speedup / exact, 3),
            "tokens": {a: {"computed": stats[a].real_tokens, "padded": stats[a].padded_tokens,
                           "shared": stats[a].shared_tokens} for a in stats},
            "truncation": stats["plain"].truncation.__dict__,
            "max_abs_reward_difference": max(abs(x - y) for x, y in
                                             zip(scores["packed"], scores["plain"])),
        }
    res = {"benchmark": "bestofn_scoring", "cpu": cpu_name(),
           "settings": {"backbone": args.backbone, "n": args.n, "prompts": args.prompts,
                        "max_pack_tokens": args.max_pack_tokens or ScoreOptions().max_pack_tokens,
                        "max_length": args.max_length, "batch_size": args.batch_size,
                        "bf16": args.bf16, "repeats": args.repeats,
                        "threads": torch.get_num_threads()},
           "workloads": results, "target_of_bound": TARGET_OF_BOUND}
    print()
    print(f"best-of-{args.n} scoring, {args.backbone}, max_length {args.max_length}, "
          f"rows of at most {res['settings']['max_pack_tokens']} tokens, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} run(s); CPU: {res['cpu']}")
    print(f"{'workload':10} {'prompts':>7} {'P':>6} {'A':>6} {'bound':>6} {'exact':>6} "
          f"{'plain s':>8} {'packed s':>8} {'speedup':>8} {'of bound':>8}  max |diff|")
    for name, r in results.items():
        t_plain = statistics.median(r["seconds"]["plain"])
        t_packed = statistics.median(r["seconds"]["packed"])
        ok = "met" if r["of_bound"] >= TARGET_OF_BOUND else "NOT met"
        print(f"{name:10} {r['prompts']:>7} {r['mean_prompt_tokens']:>6} "
              f"{r['mean_answer_tokens']:>6} {r['bound_formula']:>6} {r['bound_exact']:>6} "
              f"{t_plain:>8.1f} {t_packed:>8.1f} {r['speedup']:>7.2f}x {r['of_bound']:>8.0%}"
              f"  {r['max_abs_reward_difference']:.2g}   (target >= "
              f"{TARGET_OF_BOUND:.0%} of the bound: {ok})")
        print(f"{'':10} truncation: {r['truncation']}")
    write_result(res, args.out)


if __name__ == "__main__":
    main()
