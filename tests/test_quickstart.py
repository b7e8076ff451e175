"""``crome quickstart`` end to end, small, with the default (packaged, in-process) oracle."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_vanilla_vs_crome(helpers, tmp_path):
    out = tmp_path / "qs"
    proc = helpers.run_cli("quickstart", "--out", out, "--max-train", "40", "--max-eval", "4",
                           "--augment-pairs", "2", "--neutral-pairs", "12", "--tau", "0.99",
                           "--perturb-eval", "2", "--bon-questions", "6", "--audit-probes", "4",
                           "--no-progress", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for n in range(1, 11):
        assert f"[{n}/10]" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    aug = summary["augment"]
    assert aug["causal"]["tasks"] == 2 * 2  # 2 pairs × 1 attribute × 2 directions
    assert aug["causal"]["n_produced"] + aug["causal"]["n_failed"] == 4
    assert aug["causal"]["oracle"].startswith("llamacpp:")
    n_causal = aug["causal"]["n_produced"]
    assert aug["neutral"]["n_produced"] == 12 + n_causal
    f = aug["filter"]
    assert f["kept"] + f["dropped"] == n_causal + aug["neutral"]["n_produced"]
    train = summary["train"]
    assert train["vanilla-rm"]["pairs"] == 40
    assert train["crome-rm"]["pairs"] == 40 + f["kept"]
    for row in summary["table"].values():
        assert {"vanilla-rm", "crome-rm", "longer-wins"} <= set(row)
    assert (out / "augment" / "filtered.jsonl").exists()
    assert "more augmentation: --augment-pairs" in proc.stdout
    scorers = ("longer-wins", "markdown-wins", "vanilla-rm", "crome-rm")
    for kind in ("results", "perturb", "bon", "audit"):
        for name in scorers:
            assert (out / "eval" / f"{kind}-{name}.json").exists(), (kind, name)
    bon_rows = [label for label in summary["table"] if label.startswith("GSM8K best-of-")]
    assert [label.split(" ")[1] for label in bon_rows] == ["best-of-4", "best-of-8",
                                                          "best-of-16"]
    html = (out / "report" / "report.html").read_text()
    assert html.count('class="plot"') == 5 and "crome-rm" in html
