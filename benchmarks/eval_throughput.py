"""The robustness suite's cost: perturbations + best-of-N + audit vs plain ``crome eval``.

One run, one model (``--model DIR``, else the packaged MiniLM with a fresh head: the same
speed), on the held-out sets (first ``--max-eval`` pairs per subset; 0 = all):

1. baseline: ``crome eval``'s scoring of the clean pairs (answers/s);
2. the default perturbation suite on the same pairs, best-of-N on ``--bon-questions`` GSM8K
   test questions, and the causal audit on rules-made held-out probes.

Printed: pairs/s and total time of each part, the suite's answers/s against the baseline's
(the ratio: ~1 when scoring dominates, as it should), and the share of the suite's time spent
in the text transformations themselves (target ≤ 10%).

    python benchmarks/eval_throughput.py --max-eval 25
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common

from crome.evaluate.audit import audit, rules_probe_pairs
from crome.evaluate.bon import BoNOptions, run_bon
from crome.evaluate.perturb import MemoScorer, PerturbOptions, evaluate_perturbations
from crome.evaluate.run import HELD_OUT, evaluate_scorer, load_eval_sets
from crome.model import ModelOptions, RewardModel
from crome.score import RewardModelScorer, ScoreOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="RM dir (default: packaged MiniLM)")
    ap.add_argument("--max-eval", type=int, default=25, help="pairs per subset; 0 = all")
    ap.add_argument("--sets", nargs="+", default=list(HELD_OUT))
    ap.add_argument("--bon-questions", type=int, default=100)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    _common.add_common_args(ap, "runs/bench/eval_throughput.json",
                            "torch threads (default: torch's)")
    args = ap.parse_args()
    _common.set_threads(args.threads)

    rm = RewardModel.load(args.model) if args.model else \
        RewardModel.create(ModelOptions(max_length=args.max_length))
    name = Path(args.model).name if args.model else "minilm-untrained"
    sets = load_eval_sets(args.sets, args.data_dir, args.max_eval or None)
    n_pairs = sum(len(es.records) for es in sets)

    def scorer() -> RewardModelScorer:
        return RewardModelScorer(rm, ScoreOptions(args.batch_size), name=name)

    with tempfile.TemporaryDirectory() as tmp:
        base = scorer()
        t0 = time.perf_counter()
        evaluate_scorer(base, sets, Path(tmp) / "clean")
        clean_s = time.perf_counter() - t0
        clean_answers = base.stats.sequences

        memo = MemoScorer(scorer())
        t0 = time.perf_counter()
        perturbed = evaluate_perturbations(memo, sets, PerturbOptions())
        perturb_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        bon = run_bon(memo, BoNOptions(limit=args.bon_questions), data_dir=args.data_dir)
        bon_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        probes, _ = rules_probe_pairs(Path(tmp) / "probes", args.data_dir, args.probes)
        probe_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        audit(memo, probes, perturbed=perturbed)
        audit_s = time.perf_counter() - t0

    suite_s = perturb_s + bon_s + probe_s + audit_s
    transform_s = perturbed.seconds["transformations"]
    perturbed_pairs = sum(t.n for t in perturbed.transformations)
    figures = {
        "model": name, "sets": args.sets, "max_eval": args.max_eval, "pairs": n_pairs,
        "clean": {"seconds": round(clean_s, 2), "answers": clean_answers,
                  "answers_per_s": clean_answers / clean_s, "pairs_per_s": n_pairs / clean_s},
        "perturb": {"seconds": round(perturb_s, 2), "perturbed_pairs": perturbed_pairs,
                    "pairs_per_s": perturbed_pairs / perturb_s,
                    "transformation_seconds": transform_s,
                    "scoring_seconds": perturbed.seconds["scoring"]},
        "bon": {"seconds": round(bon_s, 2), "questions": bon.results[-1].questions},
        "audit": {"seconds": round(audit_s + probe_s, 2), "probe_pairs": len(probes),
                  "making_probes_seconds": round(probe_s, 2)},
        "suite": {"seconds": round(suite_s, 2), "answers_scored": memo.scored,
                  "answers_per_s": memo.scored / suite_s},
    }
    ratio = figures["suite"]["answers_per_s"] / figures["clean"]["answers_per_s"]
    share = transform_s / suite_s
    figures["ratio_suite_vs_clean_answers_per_s"] = ratio
    figures["transformation_share"] = share
    print(f"{n_pairs} held-out pairs ({', '.join(args.sets)}; first {args.max_eval or 'all'} "
          f"per subset), model {name}")
    print(f"clean eval:    {clean_s:7.1f} s  {n_pairs / clean_s:6.1f} pairs/s  "
          f"{clean_answers / clean_s:6.1f} answers/s")
    print(f"perturbations: {perturb_s:7.1f} s  {perturbed_pairs / perturb_s:6.1f} perturbed "
          f"pairs/s ({perturbed_pairs} over {len(perturbed.transformations)} perturbations)")
    print(f"best-of-N:     {bon_s:7.1f} s  ({figures['bon']['questions']} questions at "
          f"N={bon.results[-1].n})")
    print(f"audit:         {audit_s + probe_s:7.1f} s  ({len(probes)} probe pairs; making "
          f"them {probe_s:.1f} s)")
    print(f"whole suite:   {suite_s:7.1f} s  {memo.scored / suite_s:6.1f} answers/s = "
          f"{ratio:.2f}x the clean eval's answers/s")
    print(f"text transformations: {transform_s:.2f} s = {share:.1%} of the suite "
          f"(target <= 10%: {'met' if share <= 0.10 else 'NOT met'})")
    _common.write_result(figures, args.out)


if __name__ == "__main__":
    main()
