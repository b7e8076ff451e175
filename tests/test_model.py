"""The formatter (specials, chat rendering, truncation) and save/reload of reward models."""

from __future__ import annotations

import pytest
import torch

from crome.model import (
    Formatter,
    LoraOptions,
    ModelOptions,
    RewardModel,
    TruncationCounts,
    render_plain_prompt,
)
from crome.score import score_texts

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first river question"},
    {"role": "assistant", "content": "second tree reply"},
    {"role": "user", "content": "third city question"},
]


def formatter(path: str, max_length: int = 256, min_prompt_tokens: int = 64) -> Formatter:
    from transformers import AutoTokenizer

    return Formatter(AutoTokenizer.from_pretrained(path), max_length, min_prompt_tokens)


def single_token_words(f: Formatter, start: int, n: int) -> tuple[str, list[int]]:
    """``n`` vocabulary words that are one token each, as text and as ids."""
    words = []
    for i in range(start, start + 10 * n):
        tok = f.tokenizer.convert_ids_to_tokens(i)
        if tok.isascii() and tok.isalpha():
            words.append(tok)
        if len(words) == n:
            break
    text = " ".join(words)
    ids = f.backend.encode(text, add_special_tokens=False).ids
    assert len(ids) == n
    return text, ids


# --- formatting ------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["What is the capital of France?", CHAT],
                         ids=["text", "chat"])
def test_bert_pair_template_has_one_cls_and_two_sep(tiny_bert, prompt):
    f = formatter(tiny_bert)
    tok = f.tokenizer
    assert f.mode == "pair_template"
    enc = f.encode(prompt, "Paris is the capital.")
    ids = enc.input_ids
    assert ids.count(tok.cls_token_id) == 1 and ids[0] == tok.cls_token_id
    assert ids.count(tok.sep_token_id) == 2 and ids[-1] == tok.sep_token_id
    # segment ids: 0 up to and including the first [SEP], 1 for the answer and its [SEP]
    first_sep = ids.index(tok.sep_token_id)
    assert enc.token_type_ids == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert tok.decode(ids[first_sep + 1:-1]) == "paris is the capital."


def test_chat_template_tokenizer_has_no_duplicated_bos(tiny_chat):
    f = formatter(tiny_chat)
    tok = f.tokenizer
    assert f.mode == "chat_template"
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    for prompt in ("hello there", CHAT):
        enc = f.encode(prompt, "an answer")
        assert enc.input_ids.count(tok.bos_token_id) == 1
        assert enc.input_ids[0] == tok.bos_token_id
        # the template closes the assistant turn: the last token (which a decoder's head
        # reads) is EOS, and there is no second one glued on
        assert enc.input_ids[-1] == tok.eos_token_id
        assert enc.input_ids[-2] != tok.eos_token_id
        assert enc.token_type_ids is None  # the tokenizer has none
        # exactly what the template renders, tokenised once
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else prompt) + [{"role": "assistant", "content": "an answer"}]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert enc.input_ids == f.backend.encode(rendered, add_special_tokens=False).ids


def test_plain_prompt_renders_turns_in_order():
    assert render_plain_prompt("just text") == "just text"
    assert render_plain_prompt(CHAT) == (
        "System: be brief\n\nUser: first river question\n\n"
        "Assistant: second tree reply\n\nUser: third city question")


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_chat"])
def test_chat_prompt_turns_appear_in_order_before_the_answer(request, which):
    f = formatter(request.getfixturevalue(which))
    text = f.tokenizer.decode(f.encode(CHAT, "final answer words").input_ids)
    parts = ["be brief", "first river question", "second tree reply", "third city question",
             "final answer words"]
    positions = [text.index(p) for p in parts]
    assert positions == sorted(positions)
    roles = ["system", "user", "assistant", "user"]
    if f.mode == "chat_template":  # the template labels the answer's turn too
        roles.append("assistant")
    else:  # the pair template puts the answer after [SEP]
        assert text.index("[SEP]") < positions[-1]
    role_positions = []
    pos = 0
    for role in roles:
        pos = text.index(role, pos)
        role_positions.append(pos)
        pos += 1
    # each role label comes right before its content
    for rp, cp in zip(role_positions, positions):
        assert rp < cp


# --- truncation --------------------------------------------------------------------------

def test_truncation_cuts_prompt_start_then_answer_end_and_counts_both(tiny_bert):
    f = formatter(tiny_bert, max_length=24, min_prompt_tokens=6)  # budget 21 + 3 specials
    tok = f.tokenizer
    long_p, long_p_ids = single_token_words(f, 2000, 30)
    short_p, short_p_ids = single_token_words(f, 2000, 3)
    long_a, long_a_ids = single_token_words(f, 2300, 30)
    short_a, short_a_ids = single_token_words(f, 2300, 5)

    def parts(ids: list[int]) -> tuple[list[int], list[int]]:
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        sep = ids.index(tok.sep_token_id)
        return ids[1:sep], ids[sep + 1:-1]

    counts = TruncationCounts()
    encs = f.encode_many([long_p, long_p, short_p, short_p],
                         [short_a, long_a, long_a, short_a], counts)

    # long prompt, short answer: only the prompt's start goes; the answer is whole
    p, a = parts(encs[0].input_ids)
    assert (encs[0].prompt_truncated, encs[0].answer_truncated) == (True, False)
    assert len(encs[0]) == 24
    assert p == long_p_ids[-16:] and a == short_a_ids

    # both long: the prompt keeps its last min_prompt_tokens, then the answer's end goes
    p, a = parts(encs[1].input_ids)
    assert (encs[1].prompt_truncated, encs[1].answer_truncated) == (True, True)
    assert len(encs[1]) == 24
    assert p == long_p_ids[-6:] and a == long_a_ids[:15]

    # a prompt shorter than min_prompt_tokens is kept whole; the answer's end goes
    p, a = parts(encs[2].input_ids)
    assert (encs[2].prompt_truncated, encs[2].answer_truncated) == (False, True)
    assert len(encs[2]) == 24
    assert p == short_p_ids and a == long_a_ids[:18]

    # fits: untouched
    p, a = parts(encs[3].input_ids)
    assert (encs[3].prompt_truncated, encs[3].answer_truncated) == (False, False)
    assert p == short_p_ids and a == short_a_ids

    assert (counts.sequences, counts.prompt_truncated, counts.answer_truncated) == (4, 2, 2)
    assert counts.summary() == "4 sequences: prompt start cut in 2, answer end cut in 2"


def test_chat_template_truncation_drops_oldest_turns_first(tiny_chat):
    f = formatter(tiny_chat, max_length=20, min_prompt_tokens=8)
    bos = f.tokenizer.bos_token_id
    long_turns = [{"role": "user", "content": "old " * 20},
                  {"role": "assistant", "content": "older reply " * 5},
                  {"role": "user", "content": "newest question"}]
    head = f.tokenizer.apply_chat_template(long_turns, tokenize=False,
                                           add_generation_prompt=True)
    head_ids = f.backend.encode(head, add_special_tokens=False).ids
    tail_ids = f.backend.encode("short answer[SEP]", add_special_tokens=False).ids

    def body(ids: list[int]) -> list[int]:
        # whether a leading BOS survives is test_chat_template_truncation_keeps_bos
        return ids[1:] if ids[0] == bos else ids

    enc = f.encode(long_turns, "short answer")
    assert enc.prompt_truncated and not enc.answer_truncated
    assert len(enc) == 20
    text = f.tokenizer.decode(enc.input_ids)
    assert text.endswith("user : newest question [SEP] assistant : short answer [SEP]")
    ids = body(enc.input_ids)
    assert ids[-len(tail_ids):] == tail_ids  # the answer is whole
    kept = ids[:-len(tail_ids)]
    assert len(kept) >= 8 and kept == head_ids[-len(kept):]  # the prompt's end is kept

    # a long answer: the prompt keeps min_prompt_tokens, the answer's end goes
    enc = f.encode(long_turns, "words " * 40)
    assert enc.prompt_truncated and enc.answer_truncated and len(enc) == 20
    assert body(enc.input_ids)[:8] == head_ids[-8:]
    answer_ids = f.backend.encode("words " * 40 + "[SEP]", add_special_tokens=False).ids
    rest = body(enc.input_ids)[8:]
    assert rest == answer_ids[:len(rest)]  # the answer's start is kept


def test_chat_template_truncation_keeps_bos(tiny_chat):
    f = formatter(tiny_chat, max_length=20, min_prompt_tokens=8)
    enc = f.encode([{"role": "user", "content": "old " * 40}], "short answer")
    assert enc.prompt_truncated
    assert enc.input_ids[0] == f.tokenizer.bos_token_id


def test_a_group_of_answers_follows_one_prompt_cut_for_the_longest(tiny_chat):
    f = formatter(tiny_chat, max_length=40, min_prompt_tokens=8)
    prompt = [{"role": "user", "content": "old words " * 30}]
    short, long_ = "yes", "a much longer answer " * 3
    alone = [f.encode(prompt, a) for a in (short, long_)]
    assert len(alone[0]) == len(alone[1]) == 40  # each cut for itself: different prompts
    assert alone[0].prompt_tokens > alone[1].prompt_tokens
    group = f.encode_group(prompt, [short, long_])
    assert group[1].input_ids == alone[1].input_ids  # the longest is cut as on its own
    n = group[1].prompt_tokens
    assert group[0].prompt_tokens == n and group[0].input_ids[:n] == group[1].input_ids[:n]
    assert group[0].input_ids[n:] == alone[0].input_ids[alone[0].prompt_tokens:]
    assert all(e.prompt_truncated for e in group) and len(group[0]) < 40
    assert f.encode_group(prompt, [short]) == [alone[0]]


# --- save / reload ---------------------------------------------------------------------

def perturb(rm: RewardModel, seed: int, scale: float = 0.05, head_scale: float = 0.5) -> None:
    """Move every trainable weight (stands in for training; LoRA B matrices start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if not p.requires_grad:
                continue
            s = head_scale if _head_key(name) else scale
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * s)


def _head_key(name: str) -> str | None:
    """``classifier.weight`` for the head's parameter ``name`` (plain or peft-wrapped);
    None for other parameters and for peft's frozen copy of the original head."""
    if "original_module" in name:
        return None
    key = name.replace("base_model.model.", "", 1).replace("modules_to_save.default.", "")
    return key if key.split(".")[0] in ("classifier", "score") else None


def head_state(rm: RewardModel) -> dict[str, torch.Tensor]:
    out = {k: p.detach().clone() for n, p in rm.model.named_parameters()
           if (k := _head_key(n)) is not None}
    assert out, "no head parameters found"
    return out


def sample_texts(helpers, n: int = 12):
    recs = helpers.varied_pairs(n, seed=3)
    return [r.prompt for r in recs], [r.chosen for r in recs]


BACKBONES = [("tiny_bert", ["query", "value"]), ("tiny_chat", ["q_proj", "v_proj"])]


@pytest.mark.parametrize("which,targets", BACKBONES, ids=["bert", "chat"])
def test_full_finetune_save_reload_is_bit_identical(request, tmp_path, helpers, which, targets):
    backbone = request.getfixturevalue(which)
    rm = RewardModel.create(ModelOptions(backbone=backbone, max_length=64,
                                         min_prompt_tokens=16, seed=5))
    perturb(rm, seed=1)
    prompts, answers = sample_texts(helpers)
    before = score_texts(rm, prompts, answers)
    state = {k: v.clone() for k, v in rm.model.state_dict().items()}
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert (loaded.meta.max_length, loaded.meta.min_prompt_tokens) == (64, 16)
    assert loaded.meta.formatting == rm.formatter.mode
    assert not loaded.model.training
    after_state = loaded.model.state_dict()
    for k, v in state.items():
        assert torch.equal(after_state[k], v), k
    assert score_texts(loaded, prompts, answers) == before


@pytest.mark.parametrize("which,targets", BACKBONES, ids=["bert", "chat"])
def test_lora_save_reload_restores_the_trained_head(request, tmp_path, helpers, which,
                                                    targets):
    backbone = request.getfixturevalue(which)
    opts = ModelOptions(backbone=backbone, max_length=64, seed=7,
                        lora=LoraOptions(r=4, alpha=8, target_modules=targets))
    rm = RewardModel.create(opts)
    assert rm.num_parameters(trainable_only=True) < rm.num_parameters() / 10
    fresh_head = head_state(rm)
    perturb(rm, seed=2)
    trained_head = head_state(rm)
    assert any(not torch.equal(fresh_head[k], trained_head[k]) for k in trained_head)
    prompts, answers = sample_texts(helpers)
    before = score_texts(rm, prompts, answers)

    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.meta.lora is not None and loaded.meta.lora["r"] == 4
    loaded_head = head_state(loaded)
    assert loaded_head.keys() == trained_head.keys()
    for k in trained_head:
        assert torch.equal(loaded_head[k], trained_head[k]), f"head {k} not restored"
    assert score_texts(loaded, prompts, answers) == before


@pytest.mark.parametrize("which,targets", BACKBONES, ids=["bert", "chat"])
def test_lora_head_check_can_fail(request, helpers, which, targets):
    """The reload check above compares against a head that really differs from a fresh one:
    a re-initialised head (seeded or not) would not pass it."""
    backbone = request.getfixturevalue(which)
    opts = ModelOptions(backbone=backbone, max_length=64, seed=7,
                        lora=LoraOptions(r=4, alpha=8, target_modules=targets))
    rm = RewardModel.create(opts)
    perturb(rm, seed=2)
    trained = head_state(rm)
    fresh = RewardModel.create(opts)  # same seed: the head before training
    fresh_head = head_state(fresh)
    unseeded = RewardModel.create(ModelOptions(backbone=backbone, seed=99,
                                               lora=opts.lora))
    for other in (fresh_head, head_state(unseeded)):
        assert other.keys() == trained.keys()
        assert all(not torch.allclose(other[k], trained[k], atol=1e-3) for k in trained)
    prompts, answers = sample_texts(helpers)
    assert score_texts(fresh, prompts, answers) != score_texts(rm, prompts, answers)


def test_seed_fixes_the_new_head(tiny_bert):
    a = head_state(RewardModel.create(ModelOptions(backbone=tiny_bert, seed=3)))
    b = head_state(RewardModel.create(ModelOptions(backbone=tiny_bert, seed=3)))
    c = head_state(RewardModel.create(ModelOptions(backbone=tiny_bert, seed=4)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_dropout_is_off_by_default(tiny_bert):
    rm = RewardModel.create(ModelOptions(backbone=tiny_bert))
    ps = [m.p for m in rm.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.0 for p in ps)
    rm = RewardModel.create(ModelOptions(backbone=tiny_bert, dropout=True))
    assert any(m.p > 0 for m in rm.model.modules() if isinstance(m, torch.nn.Dropout))
