"""The reward model: any Hugging Face backbone with a one-output sequence-classification head.

How a (prompt, answer) becomes tokens, in one place so training and scoring never disagree:

* **Tokenizer with a chat template** (instruction-tuned decoders): the chat is rendered with the
  template, the prompt with ``add_generation_prompt=True`` and the answer as the text the
  template adds after it. Both parts are tokenised with ``add_special_tokens=False``, because
  the template already holds BOS and the turn markers: no duplicated BOS/EOS.
* **No chat template** (encoders such as the default MiniLM, base decoders): a chat prompt is
  rendered as ``User: …\\n\\nAssistant: …`` turns joined by blank lines (a text prompt is used
  as is), and prompt and answer are joined by the tokenizer's own pair template
  (``[CLS] prompt [SEP] answer [SEP]`` for BERT-style models). A tokenizer whose pair template
  adds nothing (GPT-2 style) gets ``\\n\\nAssistant: `` between the parts and its EOS token at
  the end, so the last token (which a decoder's head reads) closes the answer.

Truncation, when prompt + answer exceed ``max_length`` tokens: first the *start of the prompt*
is cut (the oldest turns go; the last ``min_prompt_tokens`` are kept), then, only if the answer
alone is still too long, the *end of the answer* is cut. Both are counted, never silent.
With decoder formatting (chat template, plain join), the two answers of a training pair are
cut together (:meth:`Formatter.encode_group`): the prompt for the longer one, so both follow
the same prompt tokens and a decoder can read that prompt once for both (``crome.packing``).

Other tools (reward-bench, TRL, vLLM, a plain ``AutoModelForSequenceClassification``) see the
same formatting through the saved tokenizer's chat template: a backbone without one gets a
template written by :meth:`RewardModel.save` that renders what the rules above render (see
:func:`crome_chat_template`), and a decoder gets a pad token of its own, so the classification
head reads the last real token under left or right padding (``README.md`` of the saved folder
and ``crome/model_card.py`` give the recipes).

Dropout is switched off by default: an RM is trained on a pairwise margin, and dropout noise
on the two forward passes of a pair adds variance to that margin (TRL users turn it off for
the same reason); it also halves CPU throughput.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crome.backbones import PACKAGED_DECODER, resolve_backbone
from crome.data.schema import Prompt

META_FILE = "crome.json"
ADAPTER_DIR = "adapter"
META_VERSION = 1  # fields are only ever added (with defaults), so version 1 files still load
PAD_TOKEN = "<|pad|>"  # added to tokenizers without a pad token or whose pad is their EOS


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture


@dataclass
class ModelOptions:
    backbone: str | None = None  # None: the packaged MiniLM
    max_length: int = 256
    min_prompt_tokens: int = 64
    dropout: bool = False
    lora: LoraOptions | None = None
    # initialises the new reward head and LoRA; train() sets it from TrainOptions.seed
    seed: int = 0
    # a pairwise preference model (crome.pairwise): reads the prompt and two answers and
    # gives logits of "first better", "second better", "same" instead of one reward
    pairwise: bool = False


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    prompt_truncated: bool = False
    answer_truncated: bool = False
    # Leading tokens that are the prompt alone (the answer's come after): 0 where the two
    # are not separable (pair templates, fully templated texts). Prefix sharing groups on it.
    prompt_tokens: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TruncationCounts:
    sequences: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0

    def add(self, enc: Encoded) -> None:
        self.sequences += 1
        self.prompt_truncated += int(enc.prompt_truncated)
        self.answer_truncated += int(enc.answer_truncated)

    def summary(self) -> str:
        return (f"{self.sequences} sequences: prompt start cut in {self.prompt_truncated}, "
                f"answer end cut in {self.answer_truncated}")


@dataclass
class Batch:
    """Padded tensors for one forward pass."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` (itself if it is there)."""
        if self.input_ids.device == device:
            return self
        types = self.token_type_ids
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     types.to(device) if types is not None else None)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        kw = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            kw["token_type_ids"] = self.token_type_ids
        return kw

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def render_plain_prompt(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt)


def _as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


FORMATTING_MODES = ("chat_template", "pair_template", "plain_join")

# What a pairwise model reads (decoders: the user turn; the verdict is the next token), after
# RRM/RLHFlow's pair-pm template. Encoders read the prompt, then ENCODER_FRAME.
COMPARE_FRAME = ("Which response to the conversation is better? Answer A, B or Same.\n\n"
                 "[CONVERSATION]\n{prompt}\n\n[RESPONSE A]\n{first}\n\n"
                 "[RESPONSE B]\n{second}")
COMPARE_SUFFIX = "\n\nAnswer:"  # decoders without a chat template
# encoders: the pair template's two segments, split at "|"
ENCODER_FRAME = "{prompt} [RESPONSE A] {first}|[RESPONSE B] {second}"
# The verdicts, in the order of a pairwise model's outputs; decoders read the tokens of these
# words (with a leading space after COMPARE_SUFFIX).
LABELS = ("A", "B", "Same")


def fair_split(n_a: int, n_b: int, room: int) -> tuple[int, int]:
    """Tokens kept of two answers sharing ``room``: both whole if they fit; else one that fits
    in half keeps all and the other gets the rest; else half each. Symmetric in the two."""
    if n_a + n_b <= room:
        return n_a, n_b
    half = room // 2
    if n_a <= half:
        return n_a, room - n_a
    if n_b <= half:
        return room - n_b, n_b
    return half, half


class Formatter:
    """Turns (prompt, answer) into token ids for one tokenizer; see the module docstring.

    ``mode`` is detected from the tokenizer unless given: a saved RM passes the mode recorded
    in ``crome.json``, because its saved tokenizer may carry the chat template that
    :meth:`RewardModel.save` wrote for other tools, which must not switch crome itself to
    ``chat_template`` formatting."""

    def __init__(self, tokenizer: Any, max_length: int, min_prompt_tokens: int = 64,
                 mode: str | None = None, answer_type_ids: bool = True) -> None:
        import tokenizers

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.min_prompt_tokens = min_prompt_tokens
        # A private copy of the fast tokenizer without padding/truncation: we truncate each
        # side ourselves (prompt from the left, answer from the right).
        self.backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.pair_specials = self.backend.num_special_tokens_to_add(True)
        self.uses_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.eos_id = tokenizer.eos_token_id
        if mode is None:
            mode = "chat_template" if has_template else (
                "pair_template" if self.pair_specials else "plain_join")
        if mode not in FORMATTING_MODES:
            raise ValueError(f"unknown formatting mode {mode!r}")
        if mode == "chat_template" and not has_template:
            raise ValueError("formatting mode chat_template needs a tokenizer with a chat "
                             "template")
        self.mode = mode
        self.use_template = mode == "chat_template"
        # the prompt's tokens come first and alone (decoder formatting): they can be shared
        self.has_prompt_split = mode != "pair_template"
        # pair_template: the answer's tokens get type 1 (BERT's pair convention), or type 0
        # like every other token, which is what a tool that tokenizes one string produces
        self.answer_type_ids = answer_type_ids

    def _texts(self, prompt: Prompt, answer: str) -> tuple[str, str]:
        if self.use_template:
            msgs = _as_messages(prompt)
            head = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(
                msgs + [{"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(head):
                return head, full[len(head):]
            return head, answer  # templates that rewrite history: score the raw answer
        text = render_plain_prompt(prompt)
        if self.mode == "plain_join":
            text += "\n\nAssistant: "
        return text, answer

    def encode(self, prompt: Prompt, answer: str) -> Encoded:
        return self.encode_group(prompt, [answer])[0]

    def encode_group(self, prompt: Prompt, answers: Sequence[str]) -> list[Encoded]:
        """Several answers to one prompt. Where the prompt must be cut, it is cut once, for
        the longest answer, so every answer follows the same prompt tokens (what a pair's
        two sequences need to share their prompt, ``crome.packing``); one answer is cut as
        :meth:`encode` cuts it."""
        texts = [self._texts(prompt, a) for a in answers]
        head = texts[0][0]
        pe = self.backend.encode(head, add_special_tokens=False)
        aes = [self.backend.encode(tail, add_special_tokens=False) for _, tail in texts]
        if any(h != head for h, _ in texts):
            raise ValueError("encode_group: the answers rendered different prompts")
        bos = self.tokenizer.bos_token_id
        lead = [bos] if self.use_template and bos is not None and pe.ids[:1] == [bos] else []
        if lead:  # the template's BOS survives truncation of the prompt start
            pe.truncate(len(pe.ids) - 1, direction="left")
        extra_eos = int(self.mode == "plain_join" and self.eos_id is not None)
        specials = 0 if self.use_template else self.pair_specials
        budget = self.max_length - specials - extra_eos - len(lead)
        n_p, n_a = len(pe.ids), max(len(ae.ids) for ae in aes)
        p_trunc = False
        keep_p = n_p
        if n_p + n_a > budget:
            keep_p = max(min(n_p, self.min_prompt_tokens), budget - n_a)
            keep_p = min(keep_p, n_p, budget)
            if keep_p < n_p:
                pe.truncate(keep_p, direction="left")
                p_trunc = True
        out = []
        for ae in aes:
            keep_a = budget - keep_p
            a_trunc = len(ae.ids) > keep_a
            if a_trunc:
                ae.truncate(max(keep_a, 0), direction="right")
            if self.use_template or self.mode == "plain_join":
                ids = lead + pe.ids + ae.ids + ([self.eos_id] if extra_eos else [])
                types = [0] * len(ids) if self.uses_type_ids else None
                prompt_tokens = len(lead) + len(pe.ids)
            else:
                enc = self.backend.post_process(pe, ae, add_special_tokens=True)
                ids = enc.ids
                types = None
                if self.uses_type_ids:
                    types = enc.type_ids if self.answer_type_ids else [0] * len(ids)
                prompt_tokens = 0
            out.append(Encoded(ids, types, p_trunc, a_trunc, prompt_tokens))
        return out

    @functools.cached_property
    def _comparison_literals(self) -> list[Any]:
        """The encoded text around the prompt and the two answers of a comparison (4 pieces;
        encoders 5, the segment break splitting the third): the same for every comparison,
        so the chat template is rendered and the pieces tokenised once per formatter."""
        marks = ("\x00crome-prompt\x00", "\x00crome-first\x00", "\x00crome-second\x00")
        if self.has_prompt_split:
            frame = COMPARE_FRAME.format(prompt=marks[0], first=marks[1], second=marks[2])
            if self.use_template:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": frame}], tokenize=False,
                    add_generation_prompt=True)
            else:
                text = frame + COMPARE_SUFFIX
        else:  # the pair template's segments: prompt and first answer, then second answer
            text = ENCODER_FRAME.format(prompt=marks[0], first=marks[1], second=marks[2])
        literals = re.split("|".join(map(re.escape, marks)), text)
        if not self.has_prompt_split:  # the "|" between the two segments
            head, tail = literals[2].split("|")
            literals[2:3] = [head, tail]
        if len(literals) != 4 + (not self.has_prompt_split) or \
                [m for m in marks if m in text] != list(marks):
            raise ValueError("the chat template does not keep the comparison's parts in "
                             "order")
        return [self.backend.encode(t, add_special_tokens=False) for t in literals]

    def encode_comparison(self, prompt: Prompt, first: str, second: str) -> Encoded:
        """A pairwise model's input: the prompt and two answers (``COMPARE_FRAME`` with its
        ``[RESPONSE A]``/``[RESPONSE B]`` markers). Decoders: the frame is the user turn of
        the chat template (or is followed by ``\\n\\nAnswer:`` without one), so the next
        token is the verdict. Encoders: ``[CLS] prompt [RESPONSE A] first [SEP] [RESPONSE B]
        second [SEP]``, the second answer with token type 1 where the model has types.

        Over ``max_length``, the start of the prompt is cut first (down to
        ``min_prompt_tokens``), then the answers, fairly: one that fits in half the room
        left is kept whole and the other gets the rest, else both get half. Each answer is
        cut the same in either order, so the two orders of a pair read the same text."""
        lit = self._comparison_literals
        prompt_text = render_plain_prompt(prompt)
        pe, ae, be = (self.backend.encode(t, add_special_tokens=False)
                      for t in (prompt_text, first, second))
        specials = 0 if self.has_prompt_split else self.pair_specials
        budget = self.max_length - specials - sum(len(e.ids) for e in lit)
        n_p, n_a, n_b = len(pe.ids), len(ae.ids), len(be.ids)
        keep_p = n_p
        if n_p + n_a + n_b > budget:
            keep_p = max(min(n_p, self.min_prompt_tokens), budget - n_a - n_b)
            keep_p = max(min(keep_p, n_p, budget), 0)
        room = max(budget - keep_p, 0)
        keep_a, keep_b = fair_split(n_a, n_b, room)
        for enc, keep, n, side in ((pe, keep_p, n_p, "left"), (ae, keep_a, n_a, "right"),
                                   (be, keep_b, n_b, "right")):
            if keep < n:
                enc.truncate(keep, direction=side)
        if self.has_prompt_split:
            ids = [i for e in (lit[0], pe, lit[1], ae, lit[2], be, lit[3]) for i in e.ids]
            types = [0] * len(ids) if self.uses_type_ids else None
        else:
            import tokenizers

            merge = tokenizers.Encoding.merge
            enc = self.backend.post_process(merge([lit[0], pe, lit[1], ae, lit[2]]),
                                            merge([lit[3], be, lit[4]]), add_special_tokens=True)
            ids = enc.ids
            # token types tell the answers apart: 0 for the prompt and A, 1 for B
            types = enc.type_ids if self.uses_type_ids else None
        return Encoded(ids, types, keep_p < n_p, keep_a < n_a or keep_b < n_b, 0)

    def encode_many(self, prompts: list[Prompt], answers: list[str],
                    counts: TruncationCounts | None = None) -> list[Encoded]:
        out = []
        for p, a in zip(prompts, answers, strict=True):
            enc = self.encode(p, a)
            if counts is not None:
                counts.add(enc)
            out.append(enc)
        return out

    def collate(self, encs: list[Encoded], pad_to_multiple: int = 1) -> Batch:
        """Right-pad a list of sequences to the longest (rounded up to ``pad_to_multiple``)."""
        longest = max(len(e) for e in encs)
        width = -(-longest // pad_to_multiple) * pad_to_multiple
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long) if self.uses_type_ids else None
        for i, e in enumerate(encs):
            n = len(e)
            ids[i, :n] = torch.tensor(e.input_ids)
            mask[i, :n] = 1
            if types is not None and e.token_type_ids is not None:
                types[i, :n] = torch.tensor(e.token_type_ids)
        return Batch(ids, mask, types)


# -- the chat template written for other tools ---------------------------------------------

_TEMPLATE = """\
{%- set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}
{%- set ns = namespace(prompt=messages, answer=none) -%}
{%- if messages and messages[-1]['role'] == 'assistant' and not add_generation_prompt -%}
{%- set ns.prompt = messages[:-1] -%}
{%- set ns.answer = messages[-1]['content'] -%}
{%- endif -%}
{%- if ns.prompt | length == 1 and ns.prompt[0]['role'] == 'user' \
and not (role_labels is defined and role_labels) -%}
{{- ns.prompt[0]['content'] -}}
{%- else -%}
{%- for m in ns.prompt -%}
{{- ('\\n\\n' if not loop.first else '') + names.get(m['role'], m['role'] | capitalize) \
+ ': ' + m['content'] -}}
{%- endfor -%}
{%- endif -%}
{%- if ns.answer is not none -%}
{{- BETWEEN + ns.answer + AFTER -}}
{%- elif add_generation_prompt -%}
{{- GENERATION -}}
{%- endif -%}"""


def _jinja_str(text: str) -> str:
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
               .replace("\r", "\\r"))
    return f"'{escaped}'"


def _specials_around(backend: Any, pair: bool) -> list[list[int]] | None:
    """The special tokens the post-processor puts around one sequence (``[before, after]``) or
    a pair (``[before, between, after]``); None if the layout is not that simple."""
    probes = [backend.encode(t, add_special_tokens=False) for t in ("alpha", "beta")]
    probes = probes[:2] if pair else probes[:1]
    enc = backend.post_process(probes[0], probes[1] if pair else None, add_special_tokens=True)
    runs: list[list[int]] = [[]]  # the runs of special tokens around the sequences
    content_runs = 0
    in_content = False
    for i, special in zip(enc.ids, enc.special_tokens_mask):
        if special:
            if in_content:
                runs.append([])
            runs[-1].append(i)
        elif not in_content:
            content_runs += 1
        in_content = not special
    if in_content:
        runs.append([])
    content = sum(1 for m in enc.special_tokens_mask if not m)
    if content_runs != len(probes) or content != sum(len(p.ids) for p in probes):
        return None
    return runs


def crome_chat_template(formatter: Formatter) -> str | None:
    """A Jinja chat template that renders what ``formatter`` encodes, for a tokenizer that has
    none; None for ``chat_template`` formatting (the tokenizer's own template is kept) and for
    tokenizers whose special tokens cannot be written that way.

    The prompt is rendered as crome renders it: a lone user message (how every tool passes a
    text prompt) as its bare content, other chats as ``Role: content`` turns joined by blank
    lines (``role_labels=True``, passed to ``apply_chat_template``, renders a lone user message
    as ``User: …`` too, as crome does for a chat prompt of one user turn). Then:

    * ``pair_template`` (BERT-style): the pair template's middle special tokens and the answer,
      ``prompt[SEP]answer``; the tokenizer's single-sequence template adds the outer ones, so
      ``tokenizer(text)`` gives crome's token ids: ``[CLS] prompt [SEP] answer [SEP]``, and
      its token type ids (all 0) are crome's for RMs made with ``answer_type_ids=False`` (every
      RM ``create`` makes). Older RMs gave the answer type 1: for them the exact recipe is
      ``tokenizer(prompt_text, answer)``, with ``prompt_text`` from
      ``add_generation_prompt=True``.
    * ``plain_join`` (no pair specials, GPT-2 style): ``prompt\\n\\nAssistant: answer<eos>``.
      crome tokenises the parts before and after the answer's start separately, so the exact
      ids are those of ``tokenizer(head, tail, add_special_tokens=False)``.
    """
    if formatter.mode == "chat_template":
        return None
    tok = formatter.tokenizer
    if formatter.mode == "pair_template":
        pair = _specials_around(formatter.backend, pair=True)
        single = _specials_around(formatter.backend, pair=False)
        if pair is None or single is None or len(pair) != 3 or len(single) != 2:
            return None
        if [pair[0], pair[2]] != single:  # tokenizer(text) would not add the outer ones
            return None
        between_ids = pair[1]
        between = "".join(formatter.backend.id_to_token(i) for i in between_ids)
        if formatter.backend.encode(between, add_special_tokens=False).ids != between_ids:
            return None
        after, generation = "", ""
    else:
        between = generation = "\n\nAssistant: "
        after = tok.eos_token if formatter.eos_id is not None else ""
    values = {"BETWEEN": between, "AFTER": after, "GENERATION": generation}
    return re.sub(r"\b(BETWEEN|AFTER|GENERATION)\b", lambda m: _jinja_str(values[m[1]]),
                  _TEMPLATE)


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules with weights outside the backbone: the reward head (``classifier`` for
    BERT, ``score`` for Llama/Qwen). peft must save these with a LoRA adapter, or the head
    comes back re-initialised on reload (a known TRL problem)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


@dataclass
class RewardModelMeta:
    """What ``crome.json`` records beside the HF weights, so a reload formats text the same."""

    version: int = META_VERSION
    backbone: str = ""
    max_length: int = 256
    min_prompt_tokens: int = 64
    dropout: bool = False
    lora: dict[str, Any] | None = None
    formatting: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Whose chat template the saved tokenizer holds: "tokenizer" (the backbone's own, crome
    # formats with it), "crome" (written by ``save`` for other tools; crome formats by
    # ``formatting``), "" (none, or a checkpoint saved before crome wrote templates).
    chat_template: str = ""
    # pair_template formatting: whether the answer's tokens have token type 1. RMs made before
    # this field existed had them (hence the default); ``create`` makes RMs without them, so
    # that one string rendered by the saved chat template gives crome's rewards exactly.
    answer_type_ids: bool = True
    # A pairwise preference model (``crome.pairwise``): three outputs per comparison, in the
    # order of LABELS. Encoders: a 3-way classification head. Decoders: the next-token logits
    # of ``label_ids`` (the tokens of "A", "B", "Same") after the comparison template.
    pairwise: bool = False
    label_ids: list[int] = field(default_factory=list)


class RewardModel:
    """A backbone with a scalar head plus the formatter that feeds it."""

    def __init__(self, model: nn.Module, tokenizer: Any, meta: RewardModelMeta) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.formatter = Formatter(tokenizer, meta.max_length, meta.min_prompt_tokens,
                                   mode=meta.formatting or None,
                                   answer_type_ids=meta.answer_type_ids)
        meta.formatting = self.formatter.mode

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, options: ModelOptions | None = None) -> RewardModel:
        """A fresh RM on a backbone (the head is new, seeded by ``options.seed``)."""
        from transformers import AutoTokenizer

        opts = options or ModelOptions()
        backbone = resolve_backbone(opts.backbone)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        _add_distinct_pad_token(tokenizer)
        label_ids: list[int] = []
        if opts.pairwise:
            probe = Formatter(tokenizer, opts.max_length, opts.min_prompt_tokens)
            if probe.has_prompt_split:  # a decoder: it answers with a label token
                label_ids = verdict_token_ids(tokenizer, probe.use_template)
        torch.manual_seed(opts.seed)
        model = _auto_model(backbone, opts.pairwise, bool(label_ids))
        _fit_embeddings(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        if not opts.dropout:
            _disable_dropout(model)
        lora = None
        if opts.lora is not None:
            if getattr(model, "crome_head_missing", False):
                raise ValueError(f"{backbone} has no language-model head in its checkpoint: a "
                                 "pairwise decoder reads its verdict tokens there, and LoRA "
                                 "does not train or save it; use a causal LM checkpoint, or "
                                 "full fine-tuning (which saves the new head)")
            model = _wrap_lora(model, opts.lora, causal_lm=bool(label_ids))
            lora = asdict(opts.lora)
        # the packaged decoder is recorded by name: its folder is rebuilt where it is missing
        named = opts.backbone if opts.backbone == PACKAGED_DECODER else backbone
        meta = RewardModelMeta(backbone=named, max_length=opts.max_length,
                               min_prompt_tokens=opts.min_prompt_tokens,
                               dropout=opts.dropout, lora=lora, answer_type_ids=False,
                               pairwise=opts.pairwise, label_ids=label_ids)
        return cls(model, tokenizer, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> RewardModel:
        """Load a directory written by :meth:`save`, or any HF sequence-classification RM,
        onto ``device`` (None: the first CUDA GPU if there is one, else the CPU)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        meta_path = p / META_FILE
        if not meta_path.exists():
            # A plain HF reward model (e.g. from the Hub cache): score it with defaults.
            tokenizer = AutoTokenizer.from_pretrained(p)
            _ensure_pad_token(tokenizer)
            model = AutoModelForSequenceClassification.from_pretrained(p, num_labels=1)
            model.config.pad_token_id = tokenizer.pad_token_id
            return cls(model.eval(), tokenizer,
                       RewardModelMeta(backbone=str(p), max_length=512))
        raw = json.loads(meta_path.read_text())
        meta = RewardModelMeta(**{k: v for k, v in raw.items()
                                  if k in RewardModelMeta.__dataclass_fields__})
        tokenizer = AutoTokenizer.from_pretrained(p)
        _ensure_pad_token(tokenizer)
        causal_lm = bool(meta.label_ids)
        if meta.lora is not None:
            from peft import PeftModel

            base = _auto_model(resolve_backbone(meta.backbone), meta.pairwise, causal_lm)
            _fit_embeddings(base, tokenizer)  # a pad token added by ``create``
            base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, p / ADAPTER_DIR)
        else:
            model = _auto_model(str(p), meta.pairwise, causal_lm)
        if not meta.dropout:
            _disable_dropout(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device).eval(), tokenizer, meta)

    def save(self, path: str | os.PathLike[str], card: bool = True,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """An HF model directory (safetensors) plus ``crome.json``; LoRA: adapter + head.

        The tokenizer is saved with a chat template that renders crome's formatting (the
        backbone's own template if it has one, else :func:`crome_chat_template`), in
        ``tokenizer_config.json``, where every transformers version reads it; ``card`` writes
        a model card (``README.md``, :func:`crome.model_card.write_model_card`) that
        ``crome train`` rewrites with the data counts and training figures. ``state_dict``:
        the model's weights when ``self.model`` holds only a shard of them (gathered by
        accelerate under FSDP or ZeRO-3)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if self.meta.lora is not None:
            # A pad token added by ``create`` resized the frozen embeddings; ``load`` resizes
            # the base the same way, so peft need not store the whole table in the adapter.
            self.model.save_pretrained(p / ADAPTER_DIR, save_embedding_layers=False,
                                       state_dict=state_dict)
        else:
            self.model.save_pretrained(p, state_dict=state_dict)
        own = self.tokenizer.chat_template
        # a pairwise model's input is not one answer's chat: no template is written for it
        template = None if self.meta.pairwise else crome_chat_template(self.formatter)
        self.meta.chat_template = ("tokenizer" if self.formatter.use_template
                                   else "crome" if template else "")
        if template is not None:  # on the saved tokenizer only: crome formats by its mode
            self.tokenizer.chat_template = template
        try:
            self.tokenizer.save_pretrained(p, save_jinja_files=False)
        finally:
            self.tokenizer.chat_template = own
        (p / META_FILE).write_text(json.dumps(asdict(self.meta), indent=2) + "\n")
        if card:
            from crome.model_card import write_model_card

            write_model_card(p, self.meta)
        return p

    # -- use ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pairwise(self) -> bool:
        return self.meta.pairwise

    def forward(self, batch: Batch) -> torch.Tensor:
        """Rewards of a collated batch (moved to the model's device), on that device; for a
        pairwise model, the (rows, 3) logits of LABELS."""
        return self.outputs(batch.to(self.device), self.model)

    def outputs(self, batch: Batch, model: nn.Module) -> torch.Tensor:
        """What ``model`` (this RM's network, or the trainer's handle on it) gives for
        ``batch``: one reward per row, or a pairwise model's three logits per row."""
        if self.meta.label_ids:
            return label_logits(model, batch, self.meta.label_ids)
        logits = model(**batch.as_kwargs()).logits
        return logits if self.meta.pairwise else logits.squeeze(-1)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters()
                   if p.requires_grad or not trainable_only)


def freeze_head_bias(model: nn.Module) -> int:
    """Stop training the reward head's bias; returns how many tensors were frozen.

    Bradley–Terry and tie losses see only reward *differences*, so the bias gets no gradient
    but rounding noise, which Adam turns into steps of about the learning rate: absolute
    scores then depend on how a batch was split (measured: 9e-3 between grad_accum 1 and 2).
    With reward centering the bias does get a real gradient, and the trainer leaves it alone.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = head_module_names(base)
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[-1] == "bias" and any(h in parts for h in heads) and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _ensure_pad_token(tokenizer: Any) -> None:
    """For loading RMs trained elsewhere: their head was trained with whatever pad they had."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def _add_distinct_pad_token(tokenizer: Any) -> bool:
    """A new RM gets a pad token that is not its EOS: a sequence-classification head reads the
    last token that is not the pad, so with pad = EOS a decoder's head would skip the closing
    EOS in transformers but read it in tools that take the last token (vLLM)."""
    pad = tokenizer.pad_token_id
    if pad is not None and pad != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def _fit_embeddings(model: nn.Module, tokenizer: Any) -> None:
    """Grow the input embeddings to the tokenizer (a pad token added by ``create``); the new
    rows are the mean of the old ones, so a reload (LoRA: base + adapter) gets them again.
    A pad row's value never reaches a reward: pads are masked and not read by the head."""
    emb = model.get_input_embeddings()
    old = emb.num_embeddings
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def _wrap_lora(model: nn.Module, lora: LoraOptions, causal_lm: bool = False) -> nn.Module:
    """LoRA adapters; a reward head (new weights) is trained and saved whole, a language
    model's head (a pairwise decoder reads its label rows) is left as it is."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=None if causal_lm else head_module_names(model),
    )
    return get_peft_model(model, config)


def _auto_model(path: str, pairwise: bool, causal_lm: bool) -> nn.Module:
    """The HF model class an RM is made of: a one-output (BT) or three-output (pairwise)
    sequence-classification head, or a causal LM whose label tokens a pairwise decoder
    reads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if causal_lm:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           output_loading_info=True)
        # an LM head the checkpoint lacks is random: a LoRA adapter (which leaves it out)
        # would not come back with it, and its label rows would read noise
        tied = (model.get_output_embeddings().weight.data_ptr()
                == model.get_input_embeddings().weight.data_ptr())
        model.crome_head_missing = not tied and any(
            k.startswith("lm_head") for k in info["missing_keys"])
        return model
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS) if pairwise else 1, dtype=torch.float32)


def verdict_token_ids(tokenizer: Any, chat_template: bool) -> list[int]:
    """The first token of each verdict word (LABELS) as the model would write it next: at the
    start of its turn with a chat template, after a space otherwise. They must differ."""
    ids = []
    for word in LABELS:
        toks = tokenizer(word if chat_template else " " + word, add_special_tokens=False)
        if not toks["input_ids"]:
            raise ValueError(f"the tokenizer gives no token for the verdict {word!r}")
        ids.append(int(toks["input_ids"][0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"the verdicts {LABELS} share a first token ({ids}): this tokenizer "
                         "cannot tell them apart in one step")
    return ids


def label_logits(model: nn.Module, batch: Batch, label_ids: Sequence[int]) -> torch.Tensor:
    """A causal LM's next-token logits of ``label_ids`` after each row's last real token
    (right padding): the backbone's last hidden state times those rows of the LM head, which
    equals the full logits at those entries without computing the whole vocabulary."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix)
    hidden = body(**batch.as_kwargs()).last_hidden_state
    last = batch.attention_mask.sum(dim=1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = inner.get_output_embeddings()
    rows = torch.as_tensor(list(label_ids), device=h.device)
    logits = h @ head.weight[rows].T.to(h.dtype)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[rows]
    return logits
