"""Prefix-shared packing: a causal decoder reads a prompt once for all of its answers.

A preference pair's two answers share their prompt; best-of-N's N answers do too; in hh-rlhf
the multi-turn prompt is most of the tokens. A causal decoder never lets a prompt token see
what follows it, so the prompt's hidden states are the same whatever answer comes after, and
one row can hold them all::

    tokens     [ prompt ............ | answer 1 ..... | answer 2 ........ | pad ]
    positions    0 1 2 … P-1           P P+1 …          P P+1 P+2 …
    attends      causal in the prompt; an answer sees the prompt and its own earlier
                 tokens, never another answer

Each answer's reward is read at its own last token, by the model's own head: what the plain
one-sequence-per-answer path reads, within float rounding (tests hold the two paths to the
same rewards and the same gradients).

What is shared is decided from token ids, not text: sequences whose prompt encodes to the same
tokens (:attr:`crome.model.Encoded.prompt_tokens`) are grouped, so a prompt whose start was
cut differently for a longer answer simply lands in another pack. Encoders (the MiniLM
default) read every token in both directions, so nothing can be shared there: their sequences
have no prompt split (``pair_template`` formatting) and stay on the plain path.

Which models it covers is decided by running it: :func:`prefix_sharing_works` compares the
packed and the plain rewards of one small pack, once per model, and the caller falls back to
the plain path where they differ (an attention that ignores a custom 4D mask, a sliding
window shorter than the sequences). Llama, Qwen2 and Qwen2.5 pass (tests; Qwen2.5-Coder-0.5B).
The mask is a dense additive ``(rows, 1, L, L)`` tensor, which SDPA and eager attention both
take; its cost grows with L², so a pack holds at most ``max_tokens`` tokens and a long group
is split over several packs (each repeats the prompt): 1,536 in scoring (the best of 512 to
4,096 measured on best-of-16), twice ``max_length`` in training (a pair always fits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crome.model import Encoded, RewardModel, head_module_names

PAD_SEGMENT = -1
PROBE_TOLERANCE = 1e-4  # |packed - plain| / max(1, |plain|), fp32, on the probe pack


@dataclass
class Pack:
    """One row: a shared prefix and the answers (suffixes) that follow it."""

    prefix: list[int]
    suffixes: list[list[int]]
    members: list[int]  # indices of the sequences the suffixes complete, in order

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)

    @property
    def unshared_length(self) -> int:
        """Tokens the same sequences take one row each."""
        return len(self.prefix) * len(self.suffixes) + sum(len(s) for s in self.suffixes)


@dataclass
class PackedBatch:
    """Right-padded packs: ids, restarting positions, segment ids (0 prompt, k ≥ 1 the k-th
    answer, -1 padding) and where each answer's reward is read."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    read_rows: torch.Tensor
    read_cols: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        if self.input_ids.device == device:
            return self
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids,
                                                    self.segments, self.read_rows,
                                                    self.read_cols)))

    @property
    def real_tokens(self) -> int:
        return int((self.segments != PAD_SEGMENT).sum())

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive ``(rows, 1, L, L)`` mask: 0 where a query may attend a key."""
        seg = self.segments
        idx = torch.arange(seg.shape[1], device=seg.device)
        causal = idx[None, :] <= idx[:, None]
        key, query = seg[:, None, :], seg[:, :, None]
        allowed = causal & (key != PAD_SEGMENT) & ((key == 0) | (key == query))
        # a padding query attends itself, so no row of the softmax is empty (no NaN)
        allowed |= torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)
        zero = torch.zeros((), dtype=dtype, device=seg.device)
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=seg.device)
        return torch.where(allowed, zero, blocked)[:, None]


def build_packs(encs: Sequence[Encoded], max_tokens: int) -> list[Pack]:
    """Group sequences with the same prompt tokens into packs of at most ``max_tokens``
    (a pack always takes at least one answer). Sequences without a prompt split are packs of
    their own. Packs come in the order of their first sequence."""
    groups: dict[tuple[int, ...], list[int]] = {}
    singles: list[list[int]] = []
    for i, e in enumerate(encs):
        if e.prompt_tokens <= 0:
            singles.append([i])
        else:
            groups.setdefault(tuple(e.input_ids[:e.prompt_tokens]), []).append(i)
    packs: list[Pack] = []
    for members in list(groups.values()) + singles:
        first = encs[members[0]]
        n = max(0, first.prompt_tokens)
        prefix = list(first.input_ids[:n])
        current: Pack | None = None
        for i in members:
            suffix = list(encs[i].input_ids[n:])
            if current is None or (current.length + len(suffix) > max_tokens):
                current = Pack(prefix, [], [])
                packs.append(current)
            current.suffixes.append(suffix)
            current.members.append(i)
    packs.sort(key=lambda p: p.members[0])
    return packs


def chunk_packs(packs: Sequence[Pack], answers: int) -> list[list[Pack]]:
    """Consecutive packs in chunks of at most ``answers`` answers (at least one pack each)."""
    chunks: list[list[Pack]] = []
    held = 0
    for p in packs:
        if not chunks or held + len(p.members) > answers:
            chunks.append([])
            held = 0
        chunks[-1].append(p)
        held += len(p.members)
    return chunks


def collate_packs(packs: Sequence[Pack], pad_id: int, pad_to_multiple: int = 1) -> PackedBatch:
    longest = max(p.length for p in packs)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    seg = torch.full((len(packs), width), PAD_SEGMENT, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    for r, p in enumerate(packs):
        n = len(p.prefix)
        ids[r, :n] = torch.tensor(p.prefix, dtype=torch.long)
        pos[r, :n] = torch.arange(n)
        seg[r, :n] = 0
        at = n
        for k, s in enumerate(p.suffixes, start=1):
            m = len(s)
            ids[r, at:at + m] = torch.tensor(s, dtype=torch.long)
            pos[r, at:at + m] = torch.arange(n, n + m)
            seg[r, at:at + m] = k
            rows.append(r)
            cols.append(at + m - 1 if m else n - 1)  # an empty answer: the prompt's last token
            at += m
    return PackedBatch(ids, pos, seg, torch.tensor(rows), torch.tensor(cols))


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = head_module_names(inner)
    if len(heads) != 1:
        raise ValueError(f"expected one reward head beside the backbone, found {heads}")
    return getattr(inner, inner.base_model_prefix), getattr(inner, heads[0])


def packed_rewards(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One reward per answer of ``batch``, in pack order (a sequence-classification model:
    its backbone reads the packs, its head reads each answer's last hidden state)."""
    backbone, head = _backbone_and_head(model)
    dtype = next(model.parameters()).dtype
    hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=batch.attention_mask(dtype),
                      use_cache=False).last_hidden_state
    return head(hidden[batch.read_rows, batch.read_cols]).squeeze(-1)


def _sliding_window_too_short(rm: RewardModel) -> bool:
    config = rm.model.config
    window = getattr(config, "sliding_window", None)
    layers = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layers or bool(getattr(config, "use_sliding_window",
                                                                 False))
    return bool(uses_window and window and window < rm.meta.max_length)


def prefix_sharing_works(rm: RewardModel) -> bool:
    """Whether this RM's packed rewards equal its plain ones: False for formatting without a
    prompt split (encoders), a sliding window shorter than ``max_length``, or a probe pack
    whose rewards differ. Computed once per RM object."""
    cached = getattr(rm, "_prefix_sharing_works", None)
    if cached is not None:
        return bool(cached)
    f = rm.formatter
    works = f.has_prompt_split and not f.uses_type_ids and not _sliding_window_too_short(rm)
    if works:
        prompt = [{"role": "user", "content": "Name a colour of the sky."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And at sunset?"}]
        encs = [f.encode(prompt, a) for a in ("Orange, red and pink.", "Green.", "")]
        packs = build_packs(encs, max_tokens=10_000)
        if len(packs) != 1:
            works = False
        else:
            was_training = rm.model.training
            rm.model.eval()
            try:
                with torch.inference_mode():
                    plain = [float(rm.forward(f.collate([e]))[0]) for e in encs]
                    packed = packed_rewards(rm.model, collate_for(rm, packs).to(rm.device)
                                            ).float().tolist()
            finally:
                rm.model.train(was_training)
            works = all(abs(a - b) <= PROBE_TOLERANCE * max(1.0, abs(a))
                        for a, b in zip(plain, packed))
    rm._prefix_sharing_works = works  # type: ignore[attr-defined]
    return works


def resolve_prefix_sharing(rm: RewardModel, setting: bool | None) -> bool:
    """``None``: on where :func:`prefix_sharing_works`; ``True``: required (an error where it
    does not work); ``False``: off."""
    if setting is False:
        return False
    if rm.pairwise:  # one row already holds the prompt and both answers
        if setting:
            raise ValueError("prefix sharing is for reward models that score one answer per "
                             "sequence; a pairwise model reads both answers in one")
        return False
    works = prefix_sharing_works(rm)
    if setting is True and not works:
        raise ValueError(f"prefix sharing does not work for this RM (formatting "
                         f"{rm.formatter.mode!r}, backbone {rm.meta.backbone}): packed and "
                         "plain rewards differ or the model reads both directions")
    return works


def collate_for(rm: RewardModel, packs: Sequence[Pack], pad_to_multiple: int = 1,
                ) -> PackedBatch:
    """:func:`collate_packs` with the RM's pad token."""
    pad = rm.tokenizer.pad_token_id
    return collate_packs(packs, int(pad) if pad is not None else 0, pad_to_multiple)
