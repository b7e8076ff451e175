"""Batch scoring with a reward model: fast, in input order, and independent of batch size.

Speed comes from sorting by length: sequences of similar length share a batch, so little
compute is spent on padding. Batch-size independence is by construction, because a CPU matrix
multiply can give a row a result that depends on the shape of the batch it sits in (we
measured differences of ~2e-8 between batch sizes 1, 7 and 32 with plain padding, and up to
3.4e-8 between 8-row and 64-row blocks of the real MiniLM on an Intel Xeon). So:

* each sequence is padded to a multiple of ``PAD_MULTIPLE`` tokens that depends on its own
  length only, and batches hold sequences of one such length bucket;
* a row's result must not depend on how many rows share its forward pass. crome sets MKL's
  strict reproducible mode (``MKL_CBWR=AUTO,STRICT``, in ``crome/__init__.py``) and
  :func:`rows_independent` checks, once per process, that matrix products of this machine
  give every row the same bits whatever rows share them. Where they do, a forward pass
  holds exactly the rows it has; where they do not (another BLAS, a GPU, MKL set up before
  crome was imported), every forward pass runs on whole ``BLOCK_ROWS``-row blocks, a short
  chunk filled with copies of its first row (results thrown away), which held on the
  machines we measured for 8 rows and up except that Xeon.

Decoders that pass ``crome.packing``'s probe score the answers to one prompt in one row
(``ScoreOptions.prefix_sharing``): rows are then packs, bucketed and padded the same way, and
a chunk holds at most ``batch_size`` answers. Packs depend on which answers share a prompt in
the call, never on the batch size.

``tests/test_score.py`` checks bit-identical rewards for batch sizes 1 to 64 on every run,
and on the real MiniLM for random chunks of a batch.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crome.data.io import ReadReport, read_pairs
from crome.data.schema import PairRecord, Prompt
from crome.model import Batch, Encoded, RewardModel, TruncationCounts
from crome.packing import (
    Pack,
    PackedBatch,
    build_packs,
    chunk_packs,
    collate_for,
    packed_rewards,
    resolve_prefix_sharing,
)

BLOCK_ROWS = 8
PAD_MULTIPLE = 16


@dataclass
class ScoreOptions:
    batch_size: int = 64  # answers per forward pass
    bf16: bool = False  # fp32 by default: scores are a measurement, keep them exact
    # Decoders: answers to the same prompt share one encoding of it (crome.packing); None:
    # wherever the model passes the packing probe, True: required, False: one row per answer
    prefix_sharing: bool | None = None
    # tokens per packed row: attention over a row costs L^2 (dense mask), so a long row loses
    # what sharing saves (benchmarks/bestofn_scoring.py, best-of-16 on the 0.5B decoder:
    # hh-rlhf 2.85 / 3.28x, GSM8K 1.20 / 1.33 / 0.96x at 1024 / 1536 / 4096 tokens)
    max_pack_tokens: int = 1536


@dataclass
class ScoreStats:
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    shared_tokens: int = 0  # prompt tokens not run again, thanks to prefix sharing
    seconds: float = 0.0
    truncation: TruncationCounts = field(default_factory=TruncationCounts)

    @property
    def non_padding_fraction(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


@dataclass(frozen=True)
class Bf16Speed:
    """A bf16-autocast matmul timed against the same matmul in fp32, on this machine."""

    fp32_seconds: float
    bf16_seconds: float

    @property
    def ratio(self) -> float:
        """bf16 time / fp32 time: < 1 faster, ~20 where bf16 is emulated."""
        return self.bf16_seconds / self.fp32_seconds if self.fp32_seconds > 0 else float("inf")

    @property
    def native(self) -> bool:
        return self.ratio <= BF16_NATIVE_MAX_RATIO


BF16_NATIVE_MAX_RATIO = 1.5


@functools.cache
def bf16_speed(n: int = 512, repeats: int = 5) -> Bf16Speed:
    """Time it rather than read CPU flags: flags can list what the VM does not deliver, and
    the question is whether bf16 *pays off* (about a tenth of a second where it does)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)

    def best(enabled: bool) -> float:
        times = []
        with torch.inference_mode(), autocast(enabled):
            for _ in range(repeats + 1):  # the first call pays for kernel selection
                t0 = time.perf_counter()
                (a @ b).sum().item()
                times.append(time.perf_counter() - t0)
        return min(times[1:])

    return Bf16Speed(fp32_seconds=best(False), bf16_seconds=best(True))


def bf16_supported() -> bool:
    """Whether bf16 autocast pays off here: a CUDA device with bf16, or a CPU where a timed
    bf16 matmul takes at most 1.5x the fp32 time (:func:`bf16_speed`). Where PyTorch emulates bf16 we
    measured training 20x *slower* than fp32 (AVX2-only EPYC), so ``auto`` means fp32 there."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bf16_speed().native


def resolve_bf16(setting: bool | None) -> bool:
    """``None`` means auto (see :func:`bf16_supported`)."""
    return bf16_supported() if setting is None else setting


def autocast(enabled: bool, device_type: str = "cpu"):  # type: ignore[no-untyped-def]
    """bf16 autocast on ``device_type`` (a no-op context when disabled)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


# Shapes (inner, outer) of the probe's matrix products: a small encoder's attention and
# feed-forward layers, and a wider one.
_PROBE_SHAPES = ((384, 384), (384, 1536), (1536, 384), (1024, 1024))
# (first row, rows) taken out of the probe's 1,024-row product and computed on their own
_PROBE_SLICES = ((0, 1), (3, 1), (0, 3), (5, 8), (16, 16), (100, 37), (0, 512), (200, 824))


@functools.cache
def rows_independent(bf16: bool = False, device_type: str = "cpu") -> bool:
    """Whether this machine's matrix products give a row the same bits whatever other rows
    share the product (checked on random data, once per process and setting)."""
    if device_type != "cpu":
        return False  # GPU libraries choose kernels by shape: keep the blocks
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), autocast(bf16):
        for k, n in _PROBE_SHAPES:
            x = torch.randn(1024, k, generator=gen)
            w = torch.randn(n, k, generator=gen)
            full = torch.nn.functional.linear(x, w)
            for start, rows in _PROBE_SLICES:
                part = torch.nn.functional.linear(x[start:start + rows], w)
                if not torch.equal(part, full[start:start + rows]):
                    return False
    return True


def row_block(bf16: bool = False, device_type: str = "cpu") -> int:
    """Rows a forward pass is padded to a multiple of: 1 where rows are independent."""
    return 1 if rows_independent(bf16, device_type) else BLOCK_ROWS


def _plain_chunks(rm: RewardModel, encs: Sequence[Encoded], rows: int, block: int,
                  ) -> Iterator[tuple[list[int], Batch, int, int]]:
    """(sequence indices, batch, real tokens, shared tokens) of length-bucketed chunks."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(encs):
        buckets[-(-len(e) // PAD_MULTIPLE)].append(i)
    for key in sorted(buckets):
        idxs = buckets[key]
        for s in range(0, len(idxs), rows):
            chunk = idxs[s:s + rows]
            seqs = [encs[i] for i in chunk]
            seqs += [seqs[0]] * (-len(seqs) % block)
            yield chunk, rm.formatter.collate(seqs, PAD_MULTIPLE), \
                sum(len(encs[i]) for i in chunk), 0


def _packed_chunks(rm: RewardModel, encs: Sequence[Encoded], answers: int, block: int,
                   max_tokens: int) -> Iterator[tuple[list[int], PackedBatch, int, int]]:
    """The same for prefix-shared packs: a chunk holds packs of one length bucket and at
    most ``answers`` answers (at least one pack)."""
    buckets: dict[int, list[Pack]] = defaultdict(list)
    for p in build_packs(encs, max_tokens):
        buckets[-(-p.length // PAD_MULTIPLE)].append(p)
    for key in sorted(buckets):
        for chunk in chunk_packs(buckets[key], answers):
            rows = chunk + [chunk[0]] * (-len(chunk) % block)
            yield ([i for c in chunk for i in c.members],
                   collate_for(rm, rows, PAD_MULTIPLE),
                   sum(c.length for c in chunk),
                   sum(c.unshared_length - c.length for c in chunk))


def score_encoded(rm: RewardModel, encs: Sequence[Encoded], options: ScoreOptions | None = None,
                  stats: ScoreStats | None = None,
                  on_batch: Callable[[int], None] | None = None) -> list[Any]:
    """Rewards for already-encoded sequences, in their order (a pairwise model: the list of
    its three logits per sequence)."""
    opts = options or ScoreOptions()
    block = row_block(opts.bf16, rm.device.type)
    bs = max(block, -(-opts.batch_size // block) * block)
    sharing = bool(encs) and resolve_prefix_sharing(rm, opts.prefix_sharing)
    out: list[Any] = [0.0] * len(encs)
    was_training = rm.model.training
    rm.model.eval()
    start = time.perf_counter()
    chunks = (_packed_chunks(rm, encs, bs, block, opts.max_pack_tokens) if sharing
              else _plain_chunks(rm, encs, bs, block))
    try:
        with torch.inference_mode(), autocast(opts.bf16, rm.device.type):
            for chunk, batch, real, shared in chunks:
                if isinstance(batch, PackedBatch):
                    rewards = packed_rewards(rm.model, batch.to(rm.device))
                else:
                    rewards = rm.forward(batch)
                for i, r in zip(chunk, rewards.float().tolist()):
                    out[i] = r
                if stats is not None:
                    stats.real_tokens += real
                    stats.shared_tokens += shared
                    stats.padded_tokens += int(batch.input_ids.numel())
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        rm.model.train(was_training)
    if stats is not None:
        stats.sequences += len(encs)
        stats.seconds += time.perf_counter() - start
    return out


def score_texts(rm: RewardModel, prompts: Sequence[Prompt], answers: Sequence[str],
                options: ScoreOptions | None = None, stats: ScoreStats | None = None,
                on_batch: Callable[[int], None] | None = None) -> list[float]:
    if rm.pairwise:
        raise ValueError("a pairwise model gives no reward to one answer: compare two with "
                         "crome.pairwise.compare_texts")
    counts = stats.truncation if stats is not None else None
    encs = rm.formatter.encode_many(list(prompts), list(answers), counts)
    return score_encoded(rm, encs, options, stats, on_batch)


def score_pairs(rm: RewardModel, records: Sequence[PairRecord],
                options: ScoreOptions | None = None, stats: ScoreStats | None = None,
                on_batch: Callable[[int], None] | None = None,
                ) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and the rejected answer of every record (one scoring pass); for
    a pairwise model, ``P(chosen ≻ rejected)`` and ``P(rejected ≻ chosen)``, both orders
    averaged (:func:`crome.pairwise.compare_texts`)."""
    prompts = [r.prompt for r in records]
    if rm.pairwise:
        from crome.pairwise import compare_texts

        prefs = compare_texts(rm, prompts, [r.chosen for r in records],
                              [r.rejected for r in records], options, stats, on_batch)
        return [p.first for p in prefs], [p.second for p in prefs]
    answers = [r.chosen for r in records] + [r.rejected for r in records]
    scores = score_texts(rm, prompts + prompts, answers, options, stats, on_batch)
    n = len(records)
    return scores[:n], scores[n:]


class RewardModelScorer:
    """A trained RM behind the same ``Scorer`` protocol as the reference scorers."""

    def __init__(self, rm: RewardModel, options: ScoreOptions | None = None,
                 name: str = "reward-model") -> None:
        if rm.pairwise:
            raise ValueError("a pairwise model gives no reward to one answer: use "
                             "crome.pairwise.PairwiseScorer (or model_scorer)")
        self.rm = rm
        self.options = options or ScoreOptions()
        self.name = name
        self.stats = ScoreStats()

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        return score_texts(self.rm, prompts, answers, self.options, self.stats)


def model_scorer(rm: RewardModel, options: ScoreOptions | None = None,
                 name: str = "reward-model") -> Any:
    """The scorer of a loaded model: a :class:`RewardModelScorer` for a BT RM, a
    :class:`crome.pairwise.PairwiseScorer` (a ``Comparer``) for a pairwise one."""
    if rm.pairwise:
        from crome.pairwise import PairwiseScorer

        return PairwiseScorer(rm, options, name)
    return RewardModelScorer(rm, options, name)


def write_scores(records: Sequence[PairRecord], chosen: Sequence[float],
                 rejected: Sequence[float], path: str | os.PathLike[str]) -> Path:
    """One row per record, in input order: id, reward_chosen, reward_rejected, margin."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [
        {"id": r.id, "subset": r.subset, "label": r.label, "reward_chosen": c,
         "reward_rejected": j, "margin": c - j}
        for r, c, j in zip(records, chosen, rejected, strict=True)]
    if p.suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
    else:
        with open(p, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return p


def score_file(model_dir: str | os.PathLike[str], input_path: str | os.PathLike[str],
               output_path: str | os.PathLike[str], options: ScoreOptions | None = None,
               skip_invalid: bool = False) -> tuple[ScoreStats, ReadReport]:
    """``crome score``: read pairs, score both answers, write rewards in input order."""
    report = ReadReport()
    records = read_pairs(input_path, skip_invalid=skip_invalid, report=report)
    rm = RewardModel.load(model_dir)
    stats = ScoreStats()
    chosen, rejected = score_pairs(rm, records, options, stats)
    write_scores(records, chosen, rejected, output_path)
    return stats, report
