"""The causal audit: probe orientation, sensitivity and invariance arithmetic, rules-made
held-out probes, and the CLI on a plain Hugging Face sequence-classification model."""

from __future__ import annotations

import json

import pytest
import torch

from crome.data.io import write_pairs
from crome.data.schema import PairRecord
from crome.data.sources import resolve_data_dir
from crome.evaluate.audit import (
    NEUTRAL_SUITE,
    RRM_ATTRIBUTE,
    AuditOptions,
    audit,
    causal_probes,
    rules_probe_pairs,
)
from crome.evaluate.reference import LongerWins
from crome.evaluate.run import EvalSet, load_eval_sets


def causal(rid: str, attribute: str, direction: str, chosen: str, rejected: str) -> PairRecord:
    return PairRecord(id=rid, prompt="q", chosen=chosen, rejected=rejected,
                      provenance={"recipe": "causal", "attribute": attribute,
                                  "direction": direction})


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(require=("llmbar", "hh-rlhf", "gsm8k"))


def test_probes_orient_original_and_rewrite():
    records = [
        causal("d", "Correctness", "degrade", "original answer", "worse"),
        causal("u", "clarity", "upgrade", "better answer", "original"),
        PairRecord(id="r", prompt="q", chosen="on topic", rejected="off",
                   provenance={"recipe": "rrm", "direction": "chosen_vs_off"}),
        PairRecord(id="t", prompt="q", chosen="a", rejected="b", label="tie",
                   provenance={"recipe": "rrm", "direction": "off_tie"}),
        PairRecord(id="o", prompt="q", chosen="a", rejected="b"),
    ]
    probes, skipped = causal_probes(records)
    assert [(p.id, p.attribute, p.direction, p.original, p.rewrite) for p in probes] == [
        ("d", "correctness", "degrade", "original answer", "worse"),
        ("u", "clarity", "upgrade", "original", "better answer"),
        ("r", RRM_ATTRIBUTE, "degrade", "on topic", "off")]
    assert sum(skipped.values()) == 2


def test_sensitivity_and_invariance_in_reward_std_units():
    # LongerWins: reward = length. Degrades shorten by 10 characters, upgrades lengthen by 5.
    pairs = [causal(f"d{i}", "completeness", "degrade", "x" * 30, "x" * 20) for i in range(3)]
    pairs += [causal(f"u{i}", "completeness", "upgrade", "x" * 25, "x" * 20) for i in range(2)]
    neutral = [EvalSet("n", [PairRecord(id=f"n{i}", prompt="p", chosen="y" * (10 + 10 * i),
                                        rejected="y" * 10) for i in range(4)])]
    report = audit(LongerWins(), pairs, neutral, AuditOptions(perturbations=("quotes@both",
                                                                             "url@both")))
    rewards = [10 + 10 * i for i in range(4)] + [10] * 4
    mean = sum(rewards) / 8
    std = (sum((r - mean) ** 2 for r in rewards) / 8) ** 0.5
    assert report.reward_std == pytest.approx(std)
    sens = {(s["attribute"], s["direction"]): s for s in report.sensitivity}
    assert sens["completeness", "degrade"]["drop_rate"] == 1.0
    assert sens["completeness", "degrade"]["mean_delta"] == -10
    assert sens["completeness", "degrade"]["mean_delta_std"] == pytest.approx(-10 / std)
    assert sens["completeness", "upgrade"]["drop_rate"] == 0.0
    assert sens["completeness", "upgrade"]["expected_rate"] == 1.0
    inv = {v["transformation"]: v for v in report.invariance}
    assert inv["quotes@both"]["mean_abs_delta"] == 2  # two quote characters
    assert inv["quotes@both"]["mean_abs_delta_std"] == pytest.approx(2 / std)
    assert inv["url@both"]["mean_abs_delta"] > 20


def test_neutral_suite_leaves_out_the_bait():
    assert NEUTRAL_SUITE and not any(p.endswith(("@rejected", "@chosen")) for p in NEUTRAL_SUITE)


def test_rules_probes_on_held_out_data(data_dir, tmp_path):
    pairs, log = rules_probe_pairs(tmp_path, data_dir, limit=12)
    probes, _ = causal_probes(pairs)
    attributes = {p.attribute for p in probes}
    assert attributes == {"correctness", RRM_ATTRIBUTE}
    for p in probes:
        if p.attribute == "correctness":
            assert p.original != p.rewrite and p.original.split("\n")[:-2] == \
                p.rewrite.split("\n")[:-2]  # only the last lines changed: the final number
    assert {r.source for r in pairs} == {"gsm8k", "hh-rlhf"}  # test / held-out sources
    assert any("causal" in line for line in log)
    again, _ = rules_probe_pairs(tmp_path, data_dir, limit=12)  # resumed: same pairs
    assert [r.to_dict() for r in again] == [r.to_dict() for r in pairs]


def test_cli_audit_on_a_plain_hf_sequence_classifier(data_dir, helpers, tmp_path):
    """`crome audit` works on a HF model directory that crome did not write."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from crome.backbones import default_backbone

    tok = AutoTokenizer.from_pretrained(default_backbone())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    model_dir = tmp_path / "hf-rm"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pairs = [causal(f"d{i}", "correctness", "degrade", f"The answer is {i}.",
                    f"The answer is {i + 1}.") for i in range(4)]
    write_pairs(pairs, tmp_path / "causal.jsonl")
    out = tmp_path / "out"
    proc = helpers.run_cli("audit", "--model", model_dir, "--reference", "longer-wins",
                           "--causal", tmp_path / "causal.jsonl", "-d", "llmbar",
                           "--max-eval", "3", "--out", out, "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((out / "audit-hf-rm.json").read_text())
    assert saved["sensitivity"][0]["attribute"] == "correctness"
    assert saved["sensitivity"][0]["n"] == 4 and saved["reward_std"] > 0
    assert {v["transformation"] for v in saved["invariance"]} == set(NEUTRAL_SUITE)
    assert (out / "audit-longer-wins.json").exists()
    assert "| correctness | degrade | 4 |" in proc.stdout


def test_audit_of_a_set_without_causal_pairs_is_empty_not_wrong(data_dir):
    sets = load_eval_sets(["llmbar"], data_dir, limit=2)
    report = audit(LongerWins(), [PairRecord(id="x", prompt="q", chosen="a", rejected="b")],
                   sets, AuditOptions(perturbations=("quotes@both",)))
    assert report.sensitivity == [] and report.skipped
    assert report.invariance[0]["n"] > 0
