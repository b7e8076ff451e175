"""Guarded and validated causal pairs per hour, per local oracle backend, side by side.

Every arm gets the very same requests: the causal rewrite requests of N held-out helpful-base
pairs with short answers (first fallback attribute, both directions, the greedy candidate, at
most ``--max-new-tokens`` new tokens). Per arm, in one run on this machine:

* requests/h: the rewrites, timed;
* guarded pairs/h: rewrites that pass crome's text and similarity guards, per hour of rewriting;
* validated pairs/h: guarded rewrites that the logprob judge then passes (both orders, the
  same backend judging), per hour of rewriting plus judging.

Arms (``--arms``): ``llamacpp`` (in process, one request at a time: the baseline),
``llamaserver`` (llama.cpp's server, ``--slots`` slots), ``hf:B`` (transformers, batches of
B, dtype auto: bf16 where this CPU's bf16 is fast, else fp32; ``hf-fp32:B``/``hf-bf16:B`` to
force one). Ratios are against llamacpp. The CPU and the dtype are printed.

    python benchmarks/oracle_throughput.py --pairs 8 --arms llamacpp,hf:8,hf:16
"""

from __future__ import annotations

import argparse
import gc
import time

import _common  # offline env, importable checkout, shared helpers

from crome.augment import (
    AugmentOptions,
    AugmentReport,
    causal_tasks,
    check_rewrite,
    clean_rewrite,
    rewrite_request,
    similarity_reason,
)
from crome.data.schema import prompt_hash
from crome.doctor import cpu_name
from crome.embed import Embedder
from crome.oracle import OracleOptions, make_backend
from crome.rubrics import FALLBACK_ATTRIBUTES, Rubric
from crome.validate import judge_requests, judge_verdict


def make_arm(arm: str, threads: int, slots: int):  # type: ignore[no-untyped-def]
    name, _, batch = arm.partition(":")
    if name == "llamacpp":
        return make_backend(OracleOptions(spec="llamacpp", threads=threads, cache="off"))
    if name == "llamaserver":
        return make_backend(OracleOptions(spec="llamaserver", threads=threads,
                                          concurrency=slots, server_spec="", cache="off"))
    if name.startswith("hf"):
        dtype = name.partition("-")[2] or "auto"
        return make_backend(OracleOptions(spec="hf", batch_size=int(batch or 16), dtype=dtype,
                                          threads=threads, cache="off"))
    raise SystemExit(f"unknown arm {arm!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8, help="parent pairs (2 rewrites each)")
    ap.add_argument("--max-chars", type=int, default=400, help="answers at most this long")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--arms", default="llamacpp,llamaserver,hf:1,hf:8,hf:16,hf:32")
    ap.add_argument("--slots", type=int, default=4, help="llamaserver: parallel slots")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--margin", type=float, default=0.5, help="the judge's margin (nats)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/oracle_throughput.json")
    args = ap.parse_args()

    records = _common.short_helpful_pairs(args.pairs, args.max_chars, args.data_dir)
    rubrics = {prompt_hash(r.prompt): Rubric(prompt_hash(r.prompt), [FALLBACK_ATTRIBUTES[0]],
                                             "fallback", 0, "bench") for r in records}
    opts = AugmentOptions(attributes_per_pair=1, candidates=1,
                          max_new_tokens=args.max_new_tokens)
    tasks = causal_tasks(records, rubrics, opts, AugmentReport(recipe="causal"))
    requests = [rewrite_request(t.parent.prompt, t.source_answer, t.attribute, t.direction, 0,
                                opts) for t in tasks]
    embedder = Embedder()
    embedder.encode(["warm up"])
    cpu = cpu_name()
    print(f"{len(requests)} rewrite requests on {cpu}, {args.threads} threads")
    rows = {}
    for arm in args.arms.split(","):
        oracle = make_arm(arm, args.threads, args.slots)
        try:
            dtype = getattr(oracle, "dtype", "q4 (llama.cpp)")
            oracle.generate(requests[:1])  # load and warm up, not timed
            t0 = time.perf_counter()
            out = oracle.generate(requests)
            gen_s = time.perf_counter() - t0
            texts = {t.id: clean_rewrite(r.text) for t, r in zip(tasks, out) if r.ok}
            guarded = [t for t in tasks if t.id in texts and not check_rewrite(
                t.source_answer, texts[t.id], t.other_answer, t.parent.prompt, opts.guards)]
            if guarded:
                sims = embedder.similarity([t.source_answer for t in guarded],
                                           [texts[t.id] for t in guarded])
                guarded = [t for t, s in zip(guarded, sims)
                           if not similarity_reason(float(s), opts.guards)]
            judge = [r for t in guarded for r in judge_requests(
                t.parent.prompt, t.source_answer, texts[t.id], t.attribute, t.direction)]
            t0 = time.perf_counter()
            verdicts = oracle.generate(judge)
            judge_s = time.perf_counter() - t0
        finally:
            oracle.close()
            del oracle
            gc.collect()
        passed = sum(1 for i, t in enumerate(guarded) if (v := judge_verdict(
            verdicts[2 * i:2 * i + 2], t.direction, args.margin)) is not None and v.passed)
        tokens = sum(r.usage.get("completion_tokens", 0) for r in out)
        rows[arm] = {"dtype": dtype, "requests": len(requests),
                     "failed": sum(not r.ok for r in out), "seconds": gen_s,
                     "judge_seconds": judge_s, "completion_tokens": tokens,
                     "requests_per_hour": 3600 * len(requests) / gen_s,
                     "guarded": len(guarded), "guarded_per_hour": 3600 * len(guarded) / gen_s,
                     "validated": passed,
                     "validated_per_hour": 3600 * passed / (gen_s + judge_s)}
        r = rows[arm]
        print(f"{arm:12s} {dtype:15s} {r['requests_per_hour']:7.0f} requests/h "
              f"({tokens / gen_s:5.1f} tok/s)  guarded {r['guarded']:3d} -> "
              f"{r['guarded_per_hour']:6.0f}/h  validated {passed:3d} -> "
              f"{r['validated_per_hour']:6.0f}/h  (judging {judge_s:.0f} s)", flush=True)
    base = rows.get("llamacpp")
    if base:
        print("\nratio to llama.cpp serial (same requests, same run):")
        for arm, r in rows.items():
            ratio = {k: r[k] / base[k] if base[k] else None  # None: llama.cpp made none
                     for k in ("requests_per_hour", "guarded_per_hour", "validated_per_hour")}
            r["ratio_to_llamacpp"] = ratio
            print(f"  {arm:12s} " + "  ".join(
                f"{k.split('_')[0]} " + (f"{v:.2f}x" if v is not None else "n/a (0 at baseline)")
                for k, v in ratio.items()))
    _common.write_result({"cpu": cpu, "threads": args.threads, "requests": len(requests),
                          "max_new_tokens": args.max_new_tokens, "arms": rows}, args.out)


if __name__ == "__main__":
    main()
