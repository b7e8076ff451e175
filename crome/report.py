"""The report stage: one self-contained HTML page and a Markdown summary comparing runs.

A *run* is a folder of JSON result files, read from the folder itself and from its ``eval/``
sub-folder. Each file was written by one scorer (a trained reward model, or a reference
scorer such as ``longer-wins``), and any subset of them may be there:

* ``results-<scorer>.json`` (``crome eval``): held-out accuracy, length and format bias;
* ``perturb-<scorer>.json``: the perturbation suite, accuracy on the same pairs before and
  after each transformation (typos, added formatting, …);
* ``bon-<scorer>.json``: best-of-N on GSM8K, how often the solution the RM picks among N
  candidates is right, beside a random pick and the best possible pick;
* ``audit-<scorer>.json``: the causal audit, how far the reward moves when one causal
  attribute of an answer is degraded (it should move) and when a spurious transformation is
  applied (it should not), in units of the reward's standard deviation.

The page shows every model side by side, one section per question:

1. **Held-out accuracy** per headline row and per eval set, best value per row in bold.
2. **Length and format bias**: accuracy where the chosen / the rejected answer is longer (or
   more formatted), Spearman(reward, length), length-controlled accuracy, and accuracy per
   length-ratio bin. A robust RM draws a flat line there; a length-biased one climbs from
   left (rejected answer much longer) to right (chosen answer much longer).
3. **Perturbation suite**: accuracy, drop in points (> 0 = worse than on the clean pairs)
   and consistency (share of pairs whose verdict did not change) per transformation, with a
   bar chart of the drops. A robust RM's bars stay near zero.
4. **Best-of-N**: accuracy of the RM's pick for each N, between the random pick (dashed)
   and the best possible pick (dotted).
5. **Causal audit**: standardised reward change per degraded attribute (sensitivity: should
   be clearly negative) and per spurious transformation (invariance: should be near 0), as
   heatmaps and tables.

A section no run has data for is one line saying so. Each section says which data sets its
numbers came from (the files' ``sets`` / ``source`` fields). Accuracies are percentages with
one decimal; "–" marks a value that is missing or undefined (``null`` in the file). The
Markdown file holds the same tables without the plots.

The page loads nothing (no external CSS, script, font or link): plots are PNGs drawn by
matplotlib's Agg canvas and embedded as base64 ``data:`` URIs, so the file can be mailed or
archived alone. Figures are made with ``matplotlib.figure.Figure``, not pyplot, so no global
registry keeps them alive (nothing to close, nothing leaks) and the importer's matplotlib
backend is left alone. A tiny inline script records on ``<body>`` how many plots the browser
decoded (``data-plots-loaded`` of ``data-plots-total``), which the tests read back from
headless Chromium.

Bad input (a folder without result files, a file that is not JSON or lacks a field the
report reads) raises :class:`ValueError` naming the file and the field.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crome import __version__
from crome.evaluate.run import HEADLINE_ROWS

KINDS: tuple[str, ...] = ("results", "perturb", "bon", "audit")
_FILE_RE = re.compile(r"(results|perturb|bon|audit)-(.+)\.json")
# Shown first in the length-bias plot: the set the quickstart trains for.
FIRST_BIAS_SET = "hh-rlhf/helpful-base"
# Sets whose whole-set accuracy is already a headline row (no second row for them).
_SETS_IN_HEADLINE = {set_name for _, set_name, subsets in HEADLINE_ROWS if subsets is None}
_HEADLINE_ORDER = {label: i for i, (label, _, _) in enumerate(HEADLINE_ROWS)}
MISSING = "–"

# --- schema ------------------------------------------------------------------------------
# What the report reads from each file (other fields are ignored). A dict maps field names
# to their schema ("name?" = optional, "*" = every key), a one-item list is a list of such
# items, and a string names a leaf type (_LEAF_CHECKS).
TEXT, COUNT, POSITIVE, NUMBER = "text", "an integer >= 0", "an integer >= 1", "a number or null"
_LENGTH_BIAS = {"n_chosen_longer": COUNT, "accuracy_chosen_longer": NUMBER,
                "n_rejected_longer": COUNT, "accuracy_rejected_longer": NUMBER,
                "spearman": NUMBER}
_FORMAT_BIAS = {"n_chosen_more_formatted": COUNT, "accuracy_chosen_more_formatted": NUMBER,
                "n_rejected_more_formatted": COUNT, "accuracy_rejected_more_formatted": NUMBER}
_LENGTH_BINS = {"accuracy": NUMBER,
                "bins": [{"lo": NUMBER, "hi": NUMBER, "n": COUNT, "accuracy": NUMBER}]}
SCHEMAS: dict[str, dict[str, Any]] = {
    "results": {
        "scorer": TEXT,
        "sets": {"*": {"n_pairs": COUNT, "accuracy": NUMBER, "length_bias?": _LENGTH_BIAS,
                       "format_bias?": _FORMAT_BIAS, "length_controlled?": _LENGTH_BINS}},
        "headline": {"*": {"n": COUNT, "accuracy": NUMBER}},
    },
    "perturb": {
        "scorer": TEXT, "sets?": [TEXT], "seed?": COUNT,
        "clean": {"n": COUNT, "accuracy": NUMBER},
        "transformations": [{"id": TEXT, "kind?": TEXT, "description?": TEXT, "n": COUNT,
                             "accuracy": NUMBER, "drop": NUMBER, "consistency?": NUMBER}],
    },
    "bon": {
        "scorer": TEXT, "source?": TEXT, "seed?": COUNT,
        "results": [{"n": POSITIVE, "questions?": COUNT, "rm": NUMBER, "random?": NUMBER,
                     "best?": NUMBER}],
    },
    "audit": {
        "scorer": TEXT, "reward_std?": NUMBER,
        "sensitivity?": [{"attribute": TEXT, "direction?": TEXT, "n": COUNT,
                          "drop_rate": NUMBER, "mean_delta_std": NUMBER}],
        "invariance?": [{"transformation": TEXT, "n": COUNT, "mean_abs_delta_std": NUMBER}],
    },
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_LEAF_CHECKS: dict[str, Callable[[Any], bool]] = {
    TEXT: lambda v: isinstance(v, str),
    COUNT: lambda v: _is_int(v) and v >= 0,
    POSITIVE: lambda v: _is_int(v) and v >= 1,
    NUMBER: lambda v: v is None or _is_number(v),
}


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(value: Any, schema: Any, where: str, path: Path) -> None:
    """Raise ``ValueError("<path>: field '<where>' …")`` where ``value`` breaks ``schema``."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: field '{where}' should be {what}, got {value!r:.60}")

    if isinstance(schema, str):
        if not _LEAF_CHECKS[schema](value):
            raise bad(schema)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise bad("a list")
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]", path)
    else:
        if not isinstance(value, dict):
            raise bad("an object") if where else ValueError(
                f"{path}: should hold a JSON object, got {type(value).__name__}")
        for key, sub in schema.items():
            if key == "*":
                for name, item in value.items():
                    _check(item, sub, _field(where, name), path)
                continue
            name = key.rstrip("?")
            if value.get(name) is None and key.endswith("?"):
                continue
            if name not in value:
                raise ValueError(f"{path}: missing field '{_field(where, name)}'")
            _check(value[name], sub, _field(where, name), path)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def load_result_file(path: Path, kind: str) -> dict[str, Any]:
    """One result file, checked against ``SCHEMAS[kind]``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    _check(data, SCHEMAS[kind], "", path)
    return data


# --- runs --------------------------------------------------------------------------------

@dataclass
class Model:
    """One scorer's files in one run; ``label`` names it in the report (unique there)."""

    label: str
    scorer: str
    run: Path
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> its JSON


@dataclass
class Run:
    path: Path
    name: str
    models: list[Model]


def _run_name(path: Path) -> str:
    """The folder's name; for a run's ``eval/`` folder given directly, the run's name."""
    resolved = path.resolve()
    return resolved.parent.name if resolved.name == "eval" else resolved.name


def _result_files(folder: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the result files in ``folder`` and ``folder/eval``, results first."""
    found = [(m.group(1), f) for d in (folder, folder / "eval") if d.is_dir()
             for f in d.iterdir() if f.is_file() and (m := _FILE_RE.fullmatch(f.name))]
    return sorted(found, key=lambda kf: (KINDS.index(kf[0]), kf[1].name, str(kf[1])))


def _collect_run(folder: Path, prefix: bool) -> Run:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = _result_files(folder)
    if not files:
        raise ValueError(f"{folder}: no result files (results-*.json, perturb-*.json, "
                         "bon-*.json, audit-*.json) in it or in its eval/ folder")
    name = _run_name(folder)
    models: dict[str, Model] = {}
    for kind, path in files:
        data = load_result_file(path, kind)
        scorer = data["scorer"]
        model = models.setdefault(scorer, Model(f"{name}/{scorer}" if prefix else scorer,
                                                scorer, folder))
        if kind in model.files:
            raise ValueError(f"{path}: a second {kind} file for scorer {scorer!r} in this "
                             f"run (the first is {model.files[kind]})")
        model.files[kind] = path
        model.data[kind] = data
    return Run(folder, name, list(models.values()))


def collect_runs(paths: Sequence[Path]) -> list[Run]:
    """Read the result files of each run folder (and of its ``eval/`` sub-folder).

    With more than one folder, model labels are prefixed with the folder's name
    (``runA/vanilla-rm``), so the same scorer in two runs stays two models.
    """
    if not paths:
        raise ValueError("no run folder given")
    runs = [_collect_run(Path(p), prefix=len(paths) > 1) for p in paths]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.name in seen and len(runs) > 1:
            raise ValueError(f"{run.path}: has the same name as {seen[run.name]}; the "
                             "models' labels would clash (rename or link one of them)")
        seen[run.name] = run.path
    return runs


# --- tables ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    text: str
    numeric: bool = True
    bold: bool = False


def _label(text: str) -> Cell:
    return Cell(text, numeric=False)


@dataclass
class Table:
    """Rows of cells under ``columns``; ``groups`` is an HTML header row above them,
    ``(label, span)`` pairs (Markdown prefixes each column with its group's label)."""

    columns: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] = field(default_factory=list)
    caption: str = ""

    def flat_columns(self) -> list[str]:
        if not self.groups:
            return self.columns
        prefixes = [g for g, span in self.groups for _ in range(span)]
        return [f"{g}: {c}" if g else c for g, c in zip(prefixes, self.columns, strict=True)]


def _grouped(lead: Sequence[str], models: Sequence[Model],
             per_model: Sequence[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Columns ``lead`` then ``per_model`` once per model, with the model labels as groups."""
    columns = [*lead, *(c for _ in models for c in per_model)]
    groups = [("", len(lead)), *((m.label, len(per_model)) for m in models)]
    return columns, groups


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.1f}"


def _points(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:+.1f}"


def _signed(x: float | None) -> str:
    return MISSING if x is None else f"{x:+.2f}"


def _pct_n(x: float | None, n: int | None) -> str:
    return MISSING if n is None else f"{_pct(x)} ({n})"


def _best_bold(values: Sequence[float | None], texts: Sequence[str]) -> list[Cell]:
    """Cells for ``texts``; the highest of two or more values is bold (ties: all of them)."""
    present = [v for v in values if v is not None]
    best = max(present) if len(present) > 1 else None
    return [Cell(t, bold=best is not None and v == best)
            for v, t in zip(values, texts, strict=True)]


# --- plots -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    alt: str
    png: bytes


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _colour(index: int) -> Any:
    return colormaps["tab10"](index % 10)


def _nan(x: float | None, scale: float = 1.0) -> float:
    return math.nan if x is None else x * scale


def _style_axes(ax: Axes) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# --- sections ----------------------------------------------------------------------------

@dataclass
class Section:
    anchor: str
    title: str
    intro: str = ""
    sources: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str = ""  # set when no run has the data: the one line shown instead


@dataclass
class ReportOptions:
    title: str = "crome robustness report"
    max_bias_sets: int = 4  # subplots of the length-bin plot (hh-rlhf/helpful-base first)
    dpi: int = 100
    generated_at: datetime | None = None  # None: now (UTC)


@dataclass
class ReportContext:
    models: list[Model]
    colours: dict[str, Any]
    options: ReportOptions

    def having(self, kind: str) -> list[Model]:
        return [m for m in self.models if kind in m.data]


def _missing(anchor: str, title: str, files: str) -> Section:
    return Section(anchor, title, missing=f"Not in these runs (no {files} file).")


def _sources(models: Sequence[Model], describe: Callable[[Model], str]) -> list[str]:
    """``"model, model: description"`` lines, models with the same description together."""
    by_text: dict[str, list[str]] = {}
    for m in models:
        by_text.setdefault(describe(m), []).append(m.label)
    return [f"{', '.join(labels)}: {text}" for text, labels in by_text.items()]


def _ordered(keys: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(keys))


# held-out accuracy

def _accuracy_rows(model: Model) -> dict[str, dict[str, Any]]:
    """Headline rows, then the whole-set accuracy of each set that no headline row covers."""
    results = model.data["results"]
    rows = dict(results["headline"])
    for set_name, summary in results["sets"].items():
        if set_name not in _SETS_IN_HEADLINE:
            rows[f"{set_name} (all pairs)"] = {"n": summary["n_pairs"],
                                              "accuracy": summary["accuracy"]}
    return rows


def _row_order(label: str) -> int:
    """Headline rows in ``HEADLINE_ROWS`` order, then any other row (sorted stably)."""
    return _HEADLINE_ORDER.get(label, len(_HEADLINE_ORDER))


def accuracy_section(ctx: ReportContext) -> Section:
    models = ctx.having("results")
    if not models:
        return _missing("accuracy", "Held-out accuracy", "results-*.json")
    per_model = {m.label: _accuracy_rows(m) for m in models}
    labels = sorted(_ordered(label for rows in per_model.values() for label in rows),
                    key=_row_order)
    table_rows = []
    for label in labels:
        cells = [per_model[m.label].get(label) for m in models]
        ns = _ordered(str(c["n"]) for c in cells if c is not None)
        accs = [c["accuracy"] if c else None for c in cells]
        table_rows.append([_label(label), Cell(" / ".join(ns)),
                           *_best_bold(accs, [_pct(a) for a in accs])])
    table = Table(["held-out set", "pairs", *(m.label for m in models)], table_rows)
    return Section(
        "accuracy", "Held-out accuracy",
        intro="Share of preference pairs whose chosen answer gets the higher reward (%, ties "
              "count as wrong); best per row in bold.",
        sources=_sources(models, lambda m: ", ".join(
            f"{s} ({v['n_pairs']} pairs)" for s, v in m.data["results"]["sets"].items())),
        tables=[table])


# length and format bias

def _bias_sets(models: Sequence[Model]) -> list[str]:
    names = _ordered(s for m in models for s, v in m.data["results"]["sets"].items()
                     if any(v.get(k) for k in ("length_bias", "format_bias",
                                               "length_controlled")))
    return sorted(names, key=lambda s: s != FIRST_BIAS_SET)  # stable: the rest keep order


def _bias_table(set_name: str, models: Sequence[Model]) -> Table:
    summaries = [(m, m.data["results"]["sets"].get(set_name)) for m in models]
    summaries = [(m, s) for m, s in summaries if s is not None]
    with_format = any(s.get("format_bias") for _, s in summaries)
    columns = ["model", "pairs", "acc. chosen longer (n)", "acc. rejected longer (n)",
               "Spearman(reward, length)", "length-controlled acc."]
    if with_format:
        columns += ["acc. chosen more formatted (n)", "acc. rejected more formatted (n)"]
    rows = []
    for model, s in summaries:
        lb, fb = s.get("length_bias") or {}, s.get("format_bias") or {}
        row = [_label(model.label), Cell(str(s["n_pairs"])),
               Cell(_pct_n(lb.get("accuracy_chosen_longer"), lb.get("n_chosen_longer"))),
               Cell(_pct_n(lb.get("accuracy_rejected_longer"), lb.get("n_rejected_longer"))),
               Cell(_signed(lb.get("spearman"))),
               Cell(_pct((s.get("length_controlled") or {}).get("accuracy")))]
        if with_format:
            row += [Cell(_pct_n(fb.get("accuracy_chosen_more_formatted"),
                                fb.get("n_chosen_more_formatted"))),
                    Cell(_pct_n(fb.get("accuracy_rejected_more_formatted"),
                                fb.get("n_rejected_more_formatted")))]
        rows.append(row)
    return Table(columns, rows, caption=set_name)


def _bin_key(b: dict[str, Any]) -> tuple[float, float]:
    return (-math.inf if b["lo"] is None else b["lo"], math.inf if b["hi"] is None else b["hi"])


def _bin_label(lo: float, hi: float) -> str:
    if lo == -math.inf:
        return f"<{hi:g}"
    if hi == math.inf:
        return f">{lo:g}"
    return f"{lo:g}–{hi:g}"


def _length_bins_plot(sets: Sequence[str], ctx: ReportContext) -> Plot:
    ncols = min(len(sets), 2)
    nrows = math.ceil(len(sets) / ncols)
    fig = _figure(5.4 * ncols if len(sets) > 1 else 7.0, 3.4 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, set_name in zip(axes, sets, strict=False):  # spare axes hidden below
        curves = {m.label: {_bin_key(b): b["accuracy"]
                            for b in m.data["results"]["sets"][set_name]
                            .get("length_controlled", {}).get("bins", [])}
                  for m in ctx.having("results") if set_name in m.data["results"]["sets"]}
        keys = sorted({k for c in curves.values() for k in c})
        x = np.arange(len(keys))
        for label, curve in curves.items():
            ax.plot(x, [_nan(curve.get(k), 100) for k in keys], marker="o",
                    color=ctx.colours[label], label=label)
        ax.axhline(50, color="#888888", linestyle=":", linewidth=1)
        ax.set_xticks(x, [_bin_label(*k) for k in keys])
        ax.set_ylim(0, 100)
        ax.set_title(set_name, fontsize=11)
        ax.set_xlabel("length ratio chosen / rejected")
        ax.set_ylabel("accuracy (%)")
        _style_axes(ax)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
               frameon=False)
    return Plot(f"Accuracy per length-ratio bin, one panel per set ({', '.join(sets)})",
                _png(fig, ctx.options.dpi))


def bias_section(ctx: ReportContext) -> Section:
    title = "Length and format bias"
    models = ctx.having("results")
    sets = _bias_sets(models) if models else []
    if not sets:
        return _missing("bias", title, "results-*.json with length_bias")
    section = Section(
        "bias", title,
        intro="Accuracy (%) where the chosen / the rejected answer is longer in characters (or "
              "more formatted): an unbiased RM does about as well on both sides. The "
              "length-controlled accuracy averages the five length-ratio bins of the plot, "
              "so each length regime weighs the same.",
        tables=[_bias_table(s, models) for s in sets])
    plotted = [s for s in sets if any(
        (m.data["results"]["sets"].get(s) or {}).get("length_controlled") for m in models)]
    if plotted:
        section.plots.append(_length_bins_plot(plotted[:ctx.options.max_bias_sets], ctx))
    if len(plotted) > ctx.options.max_bias_sets:
        section.notes.append(f"The plot shows the first {ctx.options.max_bias_sets} of "
                             f"{len(plotted)} sets.")
    if not any(v.get("format_bias") for m in models for v in m.data["results"]["sets"].values()):
        section.notes.append("Format bias is not in these result files (written by an "
                             "older crome eval).")
    return section


# perturbation suite

def _transformations(models: Sequence[Model]) -> dict[str, dict[str, Any]]:
    """Every transformation id, in order of first appearance, with its first description."""
    found: dict[str, dict[str, Any]] = {}
    for m in models:
        for t in m.data["perturb"]["transformations"]:
            found.setdefault(t["id"], t)
    return found


def _perturb_table(models: Sequence[Model], transformations: dict[str, dict[str, Any]]) -> Table:
    columns, groups = _grouped(["transformation"], models,
                               ["acc.", "drop (pts)", "consistency"])
    clean = [_label("clean")]
    for m in models:
        clean += [Cell(_pct(m.data["perturb"]["clean"]["accuracy"])), Cell(MISSING),
                  Cell(MISSING)]
    rows = [clean]
    for tid in transformations:
        row = [_label(tid)]
        for m in models:
            t = next((t for t in m.data["perturb"]["transformations"] if t["id"] == tid), {})
            row += [Cell(_pct(t.get("accuracy"))), Cell(_points(t.get("drop"))),
                    Cell(_pct(t.get("consistency")))]
        rows.append(row)
    return Table(columns, rows, groups)


def _transformation_table(transformations: dict[str, dict[str, Any]]) -> Table:
    """What each transformation does, once (the per-model table stays narrow)."""
    rows = [[_label(tid), _label(info.get("kind", "")), _label(info.get("description", ""))]
            for tid, info in transformations.items()]
    return Table(["transformation", "kind", "what it does"], rows,
                 caption="the transformations")


def _perturb_plot(models: Sequence[Model], ids: Sequence[str], ctx: ReportContext) -> Plot:
    height = 0.8 / len(models)
    fig = _figure(9.5, 1.3 + len(ids) * max(0.42, 0.2 * len(models)))
    ax = fig.subplots()
    y = np.arange(len(ids))
    for j, m in enumerate(models):
        drops = {t["id"]: t["drop"] for t in m.data["perturb"]["transformations"]}
        ax.barh(y + (j - (len(models) - 1) / 2) * height,
                [_nan(drops.get(tid), 100) for tid in ids], height=height,
                color=ctx.colours[m.label], label=m.label)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(y, ids)
    ax.invert_yaxis()
    ax.set_xlabel("drop in accuracy (points; > 0 = worse than on the clean pairs)")
    ax.legend(loc="best", fontsize=9)
    _style_axes(ax)
    ax.grid(False, axis="y")
    return Plot("Accuracy drop per transformation, one bar per model", _png(fig, ctx.options.dpi))


def _perturb_source(m: Model) -> str:
    p = m.data["perturb"]
    seed = f", seed {p['seed']}" if "seed" in p else ""
    return f"{', '.join(p.get('sets') or ['sets not recorded'])} ({p['clean']['n']} pairs{seed})"


def perturb_section(ctx: ReportContext) -> Section:
    title = "Perturbation suite"
    models = ctx.having("perturb")
    if not models:
        return _missing("perturb", title, "perturb-*.json")
    transformations = _transformations(models)
    section = Section(
        "perturb", title,
        intro="Accuracy (%) on the pairs after each transformation; drop = accuracy on the "
              "same pairs unchanged minus accuracy transformed, in points (> 0 = worse); "
              "consistency = share of pairs (%) whose verdict did not change.",
        sources=_sources(models, _perturb_source),
        tables=[_perturb_table(models, transformations),
                _transformation_table(transformations)])
    if transformations:
        section.plots.append(_perturb_plot(models, list(transformations), ctx))
    return section


# best-of-N

def _bon_rows(m: Model) -> dict[int, dict[str, Any]]:
    return {r["n"]: r for r in m.data["bon"]["results"]}


def _baselines(models: Sequence[Model]) -> list[tuple[list[Model], dict[int, dict[str, Any]]]]:
    """Models grouped by their random / best-possible curves (which depend only on the
    candidates, so they agree unless the runs sampled different candidates)."""
    groups: dict[tuple[Any, ...], list[Model]] = {}
    for m in models:
        key = tuple((n, r.get("random"), r.get("best")) for n, r in sorted(_bon_rows(m).items()))
        if any(random is not None or best is not None for _, random, best in key):
            groups.setdefault(key, []).append(m)
    return [(ms, _bon_rows(ms[0])) for ms in groups.values()]


def _baseline_name(kind: str, group: Sequence[Model], several: bool) -> str:
    return f"{kind} ({', '.join(m.label for m in group)})" if several else kind


def _bon_table(models: Sequence[Model], ns: Sequence[int],
               baselines: Sequence[tuple[list[Model], dict[int, dict[str, Any]]]]) -> Table:
    several = len(baselines) > 1
    columns = ["N", "questions", *(m.label for m in models)]
    for group, _ in baselines:
        columns += [_baseline_name("random", group, several),
                    _baseline_name("best possible", group, several)]
    rows = []
    for n in ns:
        picks = [_bon_rows(m).get(n, {}) for m in models]
        questions = _ordered(str(p["questions"]) for p in picks if "questions" in p)
        accs = [p.get("rm") for p in picks]
        row = [Cell(str(n)), Cell(" / ".join(questions) or MISSING),
               *_best_bold(accs, [_pct(a) for a in accs])]
        for _, rows_by_n in baselines:
            r = rows_by_n.get(n, {})
            row += [Cell(_pct(r.get("random"))), Cell(_pct(r.get("best")))]
        rows.append(row)
    return Table(columns, rows)


def _bon_plot(models: Sequence[Model], ns: Sequence[int],
              baselines: Sequence[tuple[list[Model], dict[int, dict[str, Any]]]],
              ctx: ReportContext) -> Plot:
    fig = _figure(8.0, 4.6 + 0.1 * len(models))
    ax = fig.subplots()
    for m in models:
        rows = _bon_rows(m)
        ax.plot(ns, [_nan(rows.get(n, {}).get("rm"), 100) for n in ns], marker="o",
                color=ctx.colours[m.label], label=f"{m.label} (RM pick)")
    several = len(baselines) > 1
    for group, rows in baselines:
        colour = ctx.colours[group[0].label] if several else None
        for kind, key, style in (("random", "random", "--"), ("best possible", "best", ":")):
            ax.plot(ns, [_nan(rows.get(n, {}).get(key), 100) for n in ns], linestyle=style,
                    color=colour or ("#777777" if key == "random" else "black"),
                    label=_baseline_name(kind, group, several))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel("N (candidate solutions per question)")
    ax.set_ylabel("accuracy of the picked solution (%)")
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    _style_axes(ax)
    return Plot("Best-of-N accuracy against N, RM pick per model with random and best "
                "possible picks", _png(fig, ctx.options.dpi))


def _bon_source(m: Model) -> str:
    b = m.data["bon"]
    seed = f", seed {b['seed']}" if "seed" in b else ""
    return f"{b.get('source', 'source not recorded')}{seed}"


def bon_section(ctx: ReportContext) -> Section:
    title = "Best-of-N"
    models = ctx.having("bon")
    if not models:
        return _missing("bon", title, "bon-*.json")
    ns = sorted({n for m in models for n in _bon_rows(m)})
    baselines = _baselines(models)
    section = Section(
        "bon", title,
        intro="For each question, N candidate solutions; the share of questions (%) whose "
              "picked solution is right: the RM's highest-reward pick, a random pick, and the "
              "best possible pick (right whenever any candidate is).",
        sources=_sources(models, _bon_source),
        tables=[_bon_table(models, ns, baselines)])
    if ns:
        section.plots.append(_bon_plot(models, ns, baselines, ctx))
    return section


# causal audit

def _sensitivity_key(entry: dict[str, Any]) -> str:
    direction = entry.get("direction")
    return f"{entry['attribute']} ({direction})" if direction else entry["attribute"]


def _audit_entries(m: Model, part: str) -> dict[str, dict[str, Any]]:
    key = _sensitivity_key if part == "sensitivity" else (lambda e: e["transformation"])
    return {key(e): e for e in m.data["audit"].get(part) or []}


def _audit_table(models: Sequence[Model], part: str, first: str,
                 fields: Sequence[tuple[str, str, Callable[[Any], str]]]) -> Table:
    entries = {m.label: _audit_entries(m, part) for m in models}
    keys = _ordered(k for e in entries.values() for k in e)
    columns, groups = _grouped([first], models, [name for name, _, _ in fields])
    rows = []
    for k in keys:
        row = [_label(k)]
        for m in models:
            e = entries[m.label].get(k, {})
            row += [Cell(MISSING if e.get(f) is None else fmt(e[f])) for _, f, fmt in fields]
        rows.append(row)
    return Table(columns, rows, groups, caption=part)


def _heatmap(models: Sequence[Model], part: str, value: str, diverging: bool,
             ctx: ReportContext) -> Plot:
    entries = {m.label: _audit_entries(m, part) for m in models}
    keys = _ordered(k for e in entries.values() for k in e)
    matrix = np.array([[_nan(entries[m.label].get(k, {}).get(value)) for k in keys]
                       for m in models])
    finite = np.abs(matrix[np.isfinite(matrix)])
    top = max(float(finite.max()) if finite.size else 0.0, 0.1)
    # a reward that falls (sensitivity) is blue, one that rises is red; any move is orange
    cmap = colormaps["RdBu_r" if diverging else "Oranges"].with_extremes(bad="#eeeeee")
    longest = max(len(m.label) for m in models)
    fig = _figure(max(5.0, 0.9 * len(keys) + 0.08 * longest + 2.0),
                  0.5 * len(models) + 0.04 * max(len(k) for k in keys) + 1.4)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, aspect="auto",
                      vmin=-top if diverging else 0.0, vmax=top)
    for (i, j), v in np.ndenumerate(matrix):
        r, g, b, _ = cmap(image.norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
        ax.text(j, i, MISSING if math.isnan(v) else f"{v:+.2f}" if diverging else f"{v:.2f}",
                ha="center", va="center", fontsize=9,
                color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(models)), [m.label for m in models])
    what = "mean reward change / reward std" if diverging else "mean |reward change| / reward std"
    fig.colorbar(image, ax=ax, label="Δ / std" if diverging else "|Δ| / std", shrink=0.9)
    ax.set_title(f"{part}: {what}", fontsize=11)
    return Plot(f"Causal audit {part} heatmap, models by "
                f"{'attributes' if diverging else 'transformations'}: {what}",
                _png(fig, ctx.options.dpi))


def audit_section(ctx: ReportContext) -> Section:
    title = "Causal audit"
    models = ctx.having("audit")
    if not models:
        return _missing("audit", title, "audit-*.json")
    section = Section(
        "audit", title,
        intro="Reward change in units of the model's reward standard deviation. Sensitivity: "
              "one causal attribute of the answer degraded, the reward should fall (share of "
              "answers whose reward fell, %, and mean change / std, clearly < 0). Invariance: "
              "a spurious transformation, the reward should stay (mean |change| / std, near 0).",
        sources=_sources(models, lambda m: "reward std " + (
            MISSING if m.data["audit"].get("reward_std") is None
            else f"{m.data['audit']['reward_std']:.3g}")))
    parts = (("sensitivity", "attribute (direction)", "mean_delta_std", True,
              [("n", "n", str), ("reward fell (%)", "drop_rate", _pct),
               ("mean Δ / std", "mean_delta_std", _signed)]),
             ("invariance", "transformation", "mean_abs_delta_std", False,
              [("n", "n", str), ("mean |Δ| / std", "mean_abs_delta_std", "{:.2f}".format)]))
    for part, first, value, diverging, fields in parts:
        having = [m for m in models if m.data["audit"].get(part)]
        if having:
            section.tables.append(_audit_table(having, part, first, fields))
            section.plots.append(_heatmap(having, part, value, diverging, ctx))
        else:
            section.notes.append(f"No {part} entries in these audit files.")
    return section


def experiment_section(results: dict[str, Any], dpi: int = 100) -> Section:
    """The arms of a ``crome experiment`` run: each figure's mean over seeds, and each
    difference between arms with its paired bootstrap 95% CI (table and CI-bar plot)."""
    from crome.evaluate.stats import format_difference, format_value

    arms = list(results["arms"])
    seeds = results["options"]["seeds"]
    figures = results["figures"]
    diffs = results["differences"]

    means = Table(["figure", *arms], [
        [_label(name), *(Cell(format_value(f["arms"][a]["mean"], f["scale"])) for a in arms)]
        for name, f in figures.items()], caption=f"Mean over seeds {seeds}")
    pairs = list(dict.fromkeys((d["arm"], d["reference"]) for d in diffs))
    tables = [means]
    plots = []
    if pairs:
        rows = []
        for name, f in figures.items():
            by_pair = {(d["arm"], d["reference"]): d for d in diffs if d["figure"] == name}
            cells = []
            for p in pairs:
                d = by_pair.get(p)
                if d is None:
                    cells.append(Cell(MISSING))
                    continue
                lo, hi = d["ci95"]
                cells.append(Cell(format_difference(d["diff"], lo, hi, f["scale"]),
                                  bold=lo > 0 or hi < 0))
            rows.append([_label(name), *cells])
        tables.append(Table(["figure", *(f"{a} − {r}" for a, r in pairs)], rows,
                            caption="Differences with paired bootstrap 95% CIs over units "
                                    "and seeds (bold: the CI excludes 0)"))
        plots.append(_diff_plot(figures, diffs, pairs, dpi))
    return Section("experiment", "Experiment: arms and confidence intervals",
                   intro=f"{len(arms)} arms × {len(seeds)} seeds; arms: "
                         + "; ".join(f"{a}: original pairs + {d}" if a != "vanilla" else
                                     f"{a}: {d}" for a, d in results["arms"].items()),
                   tables=tables, plots=plots)


def _diff_plot(figures: dict[str, Any], diffs: Sequence[dict[str, Any]],
               pairs: Sequence[tuple[str, str]], dpi: int) -> Plot:
    """One row per figure, one marker per comparison: the difference and its CI bar."""
    names = [n for n in figures if figures[n]["scale"] != 1.0]
    fig = _figure(8, 0.32 * len(names) * max(1, len(pairs)) ** 0.5 + 1.2)
    ax = fig.add_subplot()
    step = 0.8 / max(1, len(pairs))
    for k, (arm, ref) in enumerate(pairs):
        by_name = {d["figure"]: d for d in diffs if (d["arm"], d["reference"]) == (arm, ref)}
        ys, xs, lo, hi = [], [], [], []
        for i, name in enumerate(names):
            d = by_name.get(name)
            if d is None:
                continue
            ys.append(i - 0.4 + step * (k + 0.5))
            xs.append(100 * d["diff"])
            lo.append(100 * (d["diff"] - d["ci95"][0]))
            hi.append(100 * (d["ci95"][1] - d["diff"]))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=3, capsize=2, color=_colour(k),
                    label=f"{arm} − {ref}")
    ax.axvline(0, color="#888", linewidth=0.8)
    ax.set_yticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("difference (points), paired bootstrap 95% CI")
    ax.legend(fontsize=7, loc="best")
    _style_axes(ax)
    return Plot("Differences between arms with 95% confidence intervals", _png(fig, dpi))


SECTIONS: tuple[Callable[[ReportContext], Section], ...] = (
    accuracy_section, bias_section, perturb_section, bon_section, audit_section)


# --- rendering ---------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.25em;margin-top:2.2em;
 border-bottom:1px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1.2em;color:#1a5fb4;text-decoration:none}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
caption{text-align:left;font-weight:600;padding:.2em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;vertical-align:top}
th{background:#f5f5f5;font-weight:600;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{max-width:24em}td.text:first-child{white-space:nowrap}
img.plot{display:block;max-width:100%;height:auto;margin:1em 0}
.intro,.sources,.note{font-size:.92em}.sources,.note{color:#555}
.missing{color:#777;font-style:italic}
footer{margin-top:3em;padding-top:.5em;border-top:1px solid #ddd;color:#666;font-size:.85em}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var plots = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  document.body.dataset.plotsTotal = plots.length;
  document.body.dataset.plotsLoaded = plots.filter(function (img) {
    return img.complete && img.naturalWidth > 0; }).length;
});
"""

esc = html.escape


def _html_table(table: Table) -> str:
    out = ['<div class="scroll"><table>']
    if table.caption:
        out.append(f"<caption>{esc(table.caption)}</caption>")
    out.append("<thead>")
    if table.groups:
        out.append("<tr>" + "".join(f'<th colspan="{span}">{esc(label)}</th>'
                                    for label, span in table.groups) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
    out.append("</thead><tbody>")
    for row in table.rows:
        cells = []
        for c in row:
            text = f"<b>{esc(c.text)}</b>" if c.bold else esc(c.text)
            cells.append(f'<td class="{"num" if c.numeric else "text"}">{text}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _img(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{esc(plot.alt)}">'


def _html_section(s: Section) -> str:
    out = [f'<section id="{s.anchor}">', f"<h2>{esc(s.title)}</h2>"]
    if s.missing:
        out.append(f'<p class="missing">{esc(s.missing)}</p>')
    else:
        if s.intro:
            out.append(f'<p class="intro">{esc(s.intro)}</p>')
        if s.sources:
            out.append('<p class="sources">Data: ' + "<br>".join(esc(x) for x in s.sources)
                       + "</p>")
        out += [_html_table(t) for t in s.tables]
        out += [_img(p) for p in s.plots]
        out += [f'<p class="note">{esc(n)}</p>' for n in s.notes]
    out.append("</section>")
    return "\n".join(out)


def _footer_lines(runs: Sequence[Run], generated: datetime) -> list[str]:
    return [f"Runs: {', '.join(str(r.path) for r in runs)}",
            f"Generated {generated.strftime('%Y-%m-%d %H:%M:%S %Z')} by crome {__version__}."]


def render_html(sections: Sequence[Section], runs: Sequence[Run], title: str,
                generated: datetime) -> str:
    models = [m.label for r in runs for m in r.models]
    nav = " ".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections)
    footer = "<br>".join(esc(x) for x in _footer_lines(runs, generated))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>", f"<style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sources">{len(models)} models: {esc(", ".join(models))}</p>',
        f"<nav>{nav}</nav>",
        *(_html_section(s) for s in sections),
        f"<footer>{footer}</footer>", "</body>", "</html>", ""])


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [f"**{_md_escape(table.caption)}**", ""] if table.caption else []
    first = table.rows[0] if table.rows else []
    aligns = ["---:" if i < len(first) and first[i].numeric else "---"
              for i in range(len(table.columns))]
    out += [line(_md_escape(c) for c in table.flat_columns()), line(aligns)]
    out += [line(f"**{_md_escape(c.text)}**" if c.bold else _md_escape(c.text) for c in row)
            for row in table.rows]
    return "\n".join(out)


def render_markdown(sections: Sequence[Section], runs: Sequence[Run], title: str,
                    generated: datetime) -> str:
    out = [f"# {title}", "",
           "The plots are in report.html (same folder); this file holds the tables.", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.missing:
            out += [s.missing, ""]
            continue
        out += [s.intro, ""] if s.intro else []
        out += [f"Data: {x}  " for x in s.sources] + [""] if s.sources else []
        for t in s.tables:
            out += [_md_table(t), ""]
        out += [*s.notes, ""] if s.notes else []
    out += ["---", "", *(f"{x}  " for x in _footer_lines(runs, generated)), ""]
    return "\n".join(out)


# --- entry point -------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportPaths:
    html: Path
    markdown: Path


def build_report(runs: Sequence[Run], out_dir: Path,
                 options: ReportOptions | None = None,
                 leading: Sequence[Section] = ()) -> ReportPaths:
    """Write ``out_dir/report.html`` (self-contained, with plots) and ``out_dir/report.md``
    (the same tables) for every model of ``runs`` (from :func:`collect_runs`); ``leading``
    sections (an experiment's arms) come first."""
    options = options or ReportOptions()
    models = [m for r in runs for m in r.models]
    if not models:
        raise ValueError("no models to report on: no run, or runs without result files")
    ctx = ReportContext(models, {m.label: _colour(i) for i, m in enumerate(models)}, options)
    sections = [*leading, *(make(ctx) for make in SECTIONS)]
    generated = options.generated_at or datetime.now(UTC)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out / "report.html", out / "report.md")
    paths.html.write_text(render_html(sections, runs, options.title, generated),
                          encoding="utf-8")
    paths.markdown.write_text(render_markdown(sections, runs, options.title, generated),
                              encoding="utf-8")
    return paths
