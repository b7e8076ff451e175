"""Pairwise preference models: the comparison input, the both-orders verdict, training on
encoders and decoders (LoRA), bit-identical reloads and batch-size independence."""

from __future__ import annotations

import json

import pytest
import torch

from crome.evaluate.reference import Preference, is_comparer, score_pairs
from crome.losses import preference
from crome.model import (
    LABELS,
    LoraOptions,
    ModelOptions,
    RewardModel,
    fair_split,
    label_logits,
)
from crome.pairwise import (
    PairwiseScorer,
    compare_texts,
    encode_both_orders,
    preferences,
)
from crome.score import ScoreOptions, model_scorer, score_texts
from crome.train import TrainOptions, train


def options(backbone: str, out, **kw) -> TrainOptions:
    model = kw.pop("model", None) or ModelOptions(backbone=backbone, max_length=96,
                                                  pairwise=True)
    base = {"output_dir": str(out), "model": model, "batch_size": 8, "lr": 3e-3, "bf16": False,
            "progress": False, "log_every": 1, "warmup_ratio": 0.0}
    base.update(kw)
    return TrainOptions(**base)


def accuracy(rm: RewardModel, records) -> tuple[float, float]:
    prefs = compare_texts(rm, [r.prompt for r in records], [r.chosen for r in records],
                          [r.rejected for r in records])
    return (sum(p.first > p.second for p in prefs) / len(prefs),
            sum(p.consistent for p in prefs) / len(prefs))


# -- the input -------------------------------------------------------------------------------

def test_fair_split_keeps_a_short_answer_whole_and_halves_two_long_ones():
    assert fair_split(10, 20, 40) == (10, 20)
    assert fair_split(5, 100, 40) == (5, 35)
    assert fair_split(100, 5, 40) == (35, 5)
    assert fair_split(100, 90, 40) == (20, 20)
    assert fair_split(0, 0, 0) == (0, 0)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_chat"])
def test_a_comparison_holds_both_answers_cut_the_same_in_either_order(backbone, request,
                                                                       helpers):
    path = request.getfixturevalue(backbone)
    rm = RewardModel.create(ModelOptions(backbone=path, max_length=48, min_prompt_tokens=8,
                                         pairwise=True))
    dec = rm.tokenizer.decode
    long_a = " ".join(["river"] * 60)
    short_b = "blue cat"
    ab, ba = encode_both_orders(rm, ["the question " * 20], [long_a], [short_b])
    assert len(ab) == len(ba) <= 48
    assert ab.prompt_truncated and ab.answer_truncated
    text_ab, text_ba = dec(ab.input_ids), dec(ba.input_ids)
    assert text_ab.count("river") == text_ba.count("river") > 0  # cut the same in both orders
    assert "blue cat" in text_ab and "blue cat" in text_ba  # the short one kept whole
    assert text_ab.index("river") < text_ab.index("blue cat")  # first answer is A
    assert text_ba.index("blue cat") < text_ba.index("river")
    # nothing to cut: the whole prompt and both answers
    short = rm.formatter.encode_comparison("what is blue", "the sky", "water")
    assert not short.prompt_truncated and not short.answer_truncated
    assert all(w in dec(short.input_ids) for w in ("what is blue", "the sky", "water"))


def test_decoder_verdicts_are_label_tokens_read_after_the_template(tiny_chat):
    rm = RewardModel.create(ModelOptions(backbone=tiny_chat, max_length=64, pairwise=True))
    assert [rm.tokenizer.decode([i]).strip() for i in rm.meta.label_ids] == \
        [w.lower() for w in LABELS]  # the MiniLM tokenizer lower-cases
    enc = rm.formatter.encode_comparison("hi", "a cat", "a dog")
    assert rm.tokenizer.decode(enc.input_ids).endswith("assistant :")
    batch = rm.formatter.collate([enc, rm.formatter.encode_comparison("hello there", "x", "y")])
    with torch.no_grad():
        full = rm.model(**batch.as_kwargs()).logits
        last = batch.attention_mask.sum(1) - 1
        expected = full[torch.arange(2), last][:, rm.meta.label_ids]
        got = label_logits(rm.model, batch, rm.meta.label_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- the verdict -----------------------------------------------------------------------------

def test_both_orders_are_averaged_and_consistency_names_position_bias():
    # the model always says "A": P(A>B)=0.9 in either order -> no preference, inconsistent
    biased = preferences([[5.0, 0.0, 0.0]], [[5.0, 0.0, 0.0]])[0]
    assert biased.first == pytest.approx(biased.second)
    assert not biased.consistent
    # prefers the same answer in both orders
    fair = preferences([[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]])[0]
    assert fair.first > 0.9 and fair.consistent and fair.margin > 0.8
    assert fair.first + fair.second + fair.tie == pytest.approx(1.0)
    tie = preferences([[0.0, 0.0, 4.0]], [[0.0, 0.0, 4.0]])[0]
    assert tie.tie > 0.9 and tie.consistent
    swapped = preferences([[0.0, 3.0, 0.0]], [[3.0, 0.0, 0.0]])[0]
    assert swapped.second == pytest.approx(fair.first)


def test_the_preference_loss_targets_a_then_b_and_same_for_ties():
    good = torch.tensor([[4.0, -4.0, -4.0]]), torch.tensor([[-4.0, 4.0, -4.0]])
    bad = torch.tensor([[-4.0, 4.0, -4.0]]), torch.tensor([[4.0, -4.0, -4.0]])
    pref, tie = torch.tensor([False]), torch.tensor([True])
    assert preference(*good, pref) < 0.01
    assert preference(*bad, pref) > 7
    same = torch.tensor([[-4.0, -4.0, 4.0]]), torch.tensor([[-4.0, -4.0, 4.0]])
    assert preference(*same, tie) < 0.01
    assert preference(*good, tie) > 7
    assert preference(*good, tie, tie_weight=0.5) == pytest.approx(
        0.5 * float(preference(*good, tie)))


# -- training, reloading, scoring ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained_encoder(tiny_bert, helpers, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairpm") / "run"
    records = helpers.keyword_pairs(32, seed=0) + helpers.tie_pairs(16, seed=1)
    summary = train(records, options(tiny_bert, out, epochs=20, lr=5e-3))
    return out, records, summary


def test_a_pairwise_encoder_learns_preferences_and_ties(trained_encoder, tiny_bert):
    out, records, summary = trained_encoder
    prefs, ties = records[:32], records[32:]
    assert summary.pairs == 48 and summary.ties == 16 and not summary.prefix_sharing
    meta = json.loads((out / "crome.json").read_text())
    assert meta["pairwise"] and meta["label_ids"] == []
    fresh = RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=96, pairwise=True))
    rm = RewardModel.load(out)
    acc_before, _ = accuracy(fresh, prefs)
    acc_after, consistency = accuracy(rm, prefs)
    assert acc_after > 0.9 > acc_before and consistency > 0.8
    got = compare_texts(rm, [r.prompt for r in ties], [r.chosen for r in ties],
                        [r.rejected for r in ties])
    assert sum(p.tie for p in got) / len(got) > 0.4  # 1/3 untrained


def test_neutral_pairs_teach_the_same_verdict(tiny_bert, helpers, tmp_path):
    ties = helpers.tie_pairs(16, seed=4)
    args = ([r.prompt for r in ties], [r.chosen for r in ties], [r.rejected for r in ties])
    fresh = RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=96, pairwise=True))
    before = sum(p.tie for p in compare_texts(fresh, *args)) / len(ties)
    summary = train(ties, options(tiny_bert, tmp_path / "run", epochs=10, lr=1e-2))
    assert summary.ties == 16
    after = compare_texts(RewardModel.load(tmp_path / "run"), *args)
    assert before < 0.5 and sum(p.tie for p in after) / len(ties) > 0.9


def test_a_pairwise_model_reloads_bit_identically_at_any_batch_size(trained_encoder):
    out, records, _ = trained_encoder
    args = ([r.prompt for r in records], [r.chosen for r in records],
            [r.rejected for r in records])
    a = compare_texts(RewardModel.load(out), *args, ScoreOptions(batch_size=64))
    b = compare_texts(RewardModel.load(out), *args, ScoreOptions(batch_size=3))
    assert a == b


def test_a_pairwise_model_is_a_comparer_and_gives_no_single_rewards(trained_encoder):
    out, records, _ = trained_encoder
    rm = RewardModel.load(out)
    scorer = model_scorer(rm, name="pm")
    assert isinstance(scorer, PairwiseScorer) and is_comparer(scorer)
    first, _ = score_pairs(scorer, records[:8])
    prefs = scorer.compare([r.prompt for r in records[:8]], [r.chosen for r in records[:8]],
                           [r.rejected for r in records[:8]])
    assert first == [p.first for p in prefs] and scorer.comparisons == 16
    assert all(isinstance(p, Preference) for p in prefs)
    with pytest.raises(ValueError, match="no reward to one answer"):
        score_texts(rm, ["q"], ["a"])


def test_bt_only_options_are_refused_for_a_pairwise_model(tiny_bert, helpers, tmp_path):
    with pytest.raises(ValueError, match="Bradley–Terry options"):
        train(helpers.keyword_pairs(8), options(tiny_bert, tmp_path, margin=0.5))


def test_a_pairwise_decoder_learns_from_its_label_tokens(tiny_chat, helpers, tmp_path):
    records = helpers.keyword_pairs(24, seed=2)
    model = ModelOptions(backbone=tiny_chat, max_length=96, pairwise=True)
    fresh = RewardModel.create(model)
    train(records, options(tiny_chat, tmp_path / "run", model=model, epochs=16))
    acc_before, _ = accuracy(fresh, records)
    acc_after, consistency = accuracy(RewardModel.load(tmp_path / "run"), records)
    assert acc_after > 0.9 and acc_after > acc_before and consistency > 0.8


def test_a_pairwise_decoder_trains_with_lora_and_reloads_bit_identically(tiny_chat, helpers,
                                                                         tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    records = helpers.keyword_pairs(24, seed=2)
    with pytest.raises(ValueError, match="no language-model head"):
        RewardModel.create(ModelOptions(backbone=tiny_chat, pairwise=True,
                                        lora=LoraOptions(r=4)))
    lm = tmp_path / "tiny-lm"  # the tiny Llama with an LM head, as a real decoder has
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_chat)).save_pretrained(lm)
    AutoTokenizer.from_pretrained(tiny_chat).save_pretrained(lm)
    model = ModelOptions(backbone=str(lm), max_length=96, pairwise=True,
                         lora=LoraOptions(r=4, alpha=8))
    train(records, options(str(lm), tmp_path / "run", model=model, epochs=8, lr=1e-2))
    losses = [json.loads(line)["loss"]
              for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    rm, again = RewardModel.load(tmp_path / "run"), RewardModel.load(tmp_path / "run")
    args = ([r.prompt for r in records], [r.chosen for r in records],
            [r.rejected for r in records])
    assert compare_texts(rm, *args) == compare_texts(again, *args, ScoreOptions(batch_size=5))
    fresh = RewardModel.create(model)
    assert compare_texts(fresh, *args) != compare_texts(rm, *args)


def test_the_cli_trains_scores_and_evaluates_a_pairwise_model(tiny_bert, helpers, tmp_path):
    from crome.data.io import write_pairs

    data = tmp_path / "pairs.jsonl"
    write_pairs(helpers.keyword_pairs(16, seed=5), data)
    out = tmp_path / "pm"
    proc = helpers.run_cli("train", "--data", data, "--pairwise", "--backbone", tiny_bert,
                           "--out", out, "--max-length", "64", "--batch-size", "4",
                           "--no-bf16", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "crome.json").read_text())["pairwise"]
    assert "pairwise preference model" in (out / "README.md").read_text()
    proc = helpers.run_cli("score", data, tmp_path / "scores.jsonl", "--model", out,
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(0 < r["reward_chosen"] < 1 for r in rows)
    proc = helpers.run_cli("eval", "--data", data, "--model", out, "--out", tmp_path / "ev",
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "consistency of the two orders" in proc.stdout
    result = json.loads((tmp_path / "ev" / "results.json").read_text())["pm"]
    summary = next(iter(result["sets"].values()))
    assert 0 <= summary["consistency"] <= 1 and summary["n_pairs"] == 16


@pytest.mark.slow
def test_real_qwen_is_a_pairwise_model_with_lora(qwen05_backbone, tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct (the packaged GGUF, dequantised) as RRM's pair-pm: the
    verdicts are its own tokens "A", "B", "Same" after its chat template; 2 LoRA steps on
    real hh-rlhf pairs; the saved adapter reloads bit for bit on the rebuilt base."""
    import math

    from crome.data.sources import load_source

    rm = RewardModel.create(ModelOptions(backbone=qwen05_backbone, max_length=256,
                                         pairwise=True))
    assert [rm.tokenizer.decode([i]) for i in rm.meta.label_ids] == list(LABELS)
    text = rm.tokenizer.decode(rm.formatter.encode_comparison("2+2?", "4", "5").input_ids)
    assert text.endswith("[RESPONSE B]\n5<|im_end|>\n<|im_start|>assistant\n")
    records = load_source("hh-rlhf/helpful-base", limit=6).records
    model = ModelOptions(backbone=qwen05_backbone, max_length=256, min_prompt_tokens=32,
                         pairwise=True, lora=LoraOptions(r=4, alpha=8))
    out = tmp_path / "pm"
    summary = train(records, TrainOptions(output_dir=str(out), model=model, batch_size=3,
                                          max_steps=2, lr=1e-3, progress=False))
    assert summary.steps == 2 and math.isfinite(summary.final_loss)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 50e6  # no LM head
    args = ([r.prompt for r in records], [r.chosen for r in records],
            [r.rejected for r in records])
    trained = compare_texts(RewardModel.load(out), *args)
    assert compare_texts(RewardModel.load(out), *args, ScoreOptions(batch_size=2)) == trained
    assert compare_texts(RewardModel.create(model), *args) != trained
