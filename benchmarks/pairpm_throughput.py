"""What a pairwise preference model costs: training and scoring pairs/s, PairPM vs BT.

A BT RM reads prompt + answer once per answer: a pair is two sequences of at most
``--max-length`` tokens. A PairPM reads prompt + both answers, and crome runs every pair in
both orders (training: both targets; scoring: both orders averaged): a pair is two sequences
of at most ``--pairwise-max-length`` tokens (default 2 x ``--max-length``, what
``crome experiment`` gives its PairPM arms, so that neither answer is cut more than for BT).

Both arms run with the same backbone (the packaged MiniLM by default), batch size, learning
rate and pairs (training: the first ``--pairs`` hh-rlhf helpful-online training pairs;
scoring: the first ``--score-pairs`` helpful-base held-out pairs), fp32, one after the other
in each repeat (``--repeats``, alternating which goes first). Reported per arm: pairs/s
(training: ``TrainSummary.pairs_per_second``, the training loop only; scoring: the
``score_pairs`` call, tokenisation included) and tokens computed per pair; per repeat, the
ratio PairPM / BT, with the mean and a 95% t-interval of the ratio over repeats.

Best-of-N is a different count: a BT RM scores N answers (N rows); a PairPM's knockout needs
N - 1 comparisons (2(N - 1) rows) and round-robin N(N - 1)/2 (N(N - 1) rows); the script
prints those row counts for N = 4, 8, 16 beside the measured rows/s.

    python benchmarks/pairpm_throughput.py [--pairs 256] [--score-pairs 256] [--repeats 3]

No timed assertions: it prints, and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, set_threads, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=256, help="training pairs (helpful-online)")
    ap.add_argument("--score-pairs", type=int, default=256,
                    help="held-out pairs scored (helpful-base)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--backbone", default=None, help="default: the packaged MiniLM")
    ap.add_argument("--pairwise-max-length", type=int, default=None,
                    help="default: 2 x --max-length")
    ap.add_argument("--repeats", type=int, default=3)
    add_common_args(ap, "runs/bench/pairpm_throughput.json",
                    "torch threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.pairwise_max_length is None:
        args.pairwise_max_length = 2 * args.max_length
    return args


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (Student, n - 1 degrees of freedom)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def run_arm(pairwise: bool, train_records: list, score_records: list,
            args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from crome.model import ModelOptions, RewardModel
    from crome.score import ScoreOptions, ScoreStats, score_pairs
    from crome.train import TrainOptions, train

    max_length = args.pairwise_max_length if pairwise else args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(train_records, TrainOptions(
            output_dir=str(Path(tmp) / "rm"), batch_size=args.batch_size, lr=args.lr,
            seed=seed, bf16=False, progress=False, model=ModelOptions(
                backbone=args.backbone, max_length=max_length, pairwise=pairwise)))
        rm = RewardModel.load(Path(tmp) / "rm")
    stats = ScoreStats()
    t0 = time.perf_counter()
    first, second = score_pairs(rm, score_records, ScoreOptions(batch_size=64), stats)
    seconds = time.perf_counter() - t0
    correct = sum(a > b for a, b in zip(first, second)) / len(score_records)
    return {
        "train_pairs_per_s": summary.pairs_per_second,
        "train_tokens_per_pair": summary.real_tokens / max(summary.pairs, 1),
        "score_pairs_per_s": len(score_records) / seconds,
        "score_rows_per_s": stats.sequences / seconds,
        "score_tokens_per_pair": stats.real_tokens / len(score_records),
        "truncated_sequences": (stats.truncation.prompt_truncated
                                + stats.truncation.answer_truncated),
        "held_out_accuracy": correct,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    import torch

    from crome.data.sources import load_source

    data_dir = Path(args.data_dir) if args.data_dir else None
    train_records = load_source("hh-rlhf/helpful-online", data_dir=data_dir).records[:args.pairs]
    score_records = load_source("hh-rlhf/helpful-base", data_dir=data_dir).records[
        :args.score_pairs]
    print(f"{len(train_records)} training pairs, {len(score_records)} scored pairs; max length "
          f"BT {args.max_length}, PairPM {args.pairwise_max_length}; torch threads "
          f"{torch.get_num_threads()}")
    runs: dict[str, list[dict[str, Any]]] = {"bt": [], "pairpm": []}
    for k in range(args.repeats):
        order = ("bt", "pairpm") if k % 2 == 0 else ("pairpm", "bt")
        for arm in order:
            res = run_arm(arm == "pairpm", train_records, score_records, args, seed=k)
            runs[arm].append(res)
            print(f"repeat {k} {arm:6}: train {res['train_pairs_per_s']:.2f} pairs/s, score "
                  f"{res['score_pairs_per_s']:.1f} pairs/s, held-out accuracy "
                  f"{res['held_out_accuracy']:.3f}")
    ratios: dict[str, Any] = {}
    for key in ("train_pairs_per_s", "score_pairs_per_s"):
        per_repeat = [p[key] / b[key] for p, b in zip(runs["pairpm"], runs["bt"])]
        mean, lo, hi = t_interval(per_repeat)
        ratios[key] = {"per_repeat": per_repeat, "mean": mean, "ci95": [lo, hi]}
    rows_per_s = {arm: statistics.fmean(r["score_rows_per_s"] for r in rs)
                  for arm, rs in runs.items()}
    bon = {n: {"bt_rows": n, "knockout_rows": 2 * (n - 1), "round_robin_rows": n * (n - 1),
               "bt_seconds": n / rows_per_s["bt"],
               "knockout_seconds": 2 * (n - 1) / rows_per_s["pairpm"],
               "round_robin_seconds": n * (n - 1) / rows_per_s["pairpm"]}
           for n in (4, 8, 16)}
    print("\n| | BT | PairPM | PairPM / BT (mean, 95% CI over repeats) |")
    print("|---|---:|---:|---:|")
    for key, label in (("train_pairs_per_s", "training pairs/s"),
                       ("score_pairs_per_s", "scoring pairs/s")):
        bt = statistics.fmean(r[key] for r in runs["bt"])
        pm = statistics.fmean(r[key] for r in runs["pairpm"])
        r = ratios[key]
        print(f"| {label} | {bt:.2f} | {pm:.2f} | {r['mean']:.2f} "
              f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] |")
    for key, label in (("train_tokens_per_pair", "training tokens/pair"),
                       ("score_tokens_per_pair", "scoring tokens/pair")):
        bt = statistics.fmean(r[key] for r in runs["bt"])
        pm = statistics.fmean(r[key] for r in runs["pairpm"])
        print(f"| {label} | {bt:.0f} | {pm:.0f} | {pm / bt:.2f} |")
    print("\nbest-of-N, one question (rows = sequences run; seconds at the measured rows/s):")
    for n, b in bon.items():
        print(f"  N={n:2}: BT {b['bt_rows']} rows {b['bt_seconds']:.2f} s; PairPM knockout "
              f"{b['knockout_rows']} rows {b['knockout_seconds']:.2f} s, round-robin "
              f"{b['round_robin_rows']} rows {b['round_robin_seconds']:.2f} s")
    result = {"args": vars(args), "runs": runs, "ratios": ratios,
              "score_rows_per_s": rows_per_s, "bon_cost": bon}
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
