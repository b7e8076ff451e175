"""Training throughput: crome's trainer against TRL's ``RewardTrainer``, side by side.

Both trainers get the same thing, so that the only difference left is how they train:

* the same backbone (the packaged MiniLM) with the same freshly initialised head (both models
  come from ``RewardModel.create`` with the same seed);
* the same pairs: a seeded sample of the hh-rlhf training sets, encoded *once* by crome's
  ``Formatter`` (``max_length`` tokens, prompt start cut first). TRL is handed those token ids
  pre-tokenised (``chosen_ids``/``rejected_ids``, plus the BERT segment ids, see below), so it
  sees the very same sequences and its ``max_length`` filter drops nothing (counted, not
  assumed);
* the same settings: fp32, dropout off, batch 16, lr 3e-5, linear schedule with crome's 5%
  warmup, AdamW (torch), no weight decay, no gradient clipping (crome does not clip), no
  gradient checkpointing (crome does not checkpoint; TRL's default is on), no eval, no
  checkpoints, one epoch, the same seed.

Each trainer runs in its own subprocess, one after the other, so peak RSS is its own. Pairs/s
is measured over the training loop only (crome: ``TrainSummary.pairs_per_second``; TRL: from
``on_train_begin`` to ``on_train_end``); the whole subprocess wall time is printed beside it.
Afterwards both trained models are scored by the same code (``crome.score.score_pairs``, the
same ``Formatter`` settings) on held-out helpful-base pairs.

TRL's stock collator passes ``input_ids`` and ``attention_mask`` only, so a BERT-style model
would be trained with all-zero segment ids while crome (and the scoring) use the pair
template's 0/1 ids. By default the TRL run wraps the stock collator to add the same
``token_type_ids``; ``--trl-stock-collator`` shows what TRL does unaided.

    python benchmarks/train_throughput.py [--pairs 512] [--eval-pairs 500]

No timed assertions: it prints, and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, add_common_args, set_threads

TARGETS = {
    "speedup": 2.0,  # crome pairs/s over TRL pairs/s, at least
    "accuracy_gap": 0.01,  # |crome - TRL| held-out accuracy, at most (1 point)
    "non_padding_fraction": 0.95,  # crome, at least
    "peak_rss_gb": 4.0,  # crome, at most
}
WARMUP_RATIO = 0.05  # crome's TrainOptions default; TRL is given the same number of steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=512, help="training pairs (seeded sample)")
    ap.add_argument("--eval-pairs", type=int, default=500,
                    help="held-out helpful-base pairs (the first N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", default="trl,crome",
                    help="which trainer runs first (comma-separated)")
    add_common_args(ap, "runs/bench/train_throughput.json",
                    "torch threads in both runs (default: torch's own choice)")
    ap.add_argument("--work-dir", default=None,
                    help="where the two trained models go (default: a temporary folder, "
                         "deleted afterwards)")
    ap.add_argument("--trl-stock-collator", action="store_true",
                    help="TRL's collator as is (no token_type_ids)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="keep TRL's default gradient checkpointing (off for parity)")
    ap.add_argument("--trl-sampling", default="random", choices=["random", "group_by_length"],
                    help="TRL's train_sampling_strategy (its default: random)")
    ap.add_argument("--child", choices=["crome", "trl"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


# ------------------------------------------------------------------------- children


def child_crome(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from crome.data.io import read_pairs
    from crome.model import ModelOptions
    from crome.train import TrainOptions, train

    records = read_pairs(work / "train.jsonl")
    t0 = time.perf_counter()
    summary = train(records, TrainOptions(
        output_dir=str(work / "crome-model"),
        model=ModelOptions(max_length=args.max_length, seed=args.seed),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_ratio=WARMUP_RATIO, seed=args.seed, bf16=False, progress=False))
    wall = time.perf_counter() - t0
    return {
        "pairs_in": len(records),
        "pairs_trained": round(summary.pairs * args.epochs) - summary.skipped_tail_pairs,
        "steps": summary.steps,
        "loop_seconds": summary.seconds,
        "pairs_per_second": summary.pairs_per_second,
        "train_call_seconds": round(wall, 3),
        "non_padding_fraction": summary.non_padding_fraction,
        "real_tokens": summary.real_tokens,
        "padded_tokens": summary.padded_tokens,
        "final_loss": summary.final_loss,
        "truncation": summary.truncation,
        "peak_rss_bytes": peak_rss_bytes(),
    }


class CountingCollator:
    """TRL's ``DataCollatorForPreference`` plus, unless ``stock``, crome's segment ids; counts
    the pairs and the real and padded tokens of every batch it makes."""

    def __init__(self, base: Any, stock: bool) -> None:
        self.base = base
        self.stock = stock
        self.pairs = 0
        self.batches = 0
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out = self.base(examples)
        if not self.stock and examples[0].get("chosen_type_ids") is not None:
            rows = ([e["chosen_type_ids"] for e in examples]
                    + [e["rejected_type_ids"] for e in examples])
            types = torch.zeros_like(out["input_ids"])
            for i, r in enumerate(rows):
                types[i, :len(r)] = torch.tensor(r)
            out["token_type_ids"] = types
        self.pairs += len(examples)
        self.batches += 1
        self.real_tokens += int(out["attention_mask"].sum())
        self.padded_tokens += int(out["attention_mask"].numel())
        return out


def child_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from crome.data.io import read_pairs
    from crome.model import ModelOptions, RewardModel, TruncationCounts
    from crome.train import encode_pairs

    t_start = time.perf_counter()
    records = read_pairs(work / "train.jsonl")
    # The same model crome's train() builds: seed, then create (head seeded, dropout off).
    set_seed(args.seed)
    rm = RewardModel.create(ModelOptions(max_length=args.max_length, seed=args.seed))
    counts = TruncationCounts()
    pairs = encode_pairs(rm, records, counts)  # crome's own encoding, as in train()
    columns: dict[str, list[Any]] = {
        "chosen_ids": [p.first.input_ids for p in pairs],
        "rejected_ids": [p.second.input_ids for p in pairs],
        "length": [p.length for p in pairs],
    }
    if rm.formatter.uses_type_ids:
        columns["chosen_type_ids"] = [p.first.token_type_ids for p in pairs]
        columns["rejected_type_ids"] = [p.second.token_type_ids for p in pairs]
    dataset = Dataset.from_dict(columns)
    over_length = sum(len(p.first) > args.max_length or len(p.second) > args.max_length
                      for p in pairs)

    total_steps = math.ceil(math.ceil(len(pairs) / args.batch_size) * args.epochs)
    config = RewardConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        warmup_steps=int(WARMUP_RATIO * total_steps),
        weight_decay=0.0,
        max_grad_norm=0.0,  # crome does not clip
        optim="adamw_torch",  # crome: torch.optim.AdamW
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        # transformers 5 renamed gradient_checkpointing (TRL's default: on) to this.
        activation_checkpointing=args.trl_gradient_checkpointing,
        disable_dropout=True,
        max_length=args.max_length,
        train_sampling_strategy=args.trl_sampling,
        remove_unused_columns=False,  # keep the segment-id columns for the collator
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    collator = CountingCollator(DataCollatorForPreference(pad_token_id=rm.tokenizer.pad_token_id),
                                stock=args.trl_stock_collator)
    times: dict[str, float] = {}

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = time.perf_counter()

    trainer = RewardTrainer(model=rm.model, args=config, train_dataset=dataset,
                            processing_class=rm.tokenizer, data_collator=collator,
                            callbacks=[LoopTimer()])
    kept = len(trainer.train_dataset)
    dropouts = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    result = trainer.train()
    loop = times["end"] - times["begin"]
    peak = peak_rss_bytes()
    trainer.save_model(str(work / "trl-model"))
    return {
        "pairs_in": len(pairs),
        "pairs_after_trl_filter": kept,
        "pairs_dropped_by_trl": len(pairs) - kept,
        "over_length_pairs_given": over_length,
        "pairs_trained": collator.pairs,
        "steps": result.global_step,
        "loop_seconds": round(loop, 3),
        "pairs_per_second": round(collator.pairs / loop, 3) if loop else 0.0,
        "trainer_train_runtime": result.metrics.get("train_runtime"),
        "setup_and_train_seconds": round(time.perf_counter() - t_start, 3),
        "non_padding_fraction": (round(collator.real_tokens / collator.padded_tokens, 4)
                                 if collator.padded_tokens else 1.0),
        "real_tokens": collator.real_tokens,
        "padded_tokens": collator.padded_tokens,
        "final_loss": result.training_loss,
        "truncation": counts.__dict__,
        "dropout_p_max": max(dropouts, default=0.0),
        "token_type_ids": not args.trl_stock_collator and rm.formatter.uses_type_ids,
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        "sampling": args.trl_sampling,
        "peak_rss_bytes": peak,
    }


def run_child(kind: str, argv: list[str], work: Path) -> dict[str, Any]:
    """Run one trainer in a fresh interpreter; its result comes back as a JSON file."""
    out = work / f"{kind}-result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv,
           "--child", kind, "--work-dir", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-10000:])
        raise SystemExit(f"the {kind} run failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["process_wall_seconds"] = round(wall, 3)
    return result


# ------------------------------------------------------------------------- parent


def held_out_accuracy(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both trained models scored by the same code on the same held-out pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from crome.data.sources import load_source
    from crome.evaluate.metrics import overall_accuracy, pair_outcomes
    from crome.model import RewardModel, RewardModelMeta, default_backbone
    from crome.score import ScoreOptions, ScoreStats, score_pairs

    source = load_source("hh-rlhf/helpful-base", data_dir=args.data_dir, limit=args.eval_pairs)
    records = source.records
    crome_rm = RewardModel.load(work / "crome-model")
    tok = AutoTokenizer.from_pretrained(work / "trl-model")
    model = AutoModelForSequenceClassification.from_pretrained(
        work / "trl-model", num_labels=1, dtype=torch.float32)
    trl_rm = RewardModel(model.eval(), tok, RewardModelMeta(
        backbone=default_backbone(), max_length=crome_rm.meta.max_length,
        min_prompt_tokens=crome_rm.meta.min_prompt_tokens))
    out: dict[str, Any] = {"source": source.summary(), "pairs": len(records)}
    for name, rm in (("crome", crome_rm), ("trl", trl_rm)):
        stats = ScoreStats()
        chosen, rejected = score_pairs(rm, records, ScoreOptions(batch_size=64, bf16=False),
                                       stats)
        outcomes = pair_outcomes(records, chosen, rejected)
        out[name] = {"accuracy": overall_accuracy(outcomes),
                     "ties": sum(o.outcome == "tie" for o in outcomes),
                     "formatting": rm.formatter.mode}
    return out


def _gb(n: int) -> float:
    return round(n / 1e9, 3)


def report(res: dict[str, Any]) -> None:
    c, t, acc = res["crome"], res["trl"], res["accuracy"]
    speed = res["speedup"]
    gap = res["accuracy_gap"]

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    print()
    print(f"training: {c['pairs_in']} pairs, max_length {res['settings']['max_length']}, "
          f"batch {res['settings']['batch_size']}, lr {res['settings']['lr']}, "
          f"{res['settings']['epochs']} epoch(s), seed {res['settings']['seed']}, fp32, dropout off")
    print(f"TRL: dropped {t['pairs_dropped_by_trl']} of {t['pairs_in']} pairs "
          f"(pairs over max_length handed to it: {t['over_length_pairs_given']}); "
          f"crome truncation: {c['truncation']}")
    same = c["real_tokens"] == t["real_tokens"]
    print(f"real (non-padding) tokens trained: crome {c['real_tokens']}, TRL {t['real_tokens']}"
          f" ({'the same' if same else 'DIFFERENT: the two runs did not see the same tokens'})")
    print(f"TRL options: token_type_ids {'on' if t['token_type_ids'] else 'off'}, "
          f"gradient checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, "
          f"sampling {t['sampling']}, max dropout p {t['dropout_p_max']}")
    rows = [
        ("pairs trained", f"{c['pairs_trained']}", f"{t['pairs_trained']}", ""),
        ("optimizer steps", f"{c['steps']}", f"{t['steps']}", ""),
        ("training loop s", f"{c['loop_seconds']:.1f}", f"{t['loop_seconds']:.1f}", ""),
        ("pairs/s", f"{c['pairs_per_second']:.2f}", f"{t['pairs_per_second']:.2f}",
         f"crome/TRL = {speed:.2f}x (target >= {TARGETS['speedup']}x: "
         f"{mark(speed >= TARGETS['speedup'])})"),
        ("process wall s", f"{c['process_wall_seconds']:.1f}", f"{t['process_wall_seconds']:.1f}",
         "whole subprocess: imports, model load, encoding, training, save"),
        ("non-padding", f"{c['non_padding_fraction']:.1%}", f"{t['non_padding_fraction']:.1%}",
         f"target crome >= {TARGETS['non_padding_fraction']:.0%}: "
         f"{mark(c['non_padding_fraction'] >= TARGETS['non_padding_fraction'])}"),
        ("peak RSS GB", f"{_gb(c['peak_rss_bytes']):.2f}", f"{_gb(t['peak_rss_bytes']):.2f}",
         f"target crome <= {TARGETS['peak_rss_gb']} GB: "
         f"{mark(_gb(c['peak_rss_bytes']) <= TARGETS['peak_rss_gb'])}"),
        ("final train loss", f"{c['final_loss']:.4f}", f"{t['final_loss']:.4f}",
         "crome: last step; TRL: mean over the run"),
        (f"accuracy ({acc['pairs']})",
         "n/a" if acc["crome"]["accuracy"] is None else f"{acc['crome']['accuracy']:.4f}",
         "n/a" if acc["trl"]["accuracy"] is None else f"{acc['trl']['accuracy']:.4f}",
         "n/a" if gap is None else f"|gap| = {gap * 100:.2f} points (target <= "
         f"{TARGETS['accuracy_gap'] * 100:.0f}: {mark(gap <= TARGETS['accuracy_gap'])})"),
    ]
    print(f"{'':18} {'crome':>10} {'TRL':>10}")
    for name, a, b, note in rows:
        print(f"{name:18} {a:>10} {b:>10}   {note}")
    print(f"held-out: {acc['source']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_threads(args.threads)
    if args.child:
        work = Path(args.work_dir)
        result = child_crome(args, work) if args.child == "crome" else child_trl(args, work)
        (work / f"{args.child}-result.json").write_text(json.dumps(result, indent=2))
        return

    from crome.data.io import write_pairs
    from crome.experiment import training_pairs

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="crome-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log: list[str] = []
        records = training_pairs(Path(args.data_dir) if args.data_dir else None,
                                 args.pairs, args.seed, log)
        for line in log:
            print(line)
        write_pairs(records, work / "train.jsonl")
        # The children get the same options, minus the ones only the parent uses.
        child_argv = list(argv)
        results: dict[str, Any] = {}
        for kind in [k.strip() for k in args.order.split(",") if k.strip()]:
            print(f"running {kind} ...", flush=True)
            results[kind] = run_child(kind, child_argv, work)
            print(f"  {kind}: {results[kind]['pairs_per_second']:.2f} pairs/s over "
                  f"{results[kind]['loop_seconds']:.1f} s", flush=True)
        if set(results) != {"crome", "trl"}:
            raise SystemExit("--order must name both crome and trl")
        print("scoring both models on held-out pairs ...", flush=True)
        acc = held_out_accuracy(work, args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    c, t = results["crome"], results["trl"]
    a_c, a_t = acc["crome"]["accuracy"], acc["trl"]["accuracy"]
    res = {
        "benchmark": "train_throughput",
        "settings": {"pairs": args.pairs, "eval_pairs": args.eval_pairs,
                     "max_length": args.max_length, "batch_size": args.batch_size,
                     "lr": args.lr, "epochs": args.epochs, "seed": args.seed,
                     "threads": args.threads, "order": args.order,
                     "bf16": False, "dropout": False},
        "crome": c,
        "trl": t,
        "accuracy": acc,
        "speedup": (c["pairs_per_second"] / t["pairs_per_second"]
                    if t["pairs_per_second"] else None),
        "accuracy_gap": (abs(a_c - a_t) if a_c is not None and a_t is not None else None),
        "targets": TARGETS,
    }
    report(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
