"""The vanilla RM's learning curve: does the baseline learn anything, and on how much data?

Trains the experiment's vanilla arm (``crome.experiment.arm_train_options``: the same
options, only the data size, epochs and seed vary) on a seeded sample of every training pair
(``crome.experiment.TRAIN_SOURCES``: hh-rlhf online + rejection-sampled, UltraFeedback,
oasst1), for each cell of ``--pairs`` × ``--epochs`` × ``--seeds``, and evaluates each model
on held-out sets only: hh-rlhf helpful-base (``--max-eval`` pairs), UltraFeedback eval and the
full RewardBench (its four sections and their mean). "Longer wins" is evaluated beside them:
the bar for vanilla is a RewardBench average of at least 60 and more than "longer wins" on
Chat Hard.

Every cell is a folder under ``--out`` (model and evaluation); a re-run skips finished cells, so
a killed run resumes. The table, of every finished cell under ``--out`` (earlier runs' too), goes
to ``<out>/curve.md`` and ``<out>/curve.json``, with the CPU named and each cell's training
loss (the mean of the last logging window) beside ln 2.

    python benchmarks/vanilla_curve.py --pairs 1000,3000,0 --epochs 1,2,3
    python benchmarks/vanilla_curve.py --backbone qwen2.5-coder-0.5b-instruct --lora-r 16 \\
        --pairs 1000 --epochs 1 --batch-size 8 --max-length 256

``--pairs 0`` is every training pair. No timed assertions: it prints and writes figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _common import set_threads  # noqa: E402  (makes the checkout importable)

from crome.data.sources import resolve_data_dir
from crome.doctor import cpu_name
from crome.evaluate.reference import LongerWins
from crome.evaluate.run import evaluate_scorer, load_eval_sets
from crome.experiment import arm_train_options, preset_options, training_pairs
from crome.model import RewardModel
from crome.score import ScoreOptions, model_scorer
from crome.train import train

EVAL_SETS = ("hh-rlhf/helpful-base", "ultrafeedback/eval")


def figures(results: dict) -> dict[str, float | None]:
    """helpful-base, UltraFeedback eval, and RewardBench's sections and average."""
    sets = results["sets"]
    row: dict[str, float | None] = {
        "helpful-base": sets["hh-rlhf/helpful-base"]["accuracy"],
        "UltraFeedback eval": sets["ultrafeedback/eval"]["accuracy"],
    }
    rb = sets["rewardbench"]["rewardbench"]
    row.update({f"RB {k}": v for k, v in rb["sections"].items()})
    row["RB average"] = rb["average"]
    return row


def cell_name(pairs: int, epochs: float, seed: int) -> str:
    return f"{pairs or 'all'}-pairs_{epochs:g}-epochs_seed-{seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="default: the packaged MiniLM")
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--pairs", default="1000,3000,0", help="training pairs per cell; 0 = all")
    ap.add_argument("--epochs", default="1,2,3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-eval", type=int, default=500, help="helpful-base pairs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/vanilla-curve")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    data_dir = resolve_data_dir(args.data_dir)
    log: list[str] = []
    everything = training_pairs(data_dir, None, 0, log)
    for line in log:
        print(line)
    sets = load_eval_sets(EVAL_SETS[:1], data_dir=data_dir, limit=args.max_eval)
    sets += load_eval_sets(EVAL_SETS[1:] + ("rewardbench",), data_dir=data_dir)
    print("held out: " + ", ".join(f"{s.name} {len(s.records)}" for s in sets))

    reference = out / "longer-wins"
    if not (reference / "results-longer-wins.json").exists():
        evaluate_scorer(LongerWins(), sets, reference)
    rows = {"longer wins": {"cell": None, **figures(
        json.loads((reference / "results-longer-wins.json").read_text()))}}
    cpu = cpu_name()
    for n in (int(x) for x in args.pairs.split(",")):
        records = everything if n == 0 or n >= len(everything) else \
            random.Random(0).sample(everything, n)
        for epochs in (float(x) for x in args.epochs.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                name = cell_name(n, epochs, seed)
                cell = out / name
                opts = preset_options(output_dir=str(out), backbone=args.backbone,
                                      lora_r=args.lora_r, max_length=args.max_length,
                                      batch_size=args.batch_size, lr=args.lr, epochs=epochs,
                                      progress=False)
                summary_file = cell / "train-summary.json"
                if not summary_file.exists():
                    t0 = time.perf_counter()
                    summary = train(records, arm_train_options(cell / "model", seed, opts))
                    summary_file.parent.mkdir(parents=True, exist_ok=True)
                    summary_file.write_text(json.dumps(asdict(summary), indent=2) + "\n")
                    print(f"{name}: trained {len(records)} pairs in "
                          f"{time.perf_counter() - t0:.0f} s, loss {summary.final_loss}",
                          flush=True)
                if not (cell / RESULTS).exists():
                    scorer = model_scorer(RewardModel.load(cell / "model"),
                                          ScoreOptions(batch_size=64), name="vanilla")
                    evaluate_scorer(scorer, sets, cell / "eval")
                row = cell_row(cell)
                print(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in row.items()
                                             if k != "cell" and v is not None), flush=True)
    # every finished cell under --out, this run's and earlier runs' (same settings: --out is
    # the experiment's folder), in the order pairs, epochs, seed
    done = sorted((c for c in out.iterdir() if CELL.fullmatch(c.name)
                   and (c / "train-summary.json").exists() and (c / RESULTS).exists()),
                  key=lambda c: tuple(cell_row(c)["cell"][k] for k in ("pairs", "epochs", "seed")))
    rows.update({c.name: cell_row(c) for c in done})
    write(out, rows, cpu, args)


RESULTS = Path("eval") / "results-vanilla.json"
CELL = re.compile(r"(\w+)-pairs_([\d.]+)-epochs_seed-(\d+)")


def cell_row(cell: Path) -> dict:
    """A finished cell's training figures and held-out accuracies."""
    summary = json.loads((cell / "train-summary.json").read_text())
    match = CELL.fullmatch(cell.name)
    assert match is not None, cell
    return {"cell": {"pairs": summary["pairs"], "epochs": float(match.group(2)),
                     "seed": int(match.group(3)), "steps": summary["steps"],
                     "final_loss": summary["final_loss"], "seconds": summary["seconds"]},
            **figures(json.loads((cell / RESULTS).read_text()))}


def write(out: Path, rows: dict, cpu: str, args: argparse.Namespace) -> None:
    cols = [k for k in next(iter(rows.values())) if k != "cell"]
    lines = [f"Vanilla learning curve: backbone {args.backbone or 'packaged MiniLM'}"
             f"{f', LoRA r={args.lora_r}' if args.lora_r else ''}, max_length "
             f"{args.max_length}, batch {args.batch_size}, lr {args.lr}; CPU: {cpu}. "
             f"Accuracy in %; ln 2 = {math.log(2):.4f}.", "",
             "| model | pairs | epochs | seed | steps | final loss | train s | "
             + " | ".join(cols) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for name, row in rows.items():
        c = row["cell"] or {}
        lines.append(
            f"| {name} | {c.get('pairs', '–')} | {c.get('epochs', '–')} | "
            f"{c.get('seed', '–')} | {c.get('steps', '–')} | "
            f"{fmt(c.get('final_loss'), '.4f')} | {fmt(c.get('seconds'), '.0f')} | "
            + " | ".join(fmt(None if row[k] is None else 100 * row[k], ".1f") for k in cols)
            + " |")
    text = "\n".join(lines)
    (out / "curve.md").write_text(text + "\n")
    (out / "curve.json").write_text(json.dumps({"cpu": cpu, "args": vars(args), "rows": rows},
                                               indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'curve.md'} and {out / 'curve.json'}")


if __name__ == "__main__":
    sys.exit(main())
