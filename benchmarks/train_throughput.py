"""Training throughput: crome's trainer against TRL's ``RewardTrainer``, side by side.

Arms: ``trl``; ``crome`` (its defaults: on a decoder, prefix sharing where the model passes the
packing probe, ``crome/packing.py``); ``crome-plain`` (prefix sharing off: one row per answer,
crome's length grouping only). Every arm gets the same thing, so that the only difference left
is how it trains:

* the same backbone (``--backbone``: the packaged MiniLM by default, or the packaged
  Qwen2.5-Coder-0.5B-Instruct as ``qwen2.5-coder-0.5b-instruct``, or a path) with the same
  freshly initialised head and, with ``--lora-r``, the same LoRA adapters (every model comes
  from ``RewardModel.create`` with the same seed);
* the same pairs: a seeded sample of the hh-rlhf training sets, encoded *once* by crome's
  ``Formatter`` (``max_length`` tokens, prompt start cut first). TRL is handed those token ids
  pre-tokenised (``chosen_ids``/``rejected_ids``, plus the BERT segment ids, see below), so it
  sees the very same sequences and its ``max_length`` filter drops nothing (counted, not
  assumed);
* the same settings: fp32 (or ``--bf16`` autocast for all), dropout off, batch 16, lr 3e-5,
  linear schedule with crome's 5% warmup, AdamW (torch), no weight decay, no gradient clipping
  (crome does not clip), no gradient checkpointing (crome does not checkpoint; TRL's default
  is on), no eval, no checkpoints, one epoch, the same seed.

Each arm runs in its own subprocess, one after the other, so peak RSS is its own. Pairs/s is
measured over the training loop only (crome: ``TrainSummary.pairs_per_second``; TRL: from
``on_train_begin`` to ``on_train_end``); the whole subprocess wall time is printed beside it.
Afterwards each subprocess scores its trained model with the same code
(``crome.score.score_pairs``, the same ``Formatter`` settings) on the same held-out
helpful-base pairs. Tokens: "computed" counts what the forward passes read (a shared prompt
once), so crome-plain's computed tokens over crome's is the bound prefix sharing can reach.

TRL's stock collator passes ``input_ids`` and ``attention_mask`` only, so a BERT-style model
would be trained with all-zero segment ids while crome (and the scoring) use the pair
template's 0/1 ids. By default the TRL run wraps the stock collator to add the same
``token_type_ids``; ``--trl-stock-collator`` shows what TRL does unaided.

    python benchmarks/train_throughput.py [--pairs 512] [--eval-pairs 500]
    python benchmarks/train_throughput.py --backbone qwen2.5-coder-0.5b-instruct --lora-r 16 \
        --pairs 48 --batch-size 8 --eval-pairs 60 --lr 1e-4

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

from _common import ROOT, add_common_args, set_threads, write_result

TARGETS = {
    "speedup": 2.0,  # crome pairs/s over TRL pairs/s, at least
    "accuracy_gap": 0.01,  # |crome - TRL| held-out accuracy, at most (1 point)
    "non_padding_fraction": 0.95,  # crome, at least
    "peak_rss_gb": 4.0,  # crome, at most
}
WARMUP_RATIO = 0.05  # crome's TrainOptions default; TRL is given the same number of steps
ARMS = ("trl", "crome", "crome-plain")


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
    ap.add_argument("--backbone", default=None,
                    help="a backbone name or path (default: the packaged MiniLM)")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank for every arm (0: full)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for every arm")
    ap.add_argument("--order", default=None,
                    help="the arms, in the order they run (comma-separated; default: "
                         "trl,crome and, with --backbone, crome-plain)")
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
    ap.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


# ------------------------------------------------------------------------- children


def model_options(args: argparse.Namespace) -> Any:
    from crome.model import LoraOptions, ModelOptions

    lora = LoraOptions(r=args.lora_r, alpha=2 * args.lora_r) if args.lora_r else None
    return ModelOptions(backbone=args.backbone, max_length=args.max_length, seed=args.seed,
                        lora=lora)


def held_out_accuracy(rm: Any, work: Path) -> dict[str, Any]:
    """The trained model scored by crome's scorer on the held-out pairs the parent wrote."""
    from crome.data.io import read_pairs
    from crome.evaluate.metrics import overall_accuracy, pair_outcomes
    from crome.score import ScoreOptions, score_pairs

    records = read_pairs(work / "eval.jsonl")
    chosen, rejected = score_pairs(rm, records, ScoreOptions(batch_size=64, bf16=False))
    outcomes = pair_outcomes(records, chosen, rejected)
    return {"accuracy": overall_accuracy(outcomes), "pairs": len(records),
            "ties": sum(o.outcome == "tie" for o in outcomes), "formatting": rm.formatter.mode}


def child_crome(args: argparse.Namespace, work: Path, sharing: bool | None) -> dict[str, Any]:
    from crome.data.io import read_pairs
    from crome.model import RewardModel
    from crome.train import TrainOptions, train

    records = read_pairs(work / "train.jsonl")
    out = work / f"crome-{'plain' if sharing is False else 'model'}"
    t0 = time.perf_counter()
    summary = train(records, TrainOptions(
        output_dir=str(out), model=model_options(args),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_ratio=WARMUP_RATIO, seed=args.seed, bf16=args.bf16, progress=False,
        prefix_sharing=sharing))
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "pairs_in": len(records),
        "pairs_trained": round(summary.pairs * args.epochs) - summary.skipped_tail_pairs,
        "steps": summary.steps,
        "loop_seconds": summary.seconds,
        "pairs_per_second": summary.pairs_per_second,
        "train_call_seconds": round(wall, 3),
        "non_padding_fraction": summary.non_padding_fraction,
        "real_tokens": summary.real_tokens + summary.shared_tokens,
        "computed_tokens": summary.real_tokens,
        "padded_tokens": summary.padded_tokens,
        "prefix_sharing": summary.prefix_sharing,
        "final_loss": summary.final_loss,
        "truncation": summary.truncation,
        "peak_rss_bytes": peak,
        "held_out": held_out_accuracy(RewardModel.load(out), work),
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
    from crome.model import RewardModel, TruncationCounts
    from crome.train import encode_pairs

    t_start = time.perf_counter()
    records = read_pairs(work / "train.jsonl")
    # The same model crome's train() builds: seed, then create (head seeded, dropout off,
    # the same LoRA adapters).
    set_seed(args.seed)
    rm = RewardModel.create(model_options(args))
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
        bf16=args.bf16,
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
    rm.model = trainer.accelerator.unwrap_model(trainer.model)
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
        "computed_tokens": collator.real_tokens,
        "padded_tokens": collator.padded_tokens,
        "final_loss": result.training_loss,
        "truncation": counts.__dict__,
        "dropout_p_max": max(dropouts, default=0.0),
        "token_type_ids": not args.trl_stock_collator and rm.formatter.uses_type_ids,
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        "sampling": args.trl_sampling,
        "peak_rss_bytes": peak,
        "held_out": held_out_accuracy(rm, work),
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


def _gb(n: int) -> float:
    return round(n / 1e9, 3)


def report(res: dict[str, Any]) -> None:
    arms = res["arms"]
    names = list(arms)
    t = arms["trl"]
    st = res["settings"]

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    def acc(r: dict[str, Any]) -> str:
        a = r["held_out"]["accuracy"]
        return "n/a" if a is None else f"{a:.4f}"

    print()
    print(f"backbone {st['backbone'] or 'MiniLM (packaged)'}, "
          f"{'LoRA r=' + str(st['lora_r']) if st['lora_r'] else 'full fine-tuning'}; "
          f"training: {t['pairs_in']} pairs, max_length {st['max_length']}, "
          f"batch {st['batch_size']}, lr {st['lr']}, {st['epochs']} epoch(s), seed {st['seed']}, "
          f"{'bf16 autocast' if st['bf16'] else 'fp32'}, dropout off")
    print(f"TRL: dropped {t['pairs_dropped_by_trl']} of {t['pairs_in']} pairs "
          f"(pairs over max_length handed to it: {t['over_length_pairs_given']}); "
          f"TRL options: token_type_ids {'on' if t['token_type_ids'] else 'off'}, "
          f"gradient checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, "
          f"sampling {t['sampling']}, max dropout p {t['dropout_p_max']}")
    tokens = {n: arms[n]["real_tokens"] for n in names}
    print(f"answer+prompt tokens trained: {tokens} "
          f"({'the same' if len(set(tokens.values())) == 1 else 'DIFFERENT'})")
    for n in names:
        if n != "trl":
            print(f"{n}: prefix sharing {'on' if arms[n]['prefix_sharing'] else 'off'}; "
                  f"truncation {arms[n]['truncation']}")
    rows = [
        ("pairs trained", lambda r: f"{r['pairs_trained']}"),
        ("optimizer steps", lambda r: f"{r['steps']}"),
        ("training loop s", lambda r: f"{r['loop_seconds']:.1f}"),
        ("pairs/s", lambda r: f"{r['pairs_per_second']:.3f}"),
        ("x TRL", lambda r: f"{r['pairs_per_second'] / t['pairs_per_second']:.2f}"),
        ("process wall s", lambda r: f"{r['process_wall_seconds']:.1f}"),
        ("tokens computed", lambda r: f"{r['computed_tokens']}"),
        ("non-padding", lambda r: f"{r['non_padding_fraction']:.1%}"),
        ("peak RSS GB", lambda r: f"{_gb(r['peak_rss_bytes']):.2f}"),
        ("final train loss", lambda r: f"{r['final_loss']:.4f}"),
        (f"accuracy ({t['held_out']['pairs']})", acc),
    ]
    print(f"{'':18}" + "".join(f"{n:>13}" for n in names))
    for label, fmt in rows:
        print(f"{label:18}" + "".join(f"{fmt(arms[n]):>13}" for n in names))
    speed, gap = res["speedup"], res["accuracy_gap"]
    print(f"crome/TRL = {speed:.2f}x (target >= {TARGETS['speedup']}x: "
          f"{mark(speed >= TARGETS['speedup'])}); accuracy |gap| = "
          + ("n/a" if gap is None else f"{gap * 100:.2f} points (target <= "
             f"{TARGETS['accuracy_gap'] * 100:.0f}: {mark(gap <= TARGETS['accuracy_gap'])})"))
    if "crome-plain" in arms:
        p = arms["crome-plain"]
        bound = p["computed_tokens"] / arms["crome"]["computed_tokens"]
        ratio = arms["crome"]["pairs_per_second"] / p["pairs_per_second"]
        print(f"prefix sharing: crome/crome-plain = {ratio:.2f}x; token bound "
              f"{bound:.2f}x (crome-plain's computed tokens / crome's): {ratio / bound:.0%} "
              "of it")
    print("the CPU: " + res["cpu"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_threads(args.threads)
    if args.child:
        work = Path(args.work_dir)
        if args.child == "trl":
            result = child_trl(args, work)
        else:
            result = child_crome(args, work, False if args.child == "crome-plain" else None)
        (work / f"{args.child}-result.json").write_text(json.dumps(result, indent=2))
        return

    from crome.data.io import write_pairs
    from crome.data.sources import load_source
    from crome.doctor import cpu_name
    from crome.experiment import training_pairs

    order = [k.strip() for k in (args.order or (
        "trl,crome,crome-plain" if args.backbone else "trl,crome")).split(",") if k.strip()]
    if not {"trl", "crome"} <= set(order) or not set(order) <= set(ARMS):
        raise SystemExit(f"--order must name trl and crome, and only arms of {ARMS}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="crome-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.backbone:  # build a named backbone once, before the timed children
            from crome.backbones import resolve_backbone

            resolve_backbone(args.backbone)
        log: list[str] = []
        records = training_pairs(Path(args.data_dir) if args.data_dir else None,
                                 args.pairs, args.seed, log)
        for line in log:
            print(line)
        write_pairs(records, work / "train.jsonl")
        held_out = load_source("hh-rlhf/helpful-base", data_dir=args.data_dir,
                               limit=args.eval_pairs)
        write_pairs(held_out.records, work / "eval.jsonl")
        # The children get the same options, minus the ones only the parent uses.
        child_argv = list(argv)
        arms: dict[str, Any] = {}
        for kind in order:
            print(f"running {kind} ...", flush=True)
            arms[kind] = run_child(kind, child_argv, work)
            print(f"  {kind}: {arms[kind]['pairs_per_second']:.3f} pairs/s over "
                  f"{arms[kind]['loop_seconds']:.1f} s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    c, t = arms["crome"], arms["trl"]
    a_c, a_t = c["held_out"]["accuracy"], t["held_out"]["accuracy"]
    res = {
        "benchmark": "train_throughput",
        "cpu": cpu_name(),
        "settings": {"pairs": args.pairs, "eval_pairs": args.eval_pairs,
                     "backbone": args.backbone, "lora_r": args.lora_r,
                     "max_length": args.max_length, "batch_size": args.batch_size,
                     "lr": args.lr, "epochs": args.epochs, "seed": args.seed,
                     "threads": args.threads, "order": order,
                     "bf16": args.bf16, "dropout": False},
        "held_out": held_out.summary(),
        "arms": arms,
        "speedup": (c["pairs_per_second"] / t["pairs_per_second"]
                    if t["pairs_per_second"] else None),
        "accuracy_gap": (abs(a_c - a_t) if a_c is not None and a_t is not None else None),
        "targets": TARGETS,
    }
    report(res)
    write_result(res, args.out)


if __name__ == "__main__":
    main()
