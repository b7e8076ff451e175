"""``crome experiment``: arms × seeds over the same Crome stages, with paired bootstrap CIs.

One runner for every scale; ``crome quickstart`` is its smallest preset.

Stages, each cached on disk under ``output_dir`` and skipped when its output is there, so a
killed run goes on where it stopped:

1. **data**: a seeded sample of the training pairs (the same for every arm and seed) and the
   held-out sets, including the full RewardBench.
2. **baseline**: the vanilla RM of the first seed. It is the vanilla arm's first model and
   the filter's baseline, trained once.
3. **augmentation**, once for all arms: rubrics and causal rewrites from the oracle (cached
   per request in SQLite), neutral pairs (IQN), RRM pairs.
4. **filter**: the baseline keeps the augmented pairs it gets wrong or is unsure about.
5. **arms × seeds**: each arm's training data is the original pairs plus its share of the
   augmented pairs (see :data:`ARMS`); every arm trains with the same backbone, options and
   seeds, into ``models/<arm>/seed-<k>``. The ``*-pairpm`` arms train pairwise preference
   models (:mod:`crome.pairwise`) on the data of the BT arm they are named after, with
   ``pairwise_max_length`` tokens for the prompt and both answers.
6. **evaluation** of every model: held-out accuracy, RewardBench sections, length bias, the
   perturbation suite, best-of-N on GSM8K test and the causal audit, into
   ``seed-<k>/eval`` (the reference scorers once, in the first seed's folder).
7. **statistics**: each figure's mean over seeds and the paired bootstrap 95% CI of each
   difference (Crome − vanilla, Crome − RRM, each ablation − Crome) over units and seeds
   (:mod:`crome.evaluate.stats`); ``results.json``, ``results.md`` and the HTML report.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from crome.augment import AugmentOptions, AugmentReport, augment
from crome.data.io import read_pairs, write_pairs
from crome.data.schema import PairRecord
from crome.data.sources import load_source, resolve_data_dir
from crome.evaluate.audit import AuditOptions, audit, rules_probe_pairs
from crome.evaluate.bon import ROUND_ROBIN, BoNOptions, run_bon
from crome.evaluate.metrics import REWARDBENCH_SECTIONS
from crome.evaluate.perturb import PerturbOptions, evaluate_perturbations
from crome.evaluate.reference import REFERENCE_SCORERS, Comparer, Scorer
from crome.evaluate.run import (
    HEADLINE_ROWS,
    HELD_OUT,
    EvalSet,
    evaluate_scorer,
    load_eval_sets,
    slug,
)
from crome.evaluate.shortcut import SHORTCUT_SETS, feature_fn, plant, shortcut_sets
from crome.evaluate.stats import (
    Figure,
    format_difference,
    format_value,
    paired_differences,
    spearman_statistic,
)
from crome.filter import FilterOptions, filter_pairs
from crome.model import LoraOptions, ModelOptions, RewardModel
from crome.oracle import OracleOptions, make_oracle
from crome.progress import progress_callback
from crome.rubrics import RubricOptions, make_rubrics, read_rubrics
from crome.score import ScoreOptions, model_scorer
from crome.train import SUMMARY_FILE, TrainOptions, train

SHORTCUT_CLEAN = "hh-rlhf/helpful-base"  # the held-out set the shortcut twins are made of
# every training pair of ../shared/data (about 5,900; its README gives the roles)
TRAIN_SOURCES = ("hh-rlhf/helpful-online", "hh-rlhf/helpful-rejection-sampled",
                 "ultrafeedback/train", "oasst1")
PERTURB_SETS = ("llmbar", "hh-rlhf/helpful-base", "gsm8k")  # held out (gsm8k: test pairs)
REWARDBENCH = "rewardbench"

# Arm -> what its training data adds to the original pairs.
ARMS: dict[str, str] = {
    "vanilla": "the original pairs only",
    "rrm": "RRM pairs (on-prompt answers beat an off-prompt one; two off-prompt answers tie)",
    "causal-only": "the causal pairs the filter kept",
    "neutral-only": "the kept neutral pairs made from original pairs (no oracle rewrite in it)",
    "crome": "the causal and neutral pairs the filter kept (neutrals of rewrites included)",
    "crome-no-rewrite-ties": "crome without the neutral copies of causal rewrites: what "
                             "those ties add",
    "crome-nofilter": "every causal and neutral pair, unfiltered",
    # same-prompt ties (crome.augment, recipe "paraphrase"): a neutral recipe that names no
    # feature, beside IQN's unrelated-prompt ties
    "paraphrase-only": "the kept same-prompt paraphrase ties (an answer and the oracle's "
                       "paraphrase of it, under its own prompt)",
    "crome-paraphrase": "crome plus the kept same-prompt paraphrase ties",
    # Pairwise preference models (crome.pairwise) on the data of the BT arm of the same name
    "vanilla-pairpm": "a pairwise preference model on the vanilla arm's data",
    "rrm-pairpm": "a pairwise preference model on the rrm arm's data (off-prompt ties: Same)",
    "crome-pairpm": "a pairwise preference model on the crome arm's data (neutral pairs: Same)",
}
PAIRPM_SUFFIX = "-pairpm"
PARAPHRASE_ARMS = ("paraphrase-only", "crome-paraphrase")
# The tie:causal sweep adds arms ``crome-ties-<r>x``: the kept causal pairs and r times as
# many kept neutral pairs (a seeded sample).
SWEEP_PREFIX = "crome-ties-"
# The learning curve over causal-pair counts adds arms ``crome-causal-<f>``: a fraction f of
# the kept causal pairs (nested: a smaller fraction's pairs are in every larger one) and
# every kept neutral pair, so f = 1 is the crome arm.
CURVE_PREFIX = "crome-causal-"

# (arm, reference) differences reported, where both arms ran; sweep arms go against crome.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("crome", "vanilla"), ("crome", "rrm"), ("rrm", "vanilla"),
    ("causal-only", "crome"), ("neutral-only", "crome"), ("crome-nofilter", "crome"),
    ("crome-no-rewrite-ties", "crome"),
    ("paraphrase-only", "vanilla"), ("paraphrase-only", "neutral-only"),
    ("crome-paraphrase", "crome"),
    ("crome-pairpm", "vanilla-pairpm"), ("crome-pairpm", "rrm-pairpm"),
    ("rrm-pairpm", "vanilla-pairpm"), ("vanilla-pairpm", "vanilla"), ("crome-pairpm", "crome"),
)


@dataclass
class ExperimentOptions:
    output_dir: str = ""  # "" = runs/<preset>
    preset: str = "quickstart"
    data_dir: str | None = None
    arms: tuple[str, ...] = ("vanilla", "crome")
    seeds: tuple[int, ...] = (0, 1, 2)
    tie_ratios: tuple[float, ...] = ()  # the tie:causal sweep
    causal_fractions: tuple[float, ...] = ()  # the learning curve over causal-pair counts
    # original data and training (the same for every arm)
    max_train: int | None = 600  # a seeded sample of the training pairs; None = all
    data_seed: int = 0
    backbone: str | None = None  # None: the packaged MiniLM; a Hub id or folder (decoders too)
    lora_r: int = 0  # LoRA rank (alpha = 2r); 0 = full fine-tuning
    max_length: int = 128
    # a pairwise model reads the prompt and both answers: None = 2 x max_length tokens
    pairwise_max_length: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-4
    tie_weight: float = 1.0
    # a planted shortcut (crome.evaluate.shortcut): the feature goes on the chosen answer of
    # shortcut_rate of the training pairs and on the rejected one of the rest; "" = none
    shortcut: str = ""
    shortcut_rate: float = 0.95
    # augmentation (once for all arms)
    oracle: str = "auto"  # the local backend a probe measured fastest (crome.oracle.auto)
    oracle_model: str = ""
    cache: str | None = None  # None: <output_dir>/oracle.sqlite3
    augment_pairs: int = 12
    # causal (and paraphrase) parents' longest answer, in characters; None: no limit. Only
    # the CPU presets set one: the local oracle decodes ~10 tokens/s on 2 cores, and a
    # rewrite is as long as its answer (a 2,000-character answer costs a minute a candidate)
    augment_max_chars: int | None = None
    attributes_per_pair: int = 1
    candidates: int = 2
    # The oracle checks each causal rewrite (crome.validate). Off in the CPU presets: the
    # packaged 1.5B judge leans to reply A and its log-odds are weak; it validated 8-58% of
    # pairs of known truth (README, "The judge").
    validate: bool = False
    lookup_tokens: int = 10  # llamacpp: prompt-lookup speculative decoding (0 = off)
    neutral_pairs: int = 300
    # original pairs whose two answers get a same-prompt paraphrase tie each (only where a
    # paraphrase arm runs; an oracle request per answer, as long as the answer; the pairs
    # are drawn like the causal subset, within augment_max_chars)
    paraphrase_pairs: int = 100
    tau: float = 0.95  # the filter keeps preferences whose label the baseline gives P < tau
    tie_tau: float = 0.6  # ... and ties where it favours one answer with P >= tie_tau
    # evaluation (held-out data only)
    max_eval: int | None = 200  # first N pairs per subset of the held-out sets; None = all
    rewardbench: bool = True  # the full RewardBench, whatever max_eval says
    robustness: bool = True  # perturbations, best-of-N and the audit for every model
    perturb_eval: int = 15
    bon_questions: int = 100
    audit_probes: int = 50
    bootstrap: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        self.seeds = tuple(self.seeds)
        self.tie_ratios = tuple(self.tie_ratios)
        self.causal_fractions = tuple(self.causal_fractions)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
        if "vanilla" not in self.arms:
            raise ValueError("the vanilla arm is required: its first seed is the filter's "
                             "baseline and every comparison's reference")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if any(r <= 0 for r in self.tie_ratios):
            raise ValueError(f"tie ratios must be positive, got {self.tie_ratios}")
        if any(not 0 < f < 1 for f in self.causal_fractions):
            raise ValueError(f"causal fractions must be between 0 and 1 (1 is the crome arm), "
                             f"got {self.causal_fractions}")
        FilterOptions(tau=self.tau, tie_tau=self.tie_tau)  # checks both before any work
        if self.shortcut:
            feature_fn(self.shortcut)
            if not 0.0 <= self.shortcut_rate <= 1.0:
                raise ValueError(f"shortcut_rate is a share between 0 and 1, got "
                                 f"{self.shortcut_rate}")
        if not self.output_dir:
            self.output_dir = f"runs/{self.preset}"

    @property
    def all_arms(self) -> list[str]:
        return [*self.arms, *(sweep_arm(r) for r in self.tie_ratios),
                *(curve_arm(f) for f in self.causal_fractions)]


def sweep_arm(ratio: float) -> str:
    return f"{SWEEP_PREFIX}{ratio:g}x"


def curve_arm(fraction: float) -> str:
    return f"{CURVE_PREFIX}{fraction:g}"


def arm_description(arm: str) -> str:
    if arm.startswith(SWEEP_PREFIX):
        return "the kept causal pairs and r× as many kept neutral pairs"
    if arm.startswith(CURVE_PREFIX):
        return "a nested fraction of the kept causal pairs, and every kept neutral pair"
    return ARMS[arm]


# Presets: the smallest (the quickstart, ~30 min on 2 CPU cores) to a GPU-cluster run with
# a served oracle. Anything given on the command line overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": {"augment_max_chars": 600},
    "standard": {
        "arms": tuple(ARMS), "tie_ratios": (1.0, 4.0), "max_train": 2000,
        "augment_pairs": 60, "max_eval": 400, "perturb_eval": 30, "bon_questions": 200,
        "audit_probes": 100,
    },
    "large": {
        "arms": tuple(ARMS), "seeds": (0, 1, 2, 3, 4), "tie_ratios": (0.5, 1.0, 2.0, 4.0),
        "max_train": None, "augment_pairs": 2000,
        "attributes_per_pair": 2, "neutral_pairs": 4000, "max_length": 512, "max_eval": None,
        "perturb_eval": 200, "bon_questions": None, "audit_probes": 400, "bootstrap": 2000,
        "validate": True,
    },
    # Does the pipeline remove a shortcut it was never told about? A polite preamble on the
    # chosen answer of 95% of the training pairs; held out: helpful-base clean, with the
    # preamble on the rejected answer only (anti) and on the chosen answer only (pro).
    "shortcut": {
        "shortcut": "preamble", "shortcut_rate": 0.95, "max_train": 1000,
        "arms": ("vanilla", "neutral-only", "paraphrase-only", "causal-only", "crome",
                 "crome-paraphrase"), "seeds": (0, 1, 2, 3, 4),
        "augment_max_chars": 600, "max_eval": 300, "rewardbench": False, "robustness": False,
    },
}


def preset_options(preset: str = "quickstart", **overrides: Any) -> ExperimentOptions:
    """The options of ``preset`` with ``overrides`` on top (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ExperimentOptions)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return ExperimentOptions(preset=preset, **{**PRESETS[preset], **given})


# --------------------------------------------------------------------------- stages

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
        self._last = (name.split(" (")[0], now)

    def _close(self) -> None:
        if self._last:
            self.times[self._last[0]] = round(time.perf_counter() - self._last[1], 1)
            self._last = None

    def finish(self) -> float:
        self._close()
        return time.perf_counter() - self.t0


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


def augment_subset(records: list[PairRecord], n: int, max_chars: int | None, seed: int,
                   log: list[str], name: str = "causal subset") -> list[PairRecord]:
    """A seeded sample of ``n`` preference pairs for an oracle recipe, of those whose answers
    are at most ``max_chars`` characters (``None``: all)."""
    eligible = [r for r in records if r.label == "chosen" and (
        max_chars is None or max(len(r.chosen), len(r.rejected)) <= max_chars)]
    chosen = random.Random(seed + 1).sample(eligible, min(n, len(eligible)))
    if max_chars is None:
        log.append(f"{name}: {len(chosen)} of {len(eligible)} preference pairs")
    else:
        log.append(f"{name}: {len(chosen)} of {len(eligible)} pairs whose answers are "
                   f"at most {max_chars} characters ({len(records) - len(eligible)} longer "
                   f"pairs not eligible)")
    return chosen


@dataclass
class Augmented:
    """The augmented pools every arm draws from, and the reports of how they were made."""

    causal: list[PairRecord]
    neutral: list[PairRecord]
    rrm: list[PairRecord]
    paraphrase: list[PairRecord]
    kept: list[PairRecord]
    reports: dict[str, Any] = field(default_factory=dict)

    def kept_of(self, recipe: str) -> list[PairRecord]:
        return [r for r in self.kept if r.provenance.get("recipe") == recipe]

    def kept_crome(self) -> list[PairRecord]:
        """Kept causal and neutral pairs: Crome's own augmentation."""
        return [r for r in self.kept if r.provenance.get("recipe") in ("causal", "neutral")]

    def kept_rewrite_ties(self) -> list[PairRecord]:
        """Kept neutral pairs whose answers come from a causal rewrite."""
        return [r for r in self.kept if is_rewrite_tie(r)]


def is_rewrite_tie(rec: PairRecord) -> bool:
    """A neutral pair made from a causal rewrite (not from an original pair)."""
    return (rec.provenance.get("recipe") == "neutral"
            and rec.provenance.get("parent_recipe") == "causal")


def uses_paraphrase(arms: Sequence[str]) -> bool:
    return any(a.removesuffix(PAIRPM_SUFFIX) in PARAPHRASE_ARMS for a in arms)


def augmentation(originals: list[PairRecord], subset: list[PairRecord], baseline: Path,
                 opts: ExperimentOptions, oracle: Any, out: Path,
                 stages: _Stages, echo: Callable[[str], Any]) -> Augmented:
    """Rubrics, causal, paraphrase (where an arm uses them), neutral and RRM pairs
    (resumable files), then the filter."""
    aug = out / "augment"
    reports: dict[str, Any] = {}
    stages.start(f"rubrics and causal rewrites for {len(subset)} pairs "
                 f"(oracle: {opts.oracle})")
    bar, tick = progress_callback("rubrics", opts.progress)
    paraphrase_report: AugmentReport | None = None
    try:
        rubric_report = make_rubrics(subset, oracle, aug / "rubrics.jsonl", RubricOptions(),
                                     tick)
        bar.close()
        echo(rubric_report.summary())
        bar, tick = progress_callback("causal", opts.progress)
        causal_report = augment(
            subset, aug / "causal.jsonl",
            AugmentOptions(recipe="causal", seed=opts.data_seed,
                           attributes_per_pair=opts.attributes_per_pair,
                           candidates=opts.candidates, validate=opts.validate),
            oracle=oracle, rubrics=read_rubrics(aug / "rubrics.jsonl"), progress=tick)
        if uses_paraphrase(opts.all_arms):
            bar.close()
            plog: list[str] = []
            parents = augment_subset(originals, opts.paraphrase_pairs, opts.augment_max_chars,
                                     opts.data_seed + 2, plog, "paraphrase subset")
            echo(plog[0])
            bar, tick = progress_callback("paraphrase", opts.progress)
            paraphrase_report = augment(
                parents, aug / "paraphrase.jsonl",
                AugmentOptions(recipe="paraphrase", seed=opts.data_seed),
                oracle=oracle, progress=tick)
    finally:
        bar.close()
        stats = getattr(oracle, "stats", None)
        oracle.close()
    echo(causal_report.summary())
    paraphrase: list[PairRecord] = []
    if paraphrase_report is not None:
        echo(paraphrase_report.summary())
        reports["paraphrase"] = paraphrase_report.to_dict()
        paraphrase = read_pairs(aug / "paraphrase.jsonl")
    if stats is not None:
        echo(stats.summary())
    reports["rubrics"] = {"ok": rubric_report.ok, "fallback": rubric_report.fallback,
                          "prompts": rubric_report.prompts}
    reports["causal"] = causal_report.to_dict()
    causal = read_pairs(aug / "causal.jsonl")

    stages.start("neutral and RRM pairs")
    neutral_parents = random.Random(opts.data_seed + 2).sample(
        originals, min(opts.neutral_pairs, len(originals))) + causal
    neutral_report = augment(neutral_parents, aug / "neutral.jsonl",
                             AugmentOptions(recipe="neutral", seed=opts.data_seed))
    echo(neutral_report.summary())
    reports["neutral"] = neutral_report.to_dict()
    neutral = read_pairs(aug / "neutral.jsonl")
    rrm: list[PairRecord] = []
    if "rrm" in opts.arms or "rrm" + PAIRPM_SUFFIX in opts.arms:
        rrm_report = augment(originals, aug / "rrm.jsonl",
                             AugmentOptions(recipe="rrm", seed=opts.data_seed))
        echo(rrm_report.summary())
        reports["rrm"] = rrm_report.to_dict()
        rrm = read_pairs(aug / "rrm.jsonl")

    stages.start(f"filter {len(causal) + len(neutral) + len(paraphrase)} augmented pairs with "
                 f"the vanilla RM (τ={opts.tau}, ties {opts.tie_tau})")
    kept, dropped, filter_report = filter_pairs(
        causal + neutral + paraphrase, RewardModel.load(baseline),
        FilterOptions(tau=opts.tau, tie_tau=opts.tie_tau), "vanilla")
    write_pairs(kept, aug / "filtered.jsonl")
    write_pairs(dropped, aug / "dropped.jsonl")
    echo(filter_report.summary())
    reports["filter"] = filter_report.to_dict()
    return Augmented(causal, neutral, rrm, paraphrase, kept, reports)


def is_pairwise_arm(arm: str) -> bool:
    return arm.endswith(PAIRPM_SUFFIX)


def arm_data(arm: str, originals: list[PairRecord], aug: Augmented, seed: int) -> list[PairRecord]:
    """The training records of ``arm`` (the originals first, then its augmented pairs); a
    pairwise arm trains on the data of the BT arm it is named after."""
    arm = arm.removesuffix(PAIRPM_SUFFIX)
    if arm == "vanilla":
        extra: list[PairRecord] = []
    elif arm == "rrm":
        extra = aug.rrm
    elif arm == "causal-only":
        extra = aug.kept_of("causal")
    elif arm == "neutral-only":
        extra = [r for r in aug.kept_of("neutral") if not is_rewrite_tie(r)]
    elif arm == "crome":
        extra = aug.kept_crome()
    elif arm == "crome-no-rewrite-ties":
        extra = [r for r in aug.kept_crome() if not is_rewrite_tie(r)]
    elif arm == "paraphrase-only":
        extra = aug.kept_of("paraphrase")
    elif arm == "crome-paraphrase":
        extra = aug.kept_crome() + aug.kept_of("paraphrase")
    elif arm == "crome-nofilter":
        extra = aug.causal + aug.neutral
    elif arm.startswith(SWEEP_PREFIX):
        ratio = float(arm.removeprefix(SWEEP_PREFIX).removesuffix("x"))
        causal, neutral = aug.kept_of("causal"), aug.kept_of("neutral")
        k = min(len(neutral), round(ratio * len(causal)))
        extra = causal + random.Random(f"{seed}\0{arm}").sample(neutral, k)
    elif arm.startswith(CURVE_PREFIX):
        fraction = float(arm.removeprefix(CURVE_PREFIX))
        causal = aug.kept_of("causal")
        # one order for every fraction and seed: the curve adds pairs, it does not swap them
        random.Random("causal-curve").shuffle(causal)
        extra = causal[:round(fraction * len(causal))] + aug.kept_of("neutral")
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return originals + extra


def train_arm(records: list[PairRecord], model_dir: Path, seed: int,
              opts: ExperimentOptions, pairwise: bool = False) -> dict[str, Any]:
    """Train one model, or read the summary of the one already there (resume)."""
    summary_file = model_dir / SUMMARY_FILE
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    summary = train(records, arm_train_options(model_dir, seed, opts, pairwise))
    return asdict(summary)


def arm_train_options(model_dir: Path, seed: int, opts: ExperimentOptions,
                      pairwise: bool = False) -> TrainOptions:
    """What every arm trains with: only the output folder and the seed differ (and for a
    pairwise model its kind and ``pairwise_max_length``, as it reads two answers)."""
    max_length = (opts.pairwise_max_length or 2 * opts.max_length) if pairwise \
        else opts.max_length
    return TrainOptions(
        output_dir=str(model_dir), model=ModelOptions(
            backbone=opts.backbone, max_length=max_length, pairwise=pairwise,
            lora=LoraOptions(r=opts.lora_r, alpha=2 * opts.lora_r) if opts.lora_r else None),
        epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
        tie_weight=opts.tie_weight, progress=opts.progress)


def evaluate_model(scorer: Scorer | Comparer, sets: Sequence[EvalSet], robust_sets: Sequence[EvalSet],
                   probes: list[PairRecord], eval_dir: Path, opts: ExperimentOptions,
                   data_dir: Path, seed: int) -> None:
    """Every held-out figure of one scorer, written into ``eval_dir`` (skipped if there)."""
    tag = slug(scorer.name)
    if not (eval_dir / f"results-{tag}.json").exists():
        evaluate_scorer(scorer, sets, eval_dir)
    if not opts.robustness or (eval_dir / f"audit-{tag}.json").exists():
        return
    perturbed = evaluate_perturbations(scorer, robust_sets, PerturbOptions(seed=seed),
                                       output_dir=eval_dir)
    run_bon(scorer, BoNOptions(seed=seed, limit=opts.bon_questions), data_dir=data_dir,
            output_dir=eval_dir)
    audit(scorer, probes, options=AuditOptions(seed=seed), output_dir=eval_dir,
          perturbed=perturbed)


def experiment(options: ExperimentOptions | None = None,
               echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run (or resume) the experiment; returns what ``results.json`` holds."""
    opts = options or ExperimentOptions()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out / "options.json", opts)
    (out / "options.json").write_text(json.dumps(asdict(opts), indent=2) + "\n")
    data_dir = resolve_data_dir(opts.data_dir)
    arms = opts.all_arms
    stages = _Stages(9, echo)
    log: list[str] = []
    stages.start("load data")
    # Made first: a local llama.cpp is checked (in a child process) before minutes of work.
    oracle = make_oracle(OracleOptions(spec=opts.oracle, model=opts.oracle_model,
                                       lookup_tokens=opts.lookup_tokens,
                                       cache=opts.cache or str(out / "oracle.sqlite3")))
    originals = training_pairs(data_dir, opts.max_train, opts.data_seed, log)
    sets = load_eval_sets(HELD_OUT, data_dir=data_dir, limit=opts.max_eval)
    if opts.shortcut:
        originals = plant(originals, opts.shortcut, opts.shortcut_rate, opts.data_seed)
        on_chosen = sum(r.provenance["shortcut"]["side"] == "chosen" for r in originals)
        log.append(f"shortcut {opts.shortcut!r} planted on the chosen answer of {on_chosen} "
                   f"and the rejected answer of {len(originals) - on_chosen} training pairs")
        clean = next(es for es in sets if es.name == SHORTCUT_CLEAN)
        sets += [EvalSet(name, records)
                 for name, records in shortcut_sets(clean.records, opts.shortcut).items()]
    if opts.rewardbench:
        sets += load_eval_sets((REWARDBENCH,), data_dir=data_dir)
    for es in sets:
        skipped = sum(es.skipped.values())
        log.append(f"{es.name}: {len(es.records)} held-out pairs"
                   + (f", {skipped} skipped at load ({es.skipped})" if skipped else ""))
    subset = augment_subset(originals, opts.augment_pairs, opts.augment_max_chars,
                            opts.data_seed, log)
    for line in log:
        echo(line)

    models = out / "models"
    first = opts.seeds[0]
    stages.start(f"train the baseline (vanilla, seed {first}) on {len(originals)} pairs")
    trained: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    trained["vanilla"][first] = train_arm(originals, models / "vanilla" / f"seed-{first}",
                                          first, opts)
    aug = augmentation(originals, subset, models / "vanilla" / f"seed-{first}", opts, oracle,
                       out, stages, echo)

    stages.start(f"train {len(arms)} arms × {len(opts.seeds)} seeds")
    for seed in opts.seeds:
        for arm in arms:
            if seed in trained[arm]:
                continue
            records = arm_data(arm, originals, aug, seed)
            echo(f"{arm}, seed {seed}: {len(records)} pairs "
                 f"({len(records) - len(originals)} augmented)")
            trained[arm][seed] = train_arm(records, models / arm / f"seed-{seed}", seed, opts,
                                           pairwise=is_pairwise_arm(arm))

    stages.start("evaluate every model on the held-out sets"
                 + (" and the robustness suite" if opts.robustness else ""))
    robust_sets: list[EvalSet] = []
    probes: list[PairRecord] = []
    if opts.robustness:
        robust_sets = load_eval_sets(PERTURB_SETS, data_dir=data_dir, limit=opts.perturb_eval)
        probes, probe_log = rules_probe_pairs(out / "audit-probes", data_dir,
                                              opts.audit_probes, opts.data_seed)
        for line in probe_log:
            echo(line)
    for seed in opts.seeds:
        eval_dir = out / f"seed-{seed}" / "eval"
        scorers: list[Scorer | Comparer] = [cls() for cls in REFERENCE_SCORERS.values()] \
            if seed == first else []
        scorers += [model_scorer(RewardModel.load(models / arm / f"seed-{seed}"),
                                 ScoreOptions(batch_size=64), name=arm) for arm in arms]
        for scorer in scorers:
            echo(f"evaluating {scorer.name}, seed {seed} ...")
            evaluate_model(scorer, sets, robust_sets, probes, eval_dir, opts, data_dir, seed)

    stages.start(f"statistics: paired bootstrap over pairs and {len(opts.seeds)} seeds")
    figures = collect_figures(out, arms, opts.seeds)
    pairs = comparisons(arms)
    diffs = [d for f in figures for d in paired_differences(f, pairs, opts.bootstrap)]
    stages.start("report")
    results = {
        "options": asdict(opts),
        "data_dir": str(data_dir),
        "train_sources": list(TRAIN_SOURCES),
        "held_out": [es.name for es in sets],
        "arms": {a: arm_description(a) for a in arms},
        "augment": aug.reports,
        "train": {a: {str(s): trained[a][s] for s in opts.seeds} for a in arms},
        "figures": {f.name: {"units": f.n_units, "scale": f.scale,
                             "arms": {a: {"mean": f.point(a), "per_seed": f.per_seed(a)}
                                      for a in arms}} for f in figures},
        "differences": [d.to_dict() for d in diffs],
        "audit": audit_summary(out, arms, opts.seeds) if opts.robustness else {},
        "log": log,
    }
    markdown = results_markdown(results)
    from crome.report import build_report, collect_runs, experiment_section

    paths = build_report(collect_runs([out / f"seed-{first}"]), out / "report",
                         leading=[experiment_section(results)])
    elapsed = stages.finish()
    results["seconds"] = {**stages.times, "total": round(elapsed, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False,
                                                 default=str) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    echo(markdown)
    echo(f"report: {paths.html}; results: {out / 'results.json'}, {out / 'results.md'}; "
         f"total {elapsed / 60:.1f} min; run folder: {os.fspath(out)}")
    echo(f"more augmentation: --augment-pairs {4 * opts.augment_pairs} (the local oracle "
         f"takes seconds per rewrite), or --oracle openai:http://HOST:PORT/v1 for a server "
         f"(vLLM, llama.cpp, a hosted API); cached calls and finished stages are not repeated.")
    return results


# Options a resumed run may change: what to run more of, and how to report it. Any other
# change would mix stages made under different settings in one table.
RESUMABLE_CHANGES = ("output_dir", "preset", "arms", "seeds", "tie_ratios", "causal_fractions",
                     "bootstrap", "progress", "data_dir", "cache")


def check_resumable(path: Path, opts: ExperimentOptions) -> None:
    """Refuse to resume a run folder made with other settings (it would reuse its stages)."""
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(opts)))
    # an option added since the folder was made had its default there
    for k, v in json.loads(json.dumps(asdict(ExperimentOptions()))).items():
        before.setdefault(k, v)
    changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and before[k] != now[k]]
    if changed:
        raise ValueError(f"{path.parent}: this run folder was made with other options "
                         f"({'; '.join(changed)}); its cached stages would not match. Use "
                         f"another --out, or the same options (arms, seeds, tie ratios and "
                         f"bootstrap may change).")


def comparisons(arms: Sequence[str]) -> list[tuple[str, str]]:
    present = set(arms)
    pairs = [(a, b) for a, b in COMPARISONS if a in present and b in present]
    if "crome" in present:
        pairs += [(a, "crome") for a in arms if a.startswith(SWEEP_PREFIX)]
    if "vanilla" in present:  # the curve: Crome's gain over vanilla at each causal count
        pairs += [(a, "vanilla") for a in arms if a.startswith(CURVE_PREFIX)]
    return pairs


# --------------------------------------------------------------------------- figures

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _aligned(rows_by_model: dict[tuple[str, int], list[dict[str, Any]]], key: str,
             keep: Callable[[dict[str, Any]], bool]) -> tuple[list[str], dict[tuple[str, int],
                                                                     dict[str, dict[str, Any]]]]:
    """Unit ids present (and kept) for every model, in the first model's order."""
    by_model = {m: {r[key]: r for r in rows if keep(r)} for m, rows in rows_by_model.items()}
    first = next(iter(by_model.values()))
    ids = [i for i in first if all(i in rows for rows in by_model.values())]
    return ids, by_model


def _stack(arms: Sequence[str], seeds: Sequence[int], ids: Sequence[str],
           by_model: dict[tuple[str, int], dict[str, dict[str, Any]]],
           value: Callable[[dict[str, Any]], Any]) -> dict[str, np.ndarray]:
    return {a: np.array([[value(by_model[(a, s)][i]) for i in ids] for s in seeds],
                        dtype=float) for a in arms}


def _correct(row: dict[str, Any]) -> float:
    return 1.0 if row["outcome"] == "correct" else 0.0  # ties count as wrong


def collect_figures(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> list[Figure]:
    """Every figure with a CI, read from the evaluation files of each arm and seed."""
    def eval_dir(seed: int) -> Path:
        return out / f"seed-{seed}" / "eval"

    figures: list[Figure] = []
    # the sets each model was scored on, as evaluate_scorer names their example files
    scored = json.loads((eval_dir(seeds[0]) / f"results-{slug(arms[0])}.json").read_text())
    set_names = [slug(name) for name in scored["sets"]]
    examples = {
        name: {(a, s): _read_jsonl(eval_dir(s) / f"examples-{slug(a)}-{name}.jsonl")
               for a in arms for s in seeds}
        for name in set_names}
    for label, set_name, subsets in HEADLINE_ROWS:
        rows = examples.get(slug(set_name))
        if rows is None:
            continue
        ids, by_model = _aligned(rows, "id", lambda r, subsets=subsets: r["outcome"] != "neutral"
                                 and (subsets is None or r["subset"] in subsets))
        if ids:
            figures.append(Figure(f"{label} (n={len(ids)})",
                                  _stack(arms, seeds, ids, by_model, _correct),
                                  weights=np.full(len(ids), 1 / len(ids))))
    if slug(REWARDBENCH) in examples:
        figures += rewardbench_figures(examples[slug(REWARDBENCH)], arms, seeds)
    hb = examples.get(slug("hh-rlhf/helpful-base"))
    if hb is not None:
        ids, by_model = _aligned(hb, "id", lambda r: r["outcome"] != "neutral")
        longer = [i for i in ids if by_model[(arms[0], seeds[0])][i]["len_rejected"]
                  > by_model[(arms[0], seeds[0])][i]["len_chosen"]]
        if longer:
            figures.append(Figure(f"helpful-base: acc. where rejected is longer "
                                  f"(n={len(longer)})",
                                  _stack(arms, seeds, longer, by_model, _correct),
                                  weights=np.full(len(longer), 1 / len(longer))))
        values = {a: np.array([[[by_model[(a, s)][i][k] for k in
                                 ("reward_chosen", "reward_rejected", "len_chosen",
                                  "len_rejected")] for i in ids] for s in seeds])
                  for a in arms}
        figures.append(Figure(f"helpful-base: Spearman(reward, length) (n={len(ids)})",
                              values, statistic=spearman_statistic, scale=1.0))
    figures += shortcut_figures(examples, arms, seeds)
    if (eval_dir(seeds[0]) / f"perturb-{slug(arms[0])}.json").exists():  # robustness ran
        figures += perturbation_figures(out, arms, seeds)
        figures += bon_figures(out, arms, seeds)
    return figures


def shortcut_figures(examples: dict[str, dict[tuple[str, int], list[dict[str, Any]]]],
                     arms: Sequence[str], seeds: Sequence[int]) -> list[Figure]:
    """Accuracy with the planted feature on the rejected answer only (anti) and on the
    chosen one only (pro), and the fall from clean to anti over the same pairs (points)."""
    if slug(SHORTCUT_SETS[0]) not in examples:
        return []
    figures = []
    for name in SHORTCUT_SETS:
        ids, by_model = _aligned(examples[slug(name)], "id", lambda r: True)
        figures.append(Figure(f"{name} (n={len(ids)})", _stack(arms, seeds, ids, by_model,
                                                                _correct),
                              weights=np.full(len(ids), 1 / len(ids))))
    merged = {m: [{"id": c["id"], "fall": _correct(c) - _correct(a)}
                  for c, a in _pairs_by_id(examples[slug(SHORTCUT_CLEAN)][m],
                                           examples[slug(SHORTCUT_SETS[0])][m])]
              for m in examples[slug(SHORTCUT_CLEAN)]}
    ids, by_model = _aligned(merged, "id", lambda r: True)
    figures.append(Figure(f"shortcut: fall from clean to anti, pts (n={len(ids)})",
                          _stack(arms, seeds, ids, by_model, lambda r: r["fall"]),
                          weights=np.full(len(ids), 1 / len(ids))))
    return figures


def _pairs_by_id(first: list[dict[str, Any]],
                 second: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    other = {r["id"]: r for r in second}
    return [(r, other[r["id"]]) for r in first if r["id"] in other]


def rewardbench_figures(rows: dict[tuple[str, int], list[dict[str, Any]]], arms: Sequence[str],
                        seeds: Sequence[int]) -> list[Figure]:
    """Section scores and their average, as RewardBench weighs subsets
    (:func:`crome.evaluate.metrics.rewardbench_weights`), with subsets as strata."""
    from crome.evaluate.metrics import MATH_PRM_WEIGHT

    section_of = {s: sec for sec, subs in REWARDBENCH_SECTIONS.items() for s in subs}
    ids, by_model = _aligned(rows, "id", lambda r: r["outcome"] != "neutral"
                             and r["subset"] in section_of)
    if not ids:
        return []
    ref = by_model[(arms[0], seeds[0])]
    subsets = [ref[i]["subset"] for i in ids]
    names = sorted(set(subsets))
    strata = np.array([names.index(s) for s in subsets])
    count = {s: subsets.count(s) for s in names}
    weight = {s: float(MATH_PRM_WEIGHT if s == "math-prm" else count[s]) for s in names}
    values = _stack(arms, seeds, ids, by_model, _correct)
    figures, section_w = [], []
    present = [sec for sec in REWARDBENCH_SECTIONS if any(section_of[s] == sec for s in names)]
    for sec in present:
        total = sum(weight[s] for s in names if section_of[s] == sec)
        w = np.array([weight[s] / total / count[s] if section_of[s] == sec else 0.0
                      for s in subsets])
        section_w.append(w)
        n = sum(count[s] for s in names if section_of[s] == sec)
        figures.append(Figure(f"RewardBench {sec} (n={n})", values, weights=w, strata=strata))
    label = "average" if len(present) == len(REWARDBENCH_SECTIONS) else \
        f"average of {len(present)} sections"
    figures.append(Figure(f"RewardBench {label} (n={len(ids)})", values,
                          weights=np.mean(section_w, axis=0), strata=strata))
    return figures


def perturbation_figures(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> list[Figure]:
    """Mean accuracy drop over the neutral (both-sides) perturbations and over the baits,
    per pair: a pair's value is its share of the mean-over-perturbations drop."""
    reports = {(a, s): json.loads((out / f"seed-{s}" / "eval" / f"perturb-{slug(a)}.json")
                                  .read_text()) for a in arms for s in seeds}
    rows = {(a, s): _read_jsonl(out / f"seed-{s}" / "eval" / f"perturb-examples-{slug(a)}.jsonl")
            for a in arms for s in seeds}
    first = reports[(arms[0], seeds[0])]
    figures = []
    for bait, label in ((False, "perturbations, both sides: mean drop (pts)"),
                        (True, "perturbations, bait on rejected: mean drop (pts)")):
        kinds = {t["id"]: t["n"] for t in first["transformations"]
                 if t["bait"] == bait and t["n"]}
        if not kinds:
            continue
        pair_ids = list(dict.fromkeys(r["id"] for r in rows[(arms[0], seeds[0])]
                                      if r["perturbation"] in kinds))

        def per_pair(model: tuple[str, int], kinds: dict[str, int] = kinds,
                     pair_ids: list[str] = pair_ids) -> list[float]:
            acc = dict.fromkeys(pair_ids, 0.0)
            for r in rows[model]:
                if r["perturbation"] in kinds:
                    drop = float(r["margin_clean"] > 0) - float(r["margin"] > 0)
                    acc[r["id"]] += drop / (kinds[r["perturbation"]] * len(kinds))
            return [acc[i] for i in pair_ids]

        values = {a: np.array([per_pair((a, s)) for s in seeds]) for a in arms}
        figures.append(Figure(f"{label} (n={len(pair_ids)} pairs × {len(kinds)})", values,
                              weights=np.ones(len(pair_ids))))
    return figures


def bon_figures(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> list[Figure]:
    """Share of questions whose best-of-N pick is correct (tie-credited), per N."""
    rows = {(a, s): _read_jsonl(out / f"seed-{s}" / "eval" / f"bon-examples-{slug(a)}.jsonl")
            for a in arms for s in seeds}
    ns = sorted({int(n) for r in rows[(arms[0], seeds[0])] for n in r["picks"]})
    # a pairwise model's headline pick is its knockout; its round-robin pick gets rows of its
    # own (a BT RM's pick, by reward, is the same in both rows)
    methods: list[str | None] = [None]
    if any(is_pairwise_arm(a) for a in arms):
        methods.append(ROUND_ROBIN)
    figures = []
    for method in methods:
        for n in ns:
            def pick(r: dict[str, Any], n: int = n, method: str | None = method) -> Any:
                picks = r.get("methods", {}).get(method, r["picks"]) if method else r["picks"]
                return picks.get(str(n))

            ids, by_model = _aligned(rows, "id", lambda r, pick=pick: pick(r) is not None)
            label = "" if method is None else ", PairPMs by round-robin"
            if ids:
                figures.append(Figure(f"GSM8K best-of-{n}{label}: pick correct (n={len(ids)})",
                                      _stack(arms, seeds, ids, by_model,
                                             lambda r, pick=pick: pick(r)["credit"]),
                                      weights=np.full(len(ids), 1 / len(ids))))
    return figures


def audit_summary(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """The audit's headline per arm, as mean and per-seed values: the share of causal probes
    whose reward moved the expected way, and the mean |Δ| (in reward std) under the neutral
    perturbations. (Per-probe rows are not kept, so these carry no bootstrap CI.)"""
    summary: dict[str, Any] = {}
    for a in arms:
        expected, invariance = [], []
        for s in seeds:
            rep = json.loads((out / f"seed-{s}" / "eval" / f"audit-{slug(a)}.json").read_text())
            n = sum(x["n"] for x in rep["sensitivity"])
            expected.append(sum(x["expected_rate"] * x["n"] for x in rep["sensitivity"]) / n
                            if n else None)
            deltas = [x["mean_abs_delta_std"] for x in rep["invariance"]
                      if x["mean_abs_delta_std"] is not None]
            invariance.append(sum(deltas) / len(deltas) if deltas else None)
        summary[a] = {"expected_direction_rate": expected, "neutral_abs_delta_std": invariance}
    return summary


# --------------------------------------------------------------------------- output

def results_markdown(results: dict[str, Any]) -> str:
    """The figures (mean over seeds) per arm, then each difference with its 95% CI."""
    arms = list(results["arms"])
    seeds = results["options"]["seeds"]
    lines = [(f"Mean over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); accuracies and "
             f"rates in %, Spearman as a correlation."), "",
             "| figure | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for name, fig in results["figures"].items():
        cells = [format_value(fig["arms"][a]["mean"], fig["scale"]) for a in arms]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diffs = results["differences"]
    if diffs:
        pairs = list(dict.fromkeys((d["arm"], d["reference"]) for d in diffs))
        lines += ["", (f"Differences, paired bootstrap 95% CI over units and seeds "
                      f"({diffs[0]['replicates']} replicates):"), "",
                  "| figure | " + " | ".join(f"{a} − {r}" for a, r in pairs) + " |",
                  "|---|" + "---:|" * len(pairs)]
        for name, fig in results["figures"].items():
            by_pair = {(d["arm"], d["reference"]): d for d in diffs if d["figure"] == name}
            cells = [format_difference(by_pair[p]["diff"], *by_pair[p]["ci95"], fig["scale"])
                     if p in by_pair else "–"
                     for p in pairs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "ARMS",
    "PRESETS",
    "ExperimentOptions",
    "arm_data",
    "collect_figures",
    "comparisons",
    "experiment",
    "preset_options",
    "results_markdown",
]
