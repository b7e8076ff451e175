"""The model card (``README.md``) that ``save`` and ``crome train`` write into a model folder."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from crome.backbones import default_backbone
from crome.model import (
    LoraOptions,
    ModelOptions,
    RewardModel,
    RewardModelMeta,
)
from crome.model_card import data_counts, write_model_card
from crome.score import score_texts
from crome.train import TrainOptions, train


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def python_block(card: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    return code


def test_train_writes_a_card_with_counts_options_and_held_out_figures(tiny_bert, tmp_path,
                                                                      helpers):
    records = helpers.varied_pairs(12, seed=4) + helpers.tie_pairs(4, seed=4)
    out = tmp_path / "run"
    opts = TrainOptions(output_dir=str(out), batch_size=4, max_steps=2, lr=3e-4, bf16=False,
                        progress=False,
                        model=ModelOptions(backbone=tiny_bert, max_length=64))
    summary = train(records, opts, eval_records=helpers.keyword_pairs(6, seed=4))
    card = (out / "README.md").read_text()

    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert {"reward-model", "crome"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder has no Hub id
    # the data: 12 preferences from source "unit" in three subsets, 4 ties without a source
    for row in ("| pairs | 16 |", "| preferences | 12 |", "| ties | 4 |",
                "| text_prompts | 13 |", "| chat_prompts | 3 |",
                "| unit | 12 |", "| (none) | 4 |", "| unit/s0 | 4 |", "| unit/s1 | 4 |",
                "| unit/s2 | 4 |"):
        assert row in card, row
    # the options, model and training, as crome.json records them
    for row in ("| model.max_length | 64 |", "| model.formatting | pair_template |",
                "| model.chat_template | crome |", "| batch_size | 4 |", "| lr | 0.0003 |",
                "| max_steps | 2 |", "| model.seed | 0 |"):
        assert row in card, row
    assert json.loads((out / "crome.json").read_text())["extra"]["train_options"]["lr"] == 3e-4
    # training figures and the held-out result
    assert f"| steps | {summary.steps} |" in card and summary.steps == 2
    assert "## Held-out results" in card
    assert f"| accuracy | {summary.evals[-1]['accuracy']:.4g} |" in card and "| n | 6 |" in card
    # how to use it
    assert f"crome serve-rm --model {out}" in card and f"--model {out}`" in card
    assert "apply_chat_template" in python_block(card)


@pytest.mark.parametrize("which,lora,legacy", [
    ("tiny_bert", False, False), ("tiny_chat", False, False), ("tiny_bert", True, False),
    ("tiny_bert", False, True)], ids=["encoder", "decoder", "encoder-lora", "encoder-legacy"])
def test_the_cards_python_snippet_gives_cromes_reward(request, tmp_path, which, lora, legacy):
    """The snippet is run as written: what a user copies gives crome's reward (legacy: an
    encoder RM made when the answer had token type 1, whose card gives the pair recipe)."""
    backbone = request.getfixturevalue(which)
    opts = ModelOptions(backbone=backbone, seed=3,
                        lora=LoraOptions(r=4, alpha=8, target_modules=["query", "value"])
                        if lora else None)
    rm = RewardModel.create(opts)
    if legacy:
        rm = RewardModel(rm.model, rm.tokenizer, replace(rm.meta, answer_type_ids=True))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in rm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = rm.save(tmp_path / "rm")
    card = (path / "README.md").read_text()
    assert front_matter(card)["library_name"] == ("peft" if lora else "transformers")
    namespace: dict = {}
    exec(compile(python_block(card), "README.md", "exec"), namespace)  # noqa: S102
    (want,) = score_texts(rm, ["What is the capital of France?"], ["Paris."])
    assert abs(namespace["reward"] - want) <= 1e-5
    # not a trivial match: another answer gets another reward
    (other,) = score_texts(rm, ["What is the capital of France?"], ["Rome, of course."])
    assert abs(other - want) > 1e-4


def test_card_front_matter_data_and_results_from_the_arguments(tmp_path, helpers):
    meta = RewardModelMeta(backbone=default_backbone(), max_length=128,
                           formatting="pair_template", chat_template="crome")
    counts = data_counts(helpers.varied_pairs(5, seed=1))
    path = write_model_card(tmp_path, meta, data_counts=counts,
                            results={"accuracy": 0.8125, "subsets": {"easy": 0.9}})
    card = path.read_text()
    assert path == tmp_path / "README.md"
    assert front_matter(card)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "| pairs | 5 |" in card and "| ties | 0 |" in card
    assert "| accuracy | 0.8125 |" in card and "| subsets.easy | 0.9 |" in card
    assert "## Training\n" not in card  # no summary given
    assert "tok(head, answer" in card  # the exact recipe for a pair encoding

    hub = RewardModelMeta(backbone="Qwen/Qwen2.5-0.5B-Instruct", formatting="chat_template")
    card = write_model_card(tmp_path, hub).read_text()
    assert front_matter(card)["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "## Training data" not in card and "## Held-out results" not in card
    assert "add_special_tokens=False" in card
    local = RewardModelMeta(backbone=str(tmp_path), formatting="plain_join")
    assert "base_model" not in front_matter(write_model_card(tmp_path, local).read_text())
    assert not Path(tmp_path / "README.md").read_text().count("base_model:")
