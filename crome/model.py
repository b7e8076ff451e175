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
    seed: int = 0  # initialises the new reward head


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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        opts = options or ModelOptions()
        backbone = resolve_backbone(opts.backbone)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        _add_distinct_pad_token(tokenizer)
        torch.manual_seed(opts.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone, num_labels=1, dtype=torch.float32)
        _fit_embeddings(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        if not opts.dropout:
            _disable_dropout(model)
        lora = None
        if opts.lora is not None:
            model = _wrap_lora(model, opts.lora)
            lora = asdict(opts.lora)
        # the packaged decoder is recorded by name: its folder is rebuilt where it is missing
        named = opts.backbone if opts.backbone == PACKAGED_DECODER else backbone
        meta = RewardModelMeta(backbone=named, max_length=opts.max_length,
                               min_prompt_tokens=opts.min_prompt_tokens,
                               dropout=opts.dropout, lora=lora, answer_type_ids=False)
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
        if meta.lora is not None:
            from peft import PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(
                resolve_backbone(meta.backbone), num_labels=1, dtype=torch.float32)
            _fit_embeddings(base, tokenizer)  # a pad token added by ``create``
            base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, p / ADAPTER_DIR)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                p, num_labels=1, dtype=torch.float32)
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
        template = crome_chat_template(self.formatter)
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

    def forward(self, batch: Batch) -> torch.Tensor:
        """Rewards of a collated batch (moved to the model's device), on that device."""
        out = self.model(**batch.to(self.device).as_kwargs())
        return out.logits.squeeze(-1)

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


def _wrap_lora(model: nn.Module, lora: LoraOptions) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=head_module_names(model),
    )
    return get_peft_model(model, config)
