"""``crome quickstart``: the main job on embedded defaults, end to end on real data.

Train the packaged MiniLM on the hh-rlhf training sets (helpful-online +
helpful-rejection-sampled), evaluate it beside the reference scorers on the held-out sets
(helpful-base, harmless-base, LLMBar, XSTest), print one table and write everything to a run
folder. The Crome stages (augmentation, filtering) will slot in before ``train``.

The default budget is sized for a 2-core CPU (under 20 minutes there): sequences are capped
at 128 tokens (the prompt start is cut first; counts are in ``train_summary.json``), one
epoch over all 3,847 valid training pairs, every held-out pair scored.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crome.data.schema import PairRecord
from crome.data.sources import load_source, resolve_data_dir
from crome.evaluate.reference import REFERENCE_SCORERS
from crome.evaluate.run import HELD_OUT, evaluate_scorer, load_eval_sets
from crome.model import ModelOptions, RewardModel
from crome.score import RewardModelScorer, ScoreOptions
from crome.train import TrainOptions, train

TRAIN_SOURCES = ("hh-rlhf/helpful-online", "hh-rlhf/helpful-rejection-sampled")


@dataclass
class QuickstartOptions:
    output_dir: str = "runs/quickstart"
    data_dir: str | None = None
    max_train: int | None = None  # training pairs (a seeded sample); None = all
    max_eval: int | None = None  # pairs per held-out subset (the first N); None = all
    max_length: int = 128
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    progress: bool = True


def training_pairs(data_dir: Path | None, max_train: int | None, seed: int,
                   log: list[str]) -> list[PairRecord]:
    records: list[PairRecord] = []
    for name in TRAIN_SOURCES:
        res = load_source(name, data_dir=data_dir)
        log.append(res.summary())
        records += res.records
    if max_train is not None and max_train < len(records):
        records = random.Random(seed).sample(records, max_train)
    return records


def quickstart(options: QuickstartOptions | None = None,
               echo: Any = print) -> dict[str, Any]:
    """Run the main job; returns the results that ``summary.json`` holds."""
    opts = options or QuickstartOptions()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(opts.data_dir)
    t0 = time.perf_counter()
    log: list[str] = []
    train_records = training_pairs(data_dir, opts.max_train, opts.seed, log)
    sets = load_eval_sets(HELD_OUT, data_dir=data_dir, limit=opts.max_eval)
    for es in sets:
        skipped = sum(es.skipped.values())
        log.append(f"{es.name}: {len(es.records)} held-out pairs"
                   + (f", {skipped} skipped at load ({es.skipped})" if skipped else ""))
    for line in log:
        echo(line)

    rm_dir = out / "rm"
    summary = train(train_records, TrainOptions(
        output_dir=str(rm_dir), model=ModelOptions(max_length=opts.max_length),
        epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
        progress=opts.progress))
    t_train = time.perf_counter() - t0

    rm = RewardModel.load(rm_dir)
    scorers = [cls() for cls in REFERENCE_SCORERS.values()]
    scorers.append(RewardModelScorer(rm, ScoreOptions(batch_size=64), name="crome-rm"))
    results: dict[str, Any] = {}
    for scorer in scorers:
        echo(f"evaluating {scorer.name} ...")
        results[scorer.name] = evaluate_scorer(scorer, sets, out / "eval")
    elapsed = time.perf_counter() - t0
    table = results_table(results)
    report = {
        "options": asdict(opts),
        "data_dir": str(data_dir),
        "train": asdict(summary),
        "train_sources": list(TRAIN_SOURCES),
        "held_out": list(HELD_OUT),
        "seconds": {"train_and_load": round(t_train, 1), "total": round(elapsed, 1)},
        "table": table,
        "log": log,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "summary.md").write_text(markdown_table(table) + "\n")
    echo(markdown_table(table))
    echo(f"trained on {summary.pairs} pairs in {summary.seconds:.0f} s "
         f"({summary.pairs_per_second:.2f} pairs/s); total {elapsed / 60:.1f} min; "
         f"run folder: {os.fspath(out)}")
    return report


def results_table(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{row: {scorer: value}}``: accuracy rows (ties wrong), then bias figures."""
    rows: dict[str, dict[str, Any]] = {}
    for scorer, res in results.items():
        for label, cell in res["headline"].items():
            rows.setdefault(f"{label} (n={cell['n']})", {})[scorer] = cell["accuracy"]
        for set_name, summ in res["sets"].items():
            rb = summ.get("rewardbench")
            if rb:
                for section, value in rb["sections"].items():
                    rows.setdefault(f"RewardBench {section} (partial: {set_name})",
                                    {})[scorer] = value
        hb = res["sets"].get("hh-rlhf/helpful-base")
        if hb:
            lb = hb["length_bias"]
            rows.setdefault("helpful-base: acc. where rejected is longer", {})[scorer] = \
                lb["accuracy_rejected_longer"]
            rows.setdefault("helpful-base: Spearman(reward, length)", {})[scorer] = \
                lb["spearman"]
    return rows


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    scorers = list(dict.fromkeys(s for row in table.values() for s in row))
    lines = ["| held-out set | " + " | ".join(scorers) + " |",
             "|---|" + "---:|" * len(scorers)]
    for label, row in table.items():
        cells = []
        for s in scorers:
            v = row.get(s)
            if v is None:
                cells.append("–")
            elif "Spearman" in label:
                cells.append(f"{v:+.2f}")
            else:
                cells.append(f"{100 * v:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
