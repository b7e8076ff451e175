"""The report stage on real ``crome eval`` results (two reference scorers on LLMBar), with
small hand-written perturbation / best-of-N / audit files whose numbers the tables must
show exactly, checked as files and as rendered by headless Chromium; and once on files that
the real perturbation, best-of-N and audit stages wrote."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from crome.data.sources import resolve_data_dir
from crome.evaluate.audit import audit, rules_probe_pairs
from crome.evaluate.bon import BoNOptions, run_bon
from crome.evaluate.perturb import PerturbOptions, evaluate_perturbations
from crome.evaluate.reference import get_reference_scorer
from crome.evaluate.run import evaluate_scorer, load_eval_sets
from crome.report import ReportOptions, build_report, collect_runs

SCORERS = ("longer-wins", "markdown-wins")
IMG_RE = re.compile(r'<img class="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)" '
                    r'alt="[^"<>]+">')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# length bins, perturbation drops, best-of-N, audit sensitivity, audit invariance
ALL_PLOTS = 5


# --- hand-written perturb / bon / audit files (exact numbers to find in the tables) --------

def suite_files(run_dir: Path, scorer: str, offset: float = 0.0) -> dict[str, dict]:
    """Write ``perturb-``, ``bon-`` and ``audit-<scorer>.json`` as the schemas describe;
    ``offset`` shifts the numbers so that two scorers differ. Returns what was written."""
    transformations = [
        ("typos@both", "typos", "both", "surface",
         "character typos (swap/substitute/insert/delete) at 5% of words", 0.03),
        ("markdown@rejected", "markdown", "rejected", "format",
         "the rejected answer gets headings and bullet lists", 0.12),
        ("pad@chosen", "pad", "chosen", "surface", "filler sentences appended", -0.02),
    ]
    files = {
        "perturb": {
            "scorer": scorer, "seed": 0, "sets": ["llmbar"],
            "clean": {"n": 160, "accuracy": 0.58 - offset},
            "transformations": [
                {"id": tid, "name": name, "target": target, "kind": kind,
                 "description": desc, "n": 155, "not_applicable": 5,
                 "accuracy": 0.58 - 2 * offset - drop, "clean_accuracy": 0.58 - offset,
                 "drop": drop + offset, "consistency": 0.9 - offset, "mean_abs_delta": 0.2}
                for tid, name, target, kind, desc, drop in transformations]},
        "bon": {
            "scorer": scorer, "source": "gsm8k/test", "seed": 0,
            "results": [{"n": n, "questions": 50, "rm": 0.3 + 0.02 * i - offset,
                         "random": 0.25, "best": 0.5 + 0.1 * i, "not_applicable": 0}
                        for i, n in enumerate((4, 8, 16))]},
        "audit": {
            "scorer": scorer, "reward_std": 1.3 + offset,
            "sensitivity": [
                {"attribute": "correctness", "direction": "degrade", "n": 20,
                 "drop_rate": 0.7 - offset, "mean_delta": -0.5, "mean_delta_std": -0.38 + offset},
                {"attribute": "completeness", "direction": "degrade", "n": 18,
                 "drop_rate": 0.55, "mean_delta": -0.2, "mean_delta_std": -0.15 - offset}],
            "invariance": [
                {"transformation": t[0], "n": 100, "mean_abs_delta": 0.2,
                 "mean_abs_delta_std": 0.15 + offset + 0.1 * i}
                for i, t in enumerate(transformations)]},
    }
    for kind, data in files.items():
        (run_dir / f"{kind}-{scorer}.json").write_text(json.dumps(data, indent=2))
    return files


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder like the quickstart's: ``eval/results-*.json`` from ``crome eval`` on the
    first 20 pairs of each LLMBar file, and the suite files beside ``eval/``."""
    run = tmp_path_factory.mktemp("runs") / "ref-run"
    sets = load_eval_sets(["llmbar"], resolve_data_dir(require=("llmbar",)), limit=20)
    for i, name in enumerate(SCORERS):
        evaluate_scorer(get_reference_scorer(name), sets, run / "eval")
        suite_files(run, name, offset=0.05 * i)
    return run


@pytest.fixture(scope="module")
def results(run_dir) -> dict[str, dict]:
    return {name: json.loads((run_dir / "eval" / f"results-{name}.json").read_text())
            for name in SCORERS}


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    return build_report(collect_runs([run_dir]), tmp_path_factory.mktemp("report"),
                        ReportOptions(title="test <report>"))


def _plots(html_text: str) -> list[bytes]:
    return [base64.b64decode(b, validate=True) for b in IMG_RE.findall(html_text)]


def _md_row(md: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


# --- files --------------------------------------------------------------------------------

def test_html_is_self_contained_with_one_valid_png_per_plot(report):
    text = report.html.read_text(encoding="utf-8")
    plots = _plots(text)
    assert len(plots) == ALL_PLOTS == text.count("<img")
    for png in plots:
        assert png.startswith(PNG_SIGNATURE)
        pixels = mpimg.imread(io.BytesIO(png), format="png")
        assert pixels.shape[1] > 100 and pixels.shape[0] > 100
        assert pixels[..., :3].std() > 0.05  # something is drawn
    for ref in ("http://", "https://", 'src="/', 'href="/', "<link", "url(", "@import"):
        assert ref not in text, ref
    assert "test &lt;report&gt;" in text and "test <report>" not in text  # escaped
    assert "not in these runs" not in text.lower()
    for source in ("llmbar (160 pairs)", "gsm8k/test, seed 0", "llmbar (160 pairs, seed 0)"):
        assert source in text  # where the numbers came from


def test_markdown_has_the_numbers(report, results):
    md = report.markdown.read_text(encoding="utf-8")
    assert "report.html" in md and "<img" not in md and "data:image" not in md
    longer, markdown = (results[n]["sets"]["llmbar"] for n in SCORERS)
    assert longer["n_pairs"] == markdown["n_pairs"] == 160
    pct = [f"{100 * s['accuracy']:.1f}" for s in (longer, markdown)]
    row = _md_row(md, "llmbar (all pairs)")
    assert row[1] == "160"
    assert [c.strip("*") for c in row[2:]] == pct
    # best of the row in bold, the other not
    best = int(markdown["accuracy"] > longer["accuracy"])
    assert row[2 + best] == f"**{pct[best]}**" and not row[3 - best].startswith("**")
    adversarial = results["longer-wins"]["headline"]["LLMBar Adversarial"]
    assert adversarial["n"] == 80
    assert _md_row(md, "LLMBar Adversarial")[2].strip("*") == \
        f"{100 * adversarial['accuracy']:.1f}"
    # length bias: longer-wins is right exactly where the chosen answer is longer
    lb = longer["length_bias"]
    assert _md_row(md, "longer-wins")[2:5] == [
        f"100.0 ({lb['n_chosen_longer']})", f"0.0 ({lb['n_rejected_longer']})", "+1.00"]
    # perturbation: accuracy, drop in signed points, consistency; the clean row
    assert _md_row(md, "markdown@rejected")[1:7] == ["46.0", "+12.0", "90.0",
                                                       "36.0", "+17.0", "85.0"]
    assert _md_row(md, "clean")[1] == "58.0"
    assert _md_row(md, "16")[2:] == ["**34.0**", "29.0", "25.0", "70.0"]  # N=16
    assert _md_row(md, "correctness (degrade)")[1:] == ["20", "70.0", "-0.38",
                                                        "20", "65.0", "-0.33"]
    fb = markdown["format_bias"]  # written by crome eval since format bias was added
    assert _md_row(md, "markdown-wins")[-2:] == [
        f"{100 * fb[f'accuracy_{side}_more_formatted']:.1f} ({fb[f'n_{side}_more_formatted']})"
        for side in ("chosen", "rejected")]
    assert "Format bias is not in these result files" not in md


def test_two_runs_keep_the_same_scorer_apart_with_prefixed_labels(run_dir, results, tmp_path):
    for run, accuracy in (("runA", 0.25), ("runB", 0.75)):
        data = json.loads(json.dumps(results["longer-wins"]))
        data["sets"]["llmbar"]["accuracy"] = accuracy
        data["sets"]["llmbar"].pop("format_bias", None)  # as written by an older crome eval
        if run == "runB":
            data["sets"]["llmbar"]["format_bias"] = {
                "n_chosen_more_formatted": 30, "accuracy_chosen_more_formatted": 0.6,
                "n_rejected_more_formatted": 25, "accuracy_rejected_more_formatted": 0.4,
                "n_same_format": 105}
        (tmp_path / run).mkdir()
        (tmp_path / run / "results-longer-wins.json").write_text(json.dumps(data))
        (tmp_path / run / "examples-longer-wins-llmbar.jsonl").write_text("not json\n")
        (tmp_path / run / "results.json").write_text("ignored")
    runs = collect_runs([tmp_path / "runA", tmp_path / "runB"])
    labels = [m.label for r in runs for m in r.models]
    assert labels == ["runA/longer-wins", "runB/longer-wins"]
    paths = build_report(runs, tmp_path / "out")
    md = paths.markdown.read_text()
    assert "| held-out set | pairs | runA/longer-wins | runB/longer-wins |" in md
    assert _md_row(md, "llmbar (all pairs)")[2:] == ["25.0", "**75.0**"]
    # format bias of runB only: its columns are there, runA's cells say "missing"
    assert _md_row(md, "runA/longer-wins")[-2:] == ["–", "–"]
    assert _md_row(md, "runB/longer-wins")[-2:] == ["60.0 (30)", "40.0 (25)"]
    text = paths.html.read_text()
    assert len(_plots(text)) == 1  # only the length bins: no suite files in these runs
    assert text.lower().count("not in these runs") == 3
    # with no format bias anywhere, no format columns, and a note saying why
    md = build_report(runs[:1], tmp_path / "out-a").markdown.read_text()
    assert "formatted" not in _md_row(md, "model") and "Format bias is not in" in md


def test_eval_folder_given_directly_is_named_after_its_run(run_dir):
    runs = collect_runs([run_dir / "eval"])
    assert runs[0].name == "ref-run"
    assert [m.label for m in runs[0].models] == list(SCORERS)
    assert set(runs[0].models[0].data) == {"results"}


def test_bad_input_names_the_file_and_field(run_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / "eval").mkdir(parents=True)
    (empty / "examples-x.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(empty))}: no result files"):
        collect_runs([empty])

    def broken(kind: str, text: str) -> Path:
        """``<kind>-vanilla-rm.json`` holding ``text``, alone in a new folder."""
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / f"{kind}-vanilla-rm.json").write_text(text)
        return folder / f"{kind}-vanilla-rm.json"

    bad = broken("results", '{"scorer": "vanilla-rm", "sets": {')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: not a readable JSON"):
        collect_runs([bad.parent])
    perturb = json.loads((run_dir / "perturb-longer-wins.json").read_text())
    del perturb["transformations"][1]["drop"]
    bad = broken("perturb", json.dumps(perturb))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: missing field "
                                         r"'transformations\[1\]\.drop'$"):
        collect_runs([bad.parent])
    bad = broken("bon", json.dumps({"scorer": "x", "results": [{"n": 0, "rm": 0.5}]}))
    with pytest.raises(ValueError, match=r"field 'results\[0\]\.n' should be an integer >= 1"):
        collect_runs([bad.parent])
    bad = broken("audit", '{"scorer": "x", "reward_std": NaN}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: not a readable JSON"):
        collect_runs([bad.parent])
    bad = broken("results", json.dumps(["not", "an", "object"]))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: should hold a JSON object"):
        collect_runs([bad.parent])


# --- headless Chromium --------------------------------------------------------------------

def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install chromium (scripts/test does)", pytrace=False)
    return binary


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1200,3000",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def test_chromium_renders_every_plot(report, tmp_path):
    binary = _chromium()
    url = report.html.resolve().as_uri()
    proc = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    loaded = re.search(r'data-plots-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-plots-total="(\d+)"', body.group(0))
    assert loaded and total, f"the load script did not run: {body.group(0)}"
    assert int(loaded.group(1)) == int(total.group(1)) == ALL_PLOTS

    shot = tmp_path / "screenshot.png"
    proc = _run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert np.asarray(pixels)[..., :3].std() > 0.05, "the screenshot is blank"
    if os.environ.get("CROME_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, "/tmp/crome_report_screenshot.png")


def test_report_from_the_real_suite_stages(tmp_path):
    """perturb / bon / audit files as the stages write them feed the report."""
    data_dir = resolve_data_dir(require=("llmbar", "hh-rlhf", "gsm8k"))
    sets = load_eval_sets(["llmbar"], data_dir, limit=5)
    probes, _ = rules_probe_pairs(tmp_path / "probes", data_dir, limit=6)
    out = tmp_path / "run" / "eval"
    figures = {}
    for name in SCORERS:
        scorer = get_reference_scorer(name)
        evaluate_scorer(scorer, sets, out)
        perturbed = evaluate_perturbations(scorer, sets, PerturbOptions(), output_dir=out)
        bon = run_bon(scorer, BoNOptions(limit=8), data_dir=data_dir, output_dir=out)
        audit(scorer, probes, output_dir=out, perturbed=perturbed)
        figures[name] = (perturbed, bon)
    paths = build_report(collect_runs([tmp_path / "run"]), tmp_path / "report")
    html_text = paths.html.read_text()
    assert len(_plots(html_text)) == ALL_PLOTS
    md = paths.markdown.read_text()
    for name, (perturbed, bon) in figures.items():
        filler = next(t for t in perturbed.transformations if t.id == "filler@rejected")
        assert f"{100 * filler.accuracy:.1f}" in _md_row(md, "filler@rejected")[1:]
        n16 = next(r for r in bon.results if r.n == 16)
        assert f"{100 * n16.rm:.1f}" in md
