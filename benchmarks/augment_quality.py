"""How many causal rewrites of the oracle pass the guards and its own validation, per
attribute and direction.

On N held-out pairs (hh-rlhf helpful-base, short answers), the oracle writes rubrics and then
causal rewrites (first ``--attributes`` attributes, both directions), each checked by the
oracle in both orders (crome.validate; ``--no-validate`` skips it). Reported per
attribute/direction: the fraction of first candidates that pass, the yield before validation
(tasks with a rewrite that passed the text guards) and after it (tasks that end with a pair),
the rejection reasons and validation verdicts, and ``--examples`` examples of kept and of
validation-rejected rewrites (the original and the rewrite) for a human to read.

    python benchmarks/augment_quality.py --pairs 50                       # packaged 1.5B model
    python benchmarks/augment_quality.py --oracle openai:http://127.0.0.1:8000/v1 --oracle-model M
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import _common  # offline env, importable checkout, shared helpers

from crome.augment import AugmentOptions, augment, failures_path
from crome.data.io import read_pairs
from crome.oracle import OracleOptions, make_oracle
from crome.oracle.rules import RulesOracle
from crome.rubrics import make_rubrics, read_rubrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--attributes", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--oracle", default="llamacpp")
    ap.add_argument("--oracle-model", default="")
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--fallback-rubrics", action="store_true",
                    help="skip the oracle's rubrics: every pair gets the fallback attributes "
                         "(saves one oracle call per prompt)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/augment_quality")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = _common.short_helpful_pairs(args.pairs, args.max_chars, args.data_dir)
    oracle = make_oracle(OracleOptions(spec=args.oracle, model=args.oracle_model,
                                       cache=str(out / "oracle.sqlite3")))
    t0 = time.perf_counter()
    rubric_oracle = RulesOracle() if args.fallback_rubrics else oracle  # rules: fallback set
    rub = make_rubrics(records, rubric_oracle, out / "rubrics.jsonl")
    t_rub = time.perf_counter() - t0
    print(rub.summary())
    opts = AugmentOptions(attributes_per_pair=args.attributes, candidates=args.candidates,
                          validate=args.validate)
    t0 = time.perf_counter()
    rep = augment(records, out / "causal.jsonl", opts, oracle=oracle,
                  rubrics=read_rubrics(out / "rubrics.jsonl"))
    t_aug = time.perf_counter() - t0
    stats = getattr(oracle, "stats", None)
    oracle.close()
    print(rep.summary())
    if stats is not None:
        print(stats.summary())

    pairs = read_pairs(out / "causal.jsonl")
    fails = [json.loads(x) for x in failures_path(out / "causal.jsonl").read_text().splitlines()]
    by_id = {r.id: r for r in records}
    produced: Counter[str] = Counter()
    first_pass: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for p in pairs:
        key = f"{p.provenance['attribute']}/{p.provenance['direction']}"
        tasks[key] += 1
        produced[key] += 1
        first_pass[key] += p.provenance["candidate"] == 0
        parent = by_id[p.provenance["parent_id"]]
        source = parent.chosen if p.provenance["direction"] == "degrade" else parent.rejected
        new = p.rejected if p.provenance["direction"] == "degrade" else p.chosen
        if len(examples[key]) < args.examples:
            examples[key].append((p.id, source, new))
    guarded: Counter[str] = Counter(produced)  # tasks with a rewrite past the text guards
    rejected: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for f in fails:
        key = f"{f['attribute']}/{f['direction']}"
        tasks[key] += 1
        for r in f["reasons"]:
            reasons[key][r] += 1
        judged = f.get("rejected_by_validation", [])
        guarded[key] += bool(judged)
        parent = by_id[f["parent_id"]]
        source = parent.chosen if f["direction"] == "degrade" else parent.rejected
        for j in judged[:1]:
            if len(rejected[key]) < args.examples:
                rejected[key].append((f"{f['id']} ({j['reason']}, better: {j['better']})",
                                      source, j["rewrite"]))
    for p in pairs:
        key = f"{p.provenance['attribute']}/{p.provenance['direction']}"
        if p.provenance["candidate"] > 0:
            reasons[key]["(first candidate rejected, a later one passed)"] += 1

    print(f"\nrubrics {t_rub:.0f} s, rewrites {t_aug:.0f} s "
          f"({rep.tasks} tasks, {t_aug / max(1, rep.tasks):.1f} s per task)")
    print(f"{'attribute/direction':40} {'tasks':>6} {'1st pass':>9} {'guarded':>8} "
          f"{'validated':>9}  reasons")
    rows = {}
    for key in sorted(tasks, key=lambda k: -tasks[k]):
        n = tasks[key]
        rows[key] = {"tasks": n, "first_candidate_pass": first_pass[key] / n,
                     "guarded": guarded[key] / n, "produced": produced[key] / n,
                     "reasons": dict(reasons[key])}
        print(f"{key:40} {n:6d} {first_pass[key] / n:9.0%} {guarded[key] / n:8.0%} "
              f"{produced[key] / n:9.0%}  "
              + ", ".join(f"{r} {c}" for r, c in reasons[key].most_common()))
    total = sum(tasks.values())
    print(f"{'all':40} {total:6d} {sum(first_pass.values()) / max(1, total):9.0%} "
          f"{sum(guarded.values()) / max(1, total):8.0%} "
          f"{sum(produced.values()) / max(1, total):9.0%}")
    print("guarded: a rewrite passed the text guards (yield before validation); validated: "
          "the task ended with a pair (after)" if args.validate else
          "validation off: guarded = validated")
    print(f"validation verdicts: {dict(rep.validation.most_common())}")
    for title, groups in (("kept", examples), ("rejected by validation", rejected)):
        for key, exs in groups.items():
            print(f"\n=== {key}: {len(exs)} {title}")
            for pid, src, new in exs:
                print(f"--- {pid}\n  before: " + textwrap.shorten(src, 400)
                      + "\n  after:  " + textwrap.shorten(new, 400))
    (out / "summary.json").write_text(json.dumps({
        "pairs": len(records), "tasks": total, "rubric_seconds": t_rub,
        "rewrite_seconds": t_aug, "by_kind": rows, "rubrics": {"ok": rub.ok,
                                                                "fallback": rub.fallback},
        "first_candidate_pass": sum(first_pass.values()) / max(1, total),
        "guarded": sum(guarded.values()) / max(1, total),
        "validation": dict(rep.validation), "validate": args.validate,
        "produced": sum(produced.values()) / max(1, total)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
