"""Scoring throughput: ``crome.score.score_pairs`` against a plain Hugging Face loop.

The baseline is what one writes without crome: the answers in input order, ``batch_size``
(32) at a time, ``tokenizer(prompt_text, answer, truncation=True, max_length=256,
padding=True)`` and ``model(**batch)`` under ``torch.inference_mode``. crome sorts by length,
pads to multiples of 16 and keeps a row's result independent of its batch (crome/score.py).
Both use the same model (a fresh ``RewardModel.create()``: throughput does not depend on
training), fp32, on the same helpful-base pairs (the first ``--pairs``), and both timings
include tokenisation. The prompt text of the baseline is crome's plain rendering of the chat
(``User: …\\n\\nAssistant: …``), so that, for the MiniLM's pair template, both make the same
tokens wherever nothing had to be cut; on those sequences the scores must agree up to float
rounding (the max |difference| is printed as a sanity check). Over-length sequences are cut
differently (HF: longest side first; crome: prompt start first) and are left out of that
comparison, only counted.

    python benchmarks/score_throughput.py [--pairs 1000] [--repeats 1]

No timed assertions: it prints, and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from _common import add_common_args, set_threads, write_result

TARGET_SPEEDUP = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1000,
                    help="helpful-base pairs (the first N); 2 answers each")
    ap.add_argument("--batch-size", type=int, default=32, help="the HF loop's batch size")
    ap.add_argument("--crome-batch-size", type=int, default=None,
                    help="ScoreOptions.batch_size (default: crome's own default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of each method, alternating; the median is reported")
    add_common_args(ap, "runs/bench/score_throughput.json",
                    "torch threads (default: torch's own choice)")
    return ap.parse_args(argv)


def hf_loop(model: Any, tokenizer: Any, prompts: list[str], answers: list[str],
            batch_size: int, max_length: int) -> tuple[list[float], int, int]:
    """The plain loop: input order, pad to the batch's longest. Returns scores, real and
    padded token counts."""
    import torch

    scores: list[float] = []
    real = padded = 0
    with torch.inference_mode():
        for s in range(0, len(answers), batch_size):
            batch = tokenizer(prompts[s:s + batch_size], answers[s:s + batch_size],
                              truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            scores += model(**batch).logits.squeeze(-1).float().tolist()
            real += int(batch["attention_mask"].sum())
            padded += int(batch["attention_mask"].numel())
    return scores, real, padded


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from crome.data.sources import load_source
    from crome.model import ModelOptions, RewardModel, render_plain_prompt
    from crome.score import ScoreOptions, ScoreStats, score_pairs

    set_threads(args.threads)
    source = load_source("hh-rlhf/helpful-base",
                         data_dir=Path(args.data_dir) if args.data_dir else None,
                         limit=args.pairs)
    records = source.records
    print(source.summary())
    rm = RewardModel.create(ModelOptions(max_length=args.max_length))
    rm.model.eval()
    if rm.formatter.mode != "pair_template":
        print(f"note: formatter mode {rm.formatter.mode}: the HF loop's tokens will differ "
              f"from crome's, so the score comparison may cover no sequence")
    opts = ScoreOptions(bf16=False)
    if args.crome_batch_size:
        opts.batch_size = args.crome_batch_size
    # The inputs in score_pairs' order: every chosen answer, then every rejected one.
    raw_prompts = [r.prompt for r in records] * 2
    answers = [r.chosen for r in records] + [r.rejected for r in records]
    prompts = [render_plain_prompt(p) for p in raw_prompts]
    n_answers = len(answers)

    def run_crome() -> tuple[float, list[float], ScoreStats]:
        stats = ScoreStats()
        t0 = time.perf_counter()
        chosen, rejected = score_pairs(rm, records, opts, stats)
        return time.perf_counter() - t0, chosen + rejected, stats

    def run_hf() -> tuple[float, list[float], int, int]:
        t0 = time.perf_counter()
        scores, real, padded = hf_loop(rm.model, rm.tokenizer, prompts, answers,
                                       args.batch_size, args.max_length)
        return time.perf_counter() - t0, scores, real, padded

    # Untimed warm-up of both paths (first-call allocations, lazy inits).
    score_pairs(rm, records[:4], opts)
    hf_loop(rm.model, rm.tokenizer, prompts[:8], answers[:8], args.batch_size, args.max_length)

    crome_times: list[float] = []
    hf_times: list[float] = []
    for k in range(args.repeats):
        # Alternate which goes first, so drifting machine load falls on both.
        for which in (("crome", "hf") if k % 2 == 0 else ("hf", "crome")):
            if which == "crome":
                secs, crome_scores, stats = run_crome()
                crome_times.append(secs)
            else:
                secs, hf_scores, hf_real, hf_padded = run_hf()
                hf_times.append(secs)
            print(f"  run {k + 1} {which}: {n_answers / secs:.1f} answers/s ({secs:.2f} s)",
                  flush=True)

    # Where both made the very same tokens, the scores must agree (up to float rounding).
    encs = rm.formatter.encode_many(raw_prompts, answers)
    hf_enc = rm.tokenizer(prompts, answers, truncation=True, max_length=args.max_length)
    hf_types = hf_enc.get("token_type_ids")
    same = [i for i, e in enumerate(encs)
            if e.input_ids == hf_enc["input_ids"][i]
            and (hf_types is None or e.token_type_ids is None
                 or e.token_type_ids == hf_types[i])]
    diffs = [abs(crome_scores[i] - hf_scores[i]) for i in same]
    max_diff = max(diffs) if diffs else None

    t_crome = statistics.median(crome_times)
    t_hf = statistics.median(hf_times)
    crome_aps, hf_aps = n_answers / t_crome, n_answers / t_hf
    speedup = crome_aps / hf_aps
    res: dict[str, Any] = {
        "benchmark": "score_throughput",
        "settings": {"pairs": len(records), "answers": n_answers,
                     "max_length": args.max_length, "hf_batch_size": args.batch_size,
                     "crome_batch_size": opts.batch_size, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "bf16": False},
        "crome": {"seconds": crome_times, "answers_per_second": round(crome_aps, 3),
                  "non_padding_fraction": round(stats.non_padding_fraction, 4),
                  "real_tokens": stats.real_tokens, "padded_tokens": stats.padded_tokens,
                  "truncation": stats.truncation.__dict__},
        "hf": {"seconds": hf_times, "answers_per_second": round(hf_aps, 3),
               "non_padding_fraction": round(hf_real / hf_padded, 4) if hf_padded else 1.0,
               "real_tokens": hf_real, "padded_tokens": hf_padded},
        "speedup": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "score_check": {"sequences_with_same_tokens": len(same),
                        "sequences_tokenised_differently": n_answers - len(same),
                        "max_abs_difference": max_diff},
    }

    print()
    print(f"{n_answers} answers ({len(records)} helpful-base pairs), max_length "
          f"{args.max_length}, fp32, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} run(s)")
    print(f"{'':22} {'crome':>10} {'HF loop':>10}")
    print(f"{'batch size':22} {opts.batch_size:>10} {args.batch_size:>10}")
    print(f"{'seconds':22} {t_crome:>10.2f} {t_hf:>10.2f}")
    print(f"{'answers/s':22} {crome_aps:>10.1f} {hf_aps:>10.1f}   crome/HF = {speedup:.2f}x "
          f"(target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    print(f"{'non-padding':22} {res['crome']['non_padding_fraction']:>10.1%} "
          f"{res['hf']['non_padding_fraction']:>10.1%}")
    print(f"crome truncation: {stats.truncation.summary()}")
    print(f"same tokens in {len(same)} of {n_answers} sequences (the rest are over-length and "
          f"cut differently); max |crome - HF| score there: "
          f"{'n/a' if max_diff is None else f'{max_diff:.3g}'}")
    write_result(res, args.out)


if __name__ == "__main__":
    main()
