"""``crome augment`` through the ``openai`` backend vs a raw concurrent load generator.

Both send the very same chat requests (the causal rewrite requests of N held-out
helpful-base pairs, first attribute of the fallback rubric, both directions, candidate 0 only)
to one llama.cpp server started here with the packaged model. Reported: requests/s of each,
the ratio (target ≥ 0.90), and a second crome run on the filled cache (0 calls expected),
whose time is reading the cache plus the guards' embeddings.

    python benchmarks/openai_client_overhead.py --pairs 12 --concurrency 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # offline env, importable checkout, shared helpers
import httpx

from crome.augment import (
    AugmentOptions,
    AugmentReport,
    augment,
    causal_tasks,
    rewrite_request,
)
from crome.data.schema import prompt_hash
from crome.embed import Embedder
from crome.oracle import OracleOptions, make_oracle
from crome.oracle.server import LlamaServer
from crome.rubrics import FALLBACK_ATTRIBUTES, Rubric


def raw_load(base_url: str, model: str, bodies: list[dict], concurrency: int) -> float:
    """Seconds to get every answer with ``concurrency`` requests in flight."""
    def one(client: httpx.Client, body: dict) -> None:
        r = client.post(f"{base_url}/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)

    t0 = time.perf_counter()
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: one(client, b), bodies))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="server CPU threads")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench/openai_client_overhead.json")
    args = ap.parse_args()

    records = _common.short_helpful_pairs(args.pairs, 600, args.data_dir)
    rubrics = {prompt_hash(r.prompt): Rubric(prompt_hash(r.prompt), [FALLBACK_ATTRIBUTES[0]],
                                             "fallback", 0, "bench")
               for r in records}
    opts = AugmentOptions(attributes_per_pair=1, candidates=1, batch_size=args.concurrency * 4)
    tasks = causal_tasks(records, rubrics, opts, AugmentReport(recipe="causal"))
    embedder = Embedder()  # loaded before timing: both sides start warm
    embedder.encode(["warm up"])
    work = Path(tempfile.mkdtemp(prefix="crome-oracle-bench-"))
    with LlamaServer(n_threads=args.threads, alias="qwen") as server:
        bodies = []
        for t in tasks:
            req = rewrite_request(t.parent.prompt, t.source_answer, t.attribute, t.direction, 0,
                                  opts)
            s = req.sampling
            body = {"model": "qwen", "messages": req.message_dicts,
                    "temperature": s.temperature, "max_tokens": s.max_tokens, "top_p": s.top_p}
            if s.seed is not None:
                body["seed"] = s.seed
            bodies.append(body)
        raw_load(server.base_url, "qwen", bodies[:1], 1)  # warm the server once
        print(f"{len(tasks)} rewrite requests, concurrency {args.concurrency}")

        raw_s = raw_load(server.base_url, "qwen", bodies, args.concurrency)
        print(f"raw load generator: {raw_s:.1f} s, {len(bodies) / raw_s:.3f} req/s")

        def crome_run(tag: str) -> tuple[float, AugmentReport, object]:
            oracle = make_oracle(OracleOptions(spec=f"openai:{server.base_url}", model="qwen",
                                               concurrency=args.concurrency,
                                               cache=str(work / "cache.sqlite3")))
            out = work / f"causal-{tag}.jsonl"
            t0 = time.perf_counter()
            rep = augment(records, out, opts, oracle=oracle, rubrics=rubrics, embedder=embedder)
            seconds = time.perf_counter() - t0
            stats = oracle.stats
            oracle.close()
            return seconds, rep, stats

        crome_s, rep, stats = crome_run("first")
        print(f"crome augment: {crome_s:.1f} s, {len(tasks) / crome_s:.3f} req/s "
              f"({stats.summary()}; {rep.n_produced} pairs, {rep.n_failed} failed)")
        again_s, _, stats2 = crome_run("second")
        print(f"crome augment, second run: {again_s:.2f} s ({stats2.summary()})")
    ratio = raw_s / crome_s
    print(f"ratio crome / raw throughput: {ratio:.3f} (target ≥ 0.90)")
    result = {"tasks": len(tasks), "concurrency": args.concurrency, "raw_seconds": raw_s,
              "crome_seconds": crome_s, "ratio": ratio, "second_run_seconds": again_s,
              "second_run_calls": stats2.misses, "first_run_calls": stats.misses,
              "produced": rep.n_produced, "failed": rep.n_failed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
