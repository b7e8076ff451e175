"""The rewrite judge on pairs whose truth is known: accuracy, position bias, yield.

Three probe sets, each a pair (better, worse) where which is better is not in doubt:

* ``gsm8k-number``: a GSM8K training solution vs the rules oracle's copy of it with another
  final number (attribute correctness);
* ``off-prompt``: a helpful-base answer vs the answer to another, unrelated prompt of the
  set (attribute relevance);
* ``key-sentence``: a helpful-base answer of at least three sentences vs a copy without its
  longest sentence (attribute completeness).

Each pair is judged as crome's validation judges a rewrite, in both orders: once as a
degradation (the worse reply is "the rewrite") with ``--judge logprob`` (the verdict
tokens' log-odds, one forward pass per order) and, with ``--generate``, with the generated
two-line verdict too. Reported per set and judge:

* accuracy of the both-order verdict (the sign of the mean log-odds; generated: both orders
  name the better reply) and of each order alone;
* position bias: the share of ``A`` among the single-order verdicts (50% is none; every pair
  is shown in both orders, so a judge that reads content says A half the time);
* validated yield: the share of pairs that pass validation (``judge_verdict`` at each
  ``--margins``; generated: ``verdict_of``), i.e. true rewrites that the judge would keep;
* seconds per judged pair.

    python benchmarks/judge_accuracy.py --pairs 30                  # packaged 1.5B, in process
    python benchmarks/judge_accuracy.py --judge-oracle openai:http://127.0.0.1:8000/v1 \\
        --judge-model M                                           # a served judge
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import _common  # offline env, importable checkout, shared helpers

from crome.data.sources import load_gsm8k, load_source
from crome.doctor import cpu_name
from crome.oracle import OracleOptions, make_oracle
from crome.oracle.rules import change_final_number
from crome.rubrics import FALLBACK_ATTRIBUTES
from crome.validate import (
    PASSED,
    judge_requests,
    judge_verdict,
    letter_log_odds,
    rewrite_log_odds,
    validation_requests,
    verdict_of,
)

ATTRIBUTE = {a.name: a for a in FALLBACK_ATTRIBUTES}
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def gsm8k_probes(n: int, data_dir: Path | None) -> list[dict]:
    out = []
    for item in load_gsm8k("train", data_dir):
        worse = change_final_number(item.answer)
        if worse and worse != item.answer:
            out.append({"prompt": item.question, "better": item.answer, "worse": worse,
                        "attribute": ATTRIBUTE["correctness"]})
        if len(out) == n:
            break
    return out


def helpful_probes(n: int, max_chars: int, seed: int, data_dir: Path | None
                   ) -> tuple[list[dict], list[dict]]:
    records = [r for r in load_source("hh-rlhf/helpful-base", data_dir=data_dir).records
               if 80 <= len(r.chosen) <= max_chars][:4 * n]
    rng = random.Random(seed)
    off, key = [], []
    for i, rec in enumerate(records):
        if len(off) < n:
            other = records[(i + 1 + rng.randrange(len(records) - 1)) % len(records)]
            off.append({"prompt": rec.prompt, "better": rec.chosen, "worse": other.chosen,
                        "attribute": ATTRIBUTE["relevance"]})
        sentences = [s for s in SENTENCE.split(rec.chosen.strip()) if s]
        if len(key) < n and len(sentences) >= 3:
            longest = max(range(len(sentences)), key=lambda j: len(sentences[j]))
            key.append({"prompt": rec.prompt, "better": rec.chosen,
                        "worse": " ".join(s for j, s in enumerate(sentences) if j != longest),
                        "attribute": ATTRIBUTE["completeness"]})
    return off, key


def judge_logprob(oracle, probes: list[dict], margins: list[float]) -> dict:
    requests = [r for p in probes for r in judge_requests(
        p["prompt"], p["better"], p["worse"], p["attribute"], "degrade")]
    t0 = time.perf_counter()
    responses = oracle.generate(requests)
    seconds = time.perf_counter() - t0
    correct = single = a_votes = votes = failed = 0
    passed = dict.fromkeys(margins, 0)
    for i in range(len(probes)):
        pair = responses[2 * i:2 * i + 2]
        if not all(r.ok for r in pair):
            failed += 1
            continue
        odds = rewrite_log_odds(pair)  # log-odds that the worse reply is better
        if odds is None:
            failed += 1
            continue
        correct += (odds[0] + odds[1]) / 2 < 0
        single += (odds[0] < 0) + (odds[1] < 0)
        for r in pair:
            letter = letter_log_odds(r)
            a_votes += letter is not None and letter > 0
            votes += 1
        for m in margins:
            verdict = judge_verdict(pair, "degrade", m)
            passed[m] += verdict is not None and verdict.reason == PASSED
    judged = len(probes) - failed
    return {"pairs": len(probes), "failed": failed,
            "accuracy": correct / max(1, judged),
            "single_order_accuracy": single / max(1, 2 * judged),
            "share_A": a_votes / max(1, votes),
            "yield": {str(m): passed[m] / max(1, len(probes)) for m in margins},
            "seconds_per_pair": seconds / max(1, len(probes))}


def judge_generate(oracle, probes: list[dict]) -> dict:
    requests = [r for p in probes for r in validation_requests(
        p["prompt"], p["better"], p["worse"], p["attribute"], "degrade")]
    t0 = time.perf_counter()
    responses = oracle.generate(requests)
    seconds = time.perf_counter() - t0
    correct = single = a_votes = votes = passed = failed = 0
    for i in range(len(probes)):
        pair = responses[2 * i:2 * i + 2]
        verdict = verdict_of(pair, "degrade", reject_other_changes=False)
        if verdict is None:
            failed += 1
            continue
        better = [a.better for a in verdict.answers]
        correct += better == ["original", "original"]
        single += better.count("original")
        # original is A in the first order, the rewrite is A in the second
        a_votes += (better[0] == "original") + (better[1] == "rewrite")
        votes += sum(b in ("original", "rewrite") for b in better)
        passed += verdict.reason == PASSED
    judged = len(probes) - failed
    return {"pairs": len(probes), "failed": failed, "accuracy": correct / max(1, judged),
            "single_order_accuracy": single / max(1, 2 * judged),
            "share_A": a_votes / max(1, votes), "yield": {"-": passed / max(1, len(probes))},
            "seconds_per_pair": seconds / max(1, len(probes))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30, help="pairs per probe set")
    ap.add_argument("--max-chars", type=int, default=700, help="helpful-base answer length")
    ap.add_argument("--judge-oracle", default="llamacpp", help="oracle spec of the judge")
    ap.add_argument("--judge-model", default="")
    ap.add_argument("--margins", default="0,0.5,1,2", help="logprob: judge_margin values")
    ap.add_argument("--generate", action="store_true", help="also the generated verdict")
    ap.add_argument("--cache", default="off", help="oracle cache (default off: time it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/judge_accuracy.json")
    args = ap.parse_args()
    data_dir = Path(args.data_dir) if args.data_dir else None
    margins = [float(m) for m in args.margins.split(",")]
    off, key = helpful_probes(args.pairs, args.max_chars, args.seed, data_dir)
    sets = {"gsm8k-number": gsm8k_probes(args.pairs, data_dir), "off-prompt": off,
            "key-sentence": key}
    oracle = make_oracle(OracleOptions(spec=args.judge_oracle, model=args.judge_model,
                                       cache=args.cache))
    cpu = cpu_name()
    print(f"judge {oracle.backend}:{oracle.model} on {cpu}")
    result: dict = {"cpu": cpu, "judge": f"{oracle.backend}:{oracle.model}", "sets": {}}
    try:
        for name, probes in sets.items():
            rows = {"logprob": judge_logprob(oracle, probes, margins)}
            if args.generate:
                rows["generate"] = judge_generate(oracle, probes)
            result["sets"][name] = rows
            for judge, r in rows.items():
                yields = ", ".join(f"{m}: {v:.0%}" for m, v in r["yield"].items())
                print(f"{name:13s} {judge:8s} n={r['pairs']} failed={r['failed']} "
                      f"accuracy {r['accuracy']:.0%} (one order {r['single_order_accuracy']:.0%})"
                      f"  A-share {r['share_A']:.0%}  yield [{yields}]  "
                      f"{r['seconds_per_pair']:.1f} s/pair", flush=True)
    finally:
        oracle.close()
    _common.write_result(result, args.out)


if __name__ == "__main__":
    main()
