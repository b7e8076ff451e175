"""Prefix-shared packing (crome/packing.py): packs, masks, and the same rewards and gradients
as one row per answer, on the tiny Llama; the probe that keeps encoders off it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crome.losses import pair_loss
from crome.model import Encoded, ModelOptions, RewardModel
from crome.packing import (
    PAD_SEGMENT,
    build_packs,
    collate_packs,
    prefix_sharing_works,
    resolve_prefix_sharing,
)
from crome.score import ScoreOptions, ScoreStats, score_texts
from crome.train import ChunkedRewards, encode_pairs, micro_batch


def enc(ids: list[int], prompt_tokens: int) -> Encoded:
    return Encoded(ids, None, prompt_tokens=prompt_tokens)


def test_packs_group_sequences_by_their_prompt_tokens_and_respect_the_token_cap():
    encs = [enc([1, 2, 3, 10, 11], 3), enc([7, 8], 0), enc([1, 2, 3, 12], 3),
            enc([1, 2, 4, 13], 3), enc([1, 2, 3, 14, 15, 16], 3)]
    packs = build_packs(encs, max_tokens=100)
    assert [p.members for p in packs] == [[0, 2, 4], [1], [3]]
    assert packs[0].prefix == [1, 2, 3] and packs[0].suffixes == [[10, 11], [12], [14, 15, 16]]
    assert packs[0].length == 9 and packs[0].unshared_length == 15
    assert packs[1].prefix == [] and packs[1].suffixes == [[7, 8]]  # no prompt split
    # a cap of 7 tokens: [1 2 3 | 10 11 | 12] then [1 2 3 | 14 15 16]
    capped = build_packs(encs, max_tokens=7)
    assert [p.members for p in capped] == [[0, 2], [1], [3], [4]]
    assert sorted(i for p in capped for i in p.members) == list(range(5))


def test_the_mask_lets_an_answer_see_the_prompt_and_itself_only():
    packs = build_packs([enc([5, 6, 1], 2), enc([5, 6, 2, 3], 2)], max_tokens=100)
    batch = collate_packs(packs + [build_packs([enc([9], 0)], 100)[0]], pad_id=0)
    assert batch.input_ids[0].tolist() == [5, 6, 1, 2, 3]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 2, 3]
    assert batch.segments[1].tolist() == [1] + [PAD_SEGMENT] * 4
    assert list(zip(batch.read_rows.tolist(), batch.read_cols.tolist())) == [(0, 2), (0, 4),
                                                                           (1, 0)]
    allowed = batch.attention_mask(torch.float32)[0, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],   # prompt: causal
        [True, True, False, False, False],
        [True, True, True, False, False],     # answer 1: prompt + itself
        [True, True, False, True, False],     # answer 2: prompt + itself, not answer 1
        [True, True, False, True, True]]
    row = batch.attention_mask(torch.float32)[1, 0] == 0
    assert row.tolist() == [[i == j for j in range(5)] for i in range(5)]  # 1 token, padding


def chat_prompts(helpers, n: int) -> tuple[list, list[str]]:
    import random

    rng = random.Random(4)
    prompts, answers = [], []
    for i in range(n):
        prompt = [{"role": "user", "content": helpers.sentence(rng, rng.randint(5, 40))},
                  {"role": "assistant", "content": helpers.sentence(rng, rng.randint(1, 9))},
                  {"role": "user", "content": helpers.sentence(rng, rng.randint(1, 9))}]
        for _ in range(1 + i % 4):  # 1..4 answers per prompt
            prompts.append(prompt)
            answers.append(helpers.sentence(rng, rng.randint(0, 30)))
    return prompts, answers


def test_packed_rewards_equal_one_row_per_answer_on_a_decoder(tiny_chat, helpers):
    rm = helpers.perturbed_rm(tiny_chat, max_length=64)
    assert prefix_sharing_works(rm)
    prompts, answers = chat_prompts(helpers, 12)
    plain = score_texts(rm, prompts, answers, ScoreOptions(batch_size=5, prefix_sharing=False))
    stats = ScoreStats()
    packed = score_texts(rm, prompts, answers,
                         ScoreOptions(batch_size=5, prefix_sharing=True), stats)
    assert torch.allclose(torch.tensor(packed), torch.tensor(plain), atol=1e-5, rtol=1e-5)
    assert max(plain) - min(plain) > 0.05  # the rewards differ: the match is not trivial
    assert stats.shared_tokens > 0 and stats.sequences == len(answers)
    assert stats.truncation.prompt_truncated > 0  # cut prompts are packed too (alone)
    # a tight cap splits groups over several packs; the rewards stay the same
    capped = score_texts(rm, prompts, answers,
                         ScoreOptions(batch_size=3, prefix_sharing=True, max_pack_tokens=70))
    assert torch.allclose(torch.tensor(capped), torch.tensor(plain), atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_one_row_per_answer(tiny_chat, helpers):
    rm = helpers.perturbed_rm(tiny_chat, max_length=96)
    records = helpers.varied_pairs(10, seed=3) + helpers.tie_pairs(4, seed=3)
    records += [replace(r, id=r.id + "x", chosen=r.rejected[:-4])
                for r in records[:3]]  # prompts with two pairs: packs of four answers
    pairs = encode_pairs(rm, records)
    grads = {}
    for sharing in (False, True):
        rm.model.zero_grad(set_to_none=True)
        chunks, inverse, is_tie = micro_batch(rm, pairs, chunk_rows=3, prefix_sharing=sharing)
        rewards = ChunkedRewards(rm)(chunks)[inverse]
        m = len(pairs)
        pair_loss(rewards[:m], rewards[m:], is_tie).backward()
        grads[sharing] = {n: p.grad.clone() for n, p in rm.model.named_parameters()
                          if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-6, rtol=1e-4), name
    assert sum(float(g.abs().sum()) for g in grads[False].values()) > 0


def test_encoders_stay_on_the_plain_path(tiny_bert):
    rm = RewardModel.create(ModelOptions(backbone=tiny_bert))
    assert rm.formatter.mode == "pair_template"
    assert not prefix_sharing_works(rm)
    assert resolve_prefix_sharing(rm, None) is False
    with pytest.raises(ValueError, match="prefix sharing does not work"):
        resolve_prefix_sharing(rm, True)


def test_the_probe_catches_a_model_that_reads_both_directions(tiny_bert, helpers, tmp_path):
    """A BERT formatted like a decoder (plain join, no type ids) has a prompt split, but its
    prompt tokens see the answer: packed rewards differ, so the probe says no."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((Path(tiny_bert) / f).read_bytes())
    rm = helpers.perturbed_rm(str(tmp_path))
    rm.formatter.mode = "plain_join"
    rm.formatter.use_template = False
    rm.formatter.uses_type_ids = False
    rm.formatter.has_prompt_split = True
    assert rm.formatter.encode("a question", "an answer").prompt_tokens > 0
    assert not prefix_sharing_works(rm)


def test_a_sliding_window_shorter_than_the_sequences_turns_sharing_off(tiny_chat):
    rm = RewardModel.create(ModelOptions(backbone=tiny_chat, max_length=128))
    rm.model.config.sliding_window = 32
    rm.model.config.layer_types = ["sliding_attention", "full_attention"]
    assert not prefix_sharing_works(rm)


@pytest.mark.slow
def test_real_qwen_trains_with_lora_on_shared_prefixes_and_reloads(qwen05_backbone, tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct (the packaged GGUF, dequantised) on real hh-rlhf pairs:
    LoRA training packs each pair's prompt once; the saved RM reloads bit for bit, and its
    packed rewards equal its one-row-per-answer rewards."""
    import math

    from crome.data.sources import load_source
    from crome.model import LoraOptions
    from crome.train import TrainOptions, train

    records = load_source("hh-rlhf/helpful-base", limit=6).records
    model = ModelOptions(backbone=qwen05_backbone, max_length=160, min_prompt_tokens=32,
                         lora=LoraOptions(r=4, alpha=8))
    out = tmp_path / "rm"
    summary = train(records, TrainOptions(output_dir=str(out), model=model, batch_size=3,
                                          max_steps=2, lr=1e-3, progress=False))
    assert summary.prefix_sharing and summary.steps == 2
    assert summary.shared_tokens > 0 and math.isfinite(summary.final_loss)
    rm = RewardModel.load(out)
    assert rm.formatter.mode == "chat_template" and prefix_sharing_works(rm)
    prompts = [r.prompt for r in records] * 2
    answers = [r.chosen for r in records] + [r.rejected for r in records]
    plain = score_texts(rm, prompts, answers, ScoreOptions(prefix_sharing=False))
    packed = score_texts(rm, prompts, answers, ScoreOptions(prefix_sharing=True))
    assert torch.allclose(torch.tensor(packed), torch.tensor(plain), atol=1e-4, rtol=1e-4)
    assert score_texts(RewardModel.load(out), prompts, answers) == packed  # reload: same bits
    fresh = RewardModel.create(model)  # same seed, untrained: the saved head was trained
    assert score_texts(fresh, prompts, answers) != packed
