"""``crome quickstart``: the whole Crome pipeline on embedded defaults, vanilla vs Crome.

1. **vanilla RM**: the packaged MiniLM trained on a seeded sample of the hh-rlhf training
   pairs (helpful-online + helpful-rejection-sampled). It is also the filter's baseline.
2. **rubrics** for a small subset of those pairs, from the oracle (default: the packaged
   Qwen2.5-Coder-1.5B-Instruct, in-process).
3. **causal pairs** for that subset (degrade the chosen answer, upgrade the rejected one,
   along each pair's first rubric attribute), guarded and counted.
4. **neutral pairs** (Irrelevant Query Neutrals) from a sample of the training pairs and from
   every causal pair.
5. **filter**: the vanilla RM keeps the augmented pairs it gets wrong or is unsure about.
6. **Crome RM**: the same backbone, options and original pairs as the vanilla RM, plus the
   kept augmented pairs (BT on preferences, the tie loss on neutrals).
7. Both RMs and the reference scorers on the held-out sets, in one table.
8. **Robustness** of each: the perturbation suite on LLMBar, helpful-base and GSM8K test
   pairs (held out), best-of-N on GSM8K test, and the causal audit on rules-made held-out
   probes (GSM8K correctness, helpful-base RRM relevance).
9. **Report**: ``report/report.html`` (plots) and ``report/report.md``.

The defaults fit ~30 minutes on a 2-core CPU: the local oracle rewrites at a few seconds
per answer there, so only ``augment_pairs`` pairs are augmented (short ones: both answers
under ``augment_max_chars``). For more, raise ``--augment-pairs`` and point ``--oracle`` at
a server (``openai:http://HOST:PORT/v1``); every stage's output is cached and resumable,
so a re-run with the same options redoes no oracle call.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crome.augment import AugmentOptions, augment
from crome.data.io import read_pairs, write_pairs
from crome.data.schema import PairRecord
from crome.data.sources import load_source, resolve_data_dir
from crome.evaluate.audit import AuditOptions, audit, rules_probe_pairs
from crome.evaluate.bon import BoNOptions, BoNReport, run_bon
from crome.evaluate.perturb import PerturbOptions, PerturbReport, evaluate_perturbations
from crome.evaluate.reference import REFERENCE_SCORERS, Scorer
from crome.evaluate.run import HELD_OUT, evaluate_scorer, load_eval_sets
from crome.filter import FilterOptions, filter_pairs
from crome.model import ModelOptions, RewardModel
from crome.oracle import OracleOptions, make_oracle
from crome.progress import progress_callback
from crome.report import build_report, collect_runs
from crome.rubrics import RubricOptions, make_rubrics, read_rubrics
from crome.score import RewardModelScorer, ScoreOptions
from crome.train import TrainOptions, train

TRAIN_SOURCES = ("hh-rlhf/helpful-online", "hh-rlhf/helpful-rejection-sampled")
PERTURB_SETS = ("llmbar", "hh-rlhf/helpful-base", "gsm8k")  # held out (gsm8k: test pairs)


@dataclass
class QuickstartOptions:
    output_dir: str = "runs/quickstart"
    data_dir: str | None = None
    max_train: int | None = 1000  # original training pairs (a seeded sample); None = all
    max_eval: int | None = 400  # pairs per held-out subset (the first N); None = all
    max_length: int = 128
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    # Crome
    oracle: str = "llamacpp"
    oracle_model: str = ""
    cache: str | None = None  # None: <output_dir>/oracle.sqlite3
    augment_pairs: int = 12  # pairs that get rubrics and causal rewrites
    augment_max_chars: int = 600  # ... chosen among pairs whose answers are this short
    attributes_per_pair: int = 1
    candidates: int = 2
    neutral_pairs: int = 300  # original pairs re-attached to unrelated prompts
    tau: float = 0.95
    # robustness (held-out data only)
    perturb_eval: int = 15  # pairs per subset of PERTURB_SETS for the perturbation suite
    bon_questions: int = 100  # GSM8K test questions for best-of-N
    audit_probes: int = 50  # first N pairs of GSM8K test and of helpful-base for the audit
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


def augment_subset(records: list[PairRecord], n: int, max_chars: int, seed: int,
                   log: list[str]) -> list[PairRecord]:
    short = [r for r in records if r.label == "chosen"
             and max(len(r.chosen), len(r.rejected)) <= max_chars]
    chosen = random.Random(seed + 1).sample(short, min(n, len(short)))
    log.append(f"causal subset: {len(chosen)} of {len(short)} pairs whose answers are at most "
               f"{max_chars} characters ({len(records) - len(short)} longer pairs not eligible)")
    return chosen


class _Stages:
    """Numbered stage banners with elapsed time, so a long run says where it is."""

    def __init__(self, total: int, echo: Callable[[str], Any]) -> None:
        self.total, self.n, self.echo, self.t0 = total, 0, echo, time.perf_counter()
        self.times: dict[str, float] = {}
        self._last: tuple[str, float] | None = None

    def start(self, name: str) -> None:
        self._close()
        self.n += 1
        now = time.perf_counter()
        self.echo(f"[{self.n}/{self.total}] {name}  (elapsed {(now - self.t0) / 60:.1f} min)")
        self._last = (name, now)

    def _close(self) -> None:
        if self._last:
            self.times[self._last[0]] = round(time.perf_counter() - self._last[1], 1)
            self._last = None

    def finish(self) -> float:
        self._close()
        return time.perf_counter() - self.t0


def quickstart(options: QuickstartOptions | None = None,
               echo: Any = print) -> dict[str, Any]:
    """Run the main job; returns the results that ``summary.json`` holds."""
    opts = options or QuickstartOptions()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(opts.data_dir)
    stages = _Stages(10, echo)
    log: list[str] = []
    stages.start("load data")
    # Made first: a local llama.cpp is checked (in a child process) before minutes of work.
    oracle = make_oracle(OracleOptions(spec=opts.oracle, model=opts.oracle_model,
                                       cache=opts.cache or str(out / "oracle.sqlite3")))
    originals = training_pairs(data_dir, opts.max_train, opts.seed, log)
    sets = load_eval_sets(HELD_OUT, data_dir=data_dir, limit=opts.max_eval)
    for es in sets:
        skipped = sum(es.skipped.values())
        log.append(f"{es.name}: {len(es.records)} held-out pairs"
                   + (f", {skipped} skipped at load ({es.skipped})" if skipped else ""))
    subset = augment_subset(originals, opts.augment_pairs, opts.augment_max_chars, opts.seed,
                            log)
    for line in log:
        echo(line)

    def train_rm(name: str, records: list[PairRecord]) -> Any:
        return train(records, TrainOptions(
            output_dir=str(out / name), model=ModelOptions(max_length=opts.max_length),
            epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
            progress=opts.progress))

    stages.start(f"train the vanilla RM on {len(originals)} original pairs")
    vanilla_summary = train_rm("vanilla-rm", originals)

    stages.start(f"rubrics for {len(subset)} prompts (oracle: {opts.oracle})")
    aug = out / "augment"
    bar, tick = progress_callback("rubrics", opts.progress)
    try:
        rubric_report = make_rubrics(subset, oracle, aug / "rubrics.jsonl", RubricOptions(),
                                     tick)
        bar.close()
        echo(rubric_report.summary())
        stages.start(f"causal rewrites ({len(subset)} pairs × {opts.attributes_per_pair} "
                     f"attribute × 2 directions, up to {opts.candidates} samples each)")
        bar, tick = progress_callback("causal", opts.progress)
        causal_report = augment(
            subset, aug / "causal.jsonl",
            AugmentOptions(recipe="causal", seed=opts.seed,
                           attributes_per_pair=opts.attributes_per_pair,
                           candidates=opts.candidates),
            oracle=oracle, rubrics=read_rubrics(aug / "rubrics.jsonl"), progress=tick)
    finally:
        bar.close()
        stats = getattr(oracle, "stats", None)
        oracle.close()
    echo(causal_report.summary())
    if stats is not None:
        echo(stats.summary())
    causal = read_pairs(aug / "causal.jsonl")

    stages.start("neutral pairs (unrelated prompts, label tie)")
    neutral_parents = random.Random(opts.seed + 2).sample(
        originals, min(opts.neutral_pairs, len(originals))) + causal
    neutral_report = augment(neutral_parents, aug / "neutral.jsonl",
                             AugmentOptions(recipe="neutral", seed=opts.seed))
    echo(neutral_report.summary())
    augmented = causal + read_pairs(aug / "neutral.jsonl")

    stages.start(f"filter {len(augmented)} augmented pairs with the vanilla RM (τ={opts.tau})")
    kept, dropped, filter_report = filter_pairs(augmented, RewardModel.load(out / "vanilla-rm"),
                                                FilterOptions(tau=opts.tau), "vanilla-rm")
    write_pairs(kept, aug / "filtered.jsonl")
    write_pairs(dropped, aug / "dropped.jsonl")
    echo(filter_report.summary())

    stages.start(f"train the Crome RM on {len(originals)} original + {len(kept)} augmented "
                 f"pairs")
    crome_summary = train_rm("crome-rm", originals + kept)

    stages.start("evaluate on the held-out sets")
    scorers = [cls() for cls in REFERENCE_SCORERS.values()]
    for name in ("vanilla-rm", "crome-rm"):
        scorers.append(RewardModelScorer(RewardModel.load(out / name),
                                         ScoreOptions(batch_size=64), name=name))
    results: dict[str, Any] = {}
    for scorer in scorers:
        echo(f"evaluating {scorer.name} ...")
        results[scorer.name] = evaluate_scorer(scorer, sets, out / "eval")
    table = results_table(results)

    stages.start("robustness: perturbation suite, best-of-N on GSM8K, causal audit")
    robust = robustness(scorers, data_dir, out / "eval", opts, echo)
    robustness_rows(table, robust["perturb"], robust["bon"])

    stages.start("report")
    paths = build_report(collect_runs([out]), out / "report")
    echo(f"report: {paths.html} (and {paths.markdown.name})")
    elapsed = stages.finish()
    report = {
        "options": asdict(opts),
        "data_dir": str(data_dir),
        "train": {"vanilla-rm": asdict(vanilla_summary), "crome-rm": asdict(crome_summary)},
        "augment": {"rubrics": {"ok": rubric_report.ok, "fallback": rubric_report.fallback,
                                "prompts": rubric_report.prompts},
                    "causal": causal_report.to_dict(), "neutral": neutral_report.to_dict(),
                    "filter": filter_report.to_dict()},
        "train_sources": list(TRAIN_SOURCES),
        "held_out": list(HELD_OUT),
        "robustness": {"perturb_sets": list(PERTURB_SETS), "bon_source": "gsm8k/test",
                       "audit_probes": robust["probe_log"]},
        "seconds": {**stages.times, "total": round(elapsed, 1)},
        "table": table,
        "log": log,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, allow_nan=False,
                                                 default=str) + "\n")
    (out / "summary.md").write_text(markdown_table(table) + "\n")
    echo(markdown_table(table))
    echo(f"vanilla RM: {vanilla_summary.pairs} pairs; Crome RM: {crome_summary.pairs} pairs "
         f"({len(kept)} augmented kept of {len(augmented)}); total {elapsed / 60:.1f} min; "
         f"run folder: {os.fspath(out)}")
    echo(f"more augmentation: --augment-pairs {4 * opts.augment_pairs} (the local oracle "
         f"takes seconds per rewrite), or --oracle openai:http://HOST:PORT/v1 for a server "
         f"(vLLM, llama.cpp, a hosted API); cached calls are not repeated.")
    return report


def robustness(scorers: list[Scorer], data_dir: Path, eval_dir: Path, opts: QuickstartOptions,
               echo: Any = print) -> dict[str, Any]:
    """The perturbation suite, best-of-N and the causal audit for every scorer, on held-out
    data; result files go to ``eval_dir`` (where the report finds them)."""
    sets = load_eval_sets(PERTURB_SETS, data_dir=data_dir, limit=opts.perturb_eval)
    probes, probe_log = rules_probe_pairs(eval_dir.parent / "audit-probes", data_dir,
                                          opts.audit_probes, opts.seed)
    for line in probe_log:
        echo(line)
    perturbs: dict[str, PerturbReport] = {}
    bons: dict[str, BoNReport] = {}
    for scorer in scorers:
        echo(f"robustness of {scorer.name} ...")
        perturbs[scorer.name] = evaluate_perturbations(
            scorer, sets, PerturbOptions(seed=opts.seed), output_dir=eval_dir)
        bons[scorer.name] = run_bon(scorer, BoNOptions(seed=opts.seed, limit=opts.bon_questions),
                                    data_dir=data_dir, output_dir=eval_dir)
        audit(scorer, probes, options=AuditOptions(seed=opts.seed), output_dir=eval_dir,
              perturbed=perturbs[scorer.name])
    return {"perturb": perturbs, "bon": bons, "probe_log": probe_log}


def robustness_rows(table: dict[str, dict[str, Any]], perturbs: dict[str, PerturbReport],
                    bons: dict[str, BoNReport]) -> None:
    """Summary rows of the robustness stage, added to ``table`` (per-transformation figures
    are in the report)."""
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    for name, rep in perturbs.items():
        neutral = [t for t in rep.transformations if not t.bait and t.drop is not None]
        bait = [t for t in rep.transformations if t.bait and t.drop is not None]
        table.setdefault(f"perturbations, both sides: mean drop (pts, n={rep.clean['n']})",
                         {})[name] = mean([t.drop for t in neutral])  # type: ignore[misc]
        table.setdefault("perturbations, both sides: mean consistency", {})[name] = \
            mean([t.consistency for t in neutral])  # type: ignore[misc]
        table.setdefault("perturbations, bait on rejected: mean drop (pts)", {})[name] = \
            mean([t.drop for t in bait])  # type: ignore[misc]
    for name, rep in bons.items():
        for r in rep.results:
            row = f"GSM8K best-of-{r.n} (n={r.questions}, random {100 * (r.random or 0):.1f}, " \
                  f"best {100 * (r.best or 0):.1f})"
            table.setdefault(row, {})[name] = r.rm


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
