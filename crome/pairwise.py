"""Pairwise preference models (PairPM): one model reads the prompt and two answers and says
which is better, "A", "B" or "Same" (the Crome paper's PairPM, RRM/RLHFlow's ``pair-pm``).

A PairPM is a :class:`crome.model.RewardModel` made with ``ModelOptions(pairwise=True)``: the
same formatter, save/load, LoRA and trainer, with three outputs per comparison instead of one
reward per answer (see :meth:`crome.model.Formatter.encode_comparison` for the input and
:data:`crome.model.LABELS` for the outputs):

* **encoders** (the packaged MiniLM): a cross-encoder with a 3-way classification head;
* **decoders**: the model's next-token logits for the tokens of ``A``, ``B`` and ``Same``
  after the comparison template, trained with cross-entropy on those three (RRM's recipe).

Training (:func:`crome.train.train`, :func:`crome.losses.preference`) sees every pair in both
orders; Crome's causal pairs and the original pairs are preferences, its neutral pairs and
RRM's off-prompt pairs are the "Same" class.

Inference is free of position bias by construction: every comparison is run in both orders
and the probabilities averaged (:func:`preferences`). ``consistent`` says whether the two
orders, alone, named the same winner: a model's consistency is reported beside its accuracy.

A PairPM costs two forward passes of prompt + both answers per comparison, where a BT RM
costs one pass of prompt + answer per answer; best-of-N needs N − 1 comparisons (knockout) or
N(N − 1)/2 (round-robin) where a BT RM scores N answers (``crome.evaluate.bon``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from crome.data.schema import Prompt
from crome.evaluate.reference import Preference
from crome.losses import FIRST, SAME, SECOND
from crome.model import Encoded, RewardModel, TruncationCounts
from crome.score import ScoreOptions, ScoreStats, score_encoded


def encode_both_orders(rm: RewardModel, prompts: Sequence[Prompt], firsts: Sequence[str],
                       seconds: Sequence[str], counts: TruncationCounts | None = None,
                       ) -> list[Encoded]:
    """(prompt, first, second) for every comparison, then (prompt, second, first)."""
    if not (len(prompts) == len(firsts) == len(seconds)):
        raise ValueError(f"{len(prompts)} prompts, {len(firsts)} first and {len(seconds)} "
                         "second answers")
    f = rm.formatter
    out = ([f.encode_comparison(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
           + [f.encode_comparison(p, b, a) for p, a, b in zip(prompts, firsts, seconds)])
    if counts is not None:
        for enc in out:
            counts.add(enc)
    return out


def _winner(probs: torch.Tensor, swapped: bool) -> int:
    """The verdict of one order as FIRST / SECOND / SAME of the comparison as asked."""
    k = int(probs.argmax())
    if swapped and k != SAME:
        return SECOND if k == FIRST else FIRST
    return k


def preferences(logits_ab: Sequence[Sequence[float]], logits_ba: Sequence[Sequence[float]],
                ) -> list[Preference]:
    """Verdicts from the logits of both orders: ``P(first ≻ second)`` is the mean of
    P("A") with first as A and P("B") with first as B, and so on."""
    ab = torch.softmax(torch.tensor(logits_ab, dtype=torch.float64).reshape(-1, 3), dim=-1)
    ba = torch.softmax(torch.tensor(logits_ba, dtype=torch.float64).reshape(-1, 3), dim=-1)
    out = []
    for x, y in zip(ab, ba, strict=True):
        out.append(Preference(first=float(x[FIRST] + y[SECOND]) / 2,
                              second=float(x[SECOND] + y[FIRST]) / 2,
                              tie=float(x[SAME] + y[SAME]) / 2,
                              consistent=_winner(x, False) == _winner(y, True)))
    return out


def compare_texts(rm: RewardModel, prompts: Sequence[Prompt], firsts: Sequence[str],
                  seconds: Sequence[str], options: ScoreOptions | None = None,
                  stats: ScoreStats | None = None,
                  on_batch: Callable[[int], None] | None = None) -> list[Preference]:
    """A pairwise model's verdicts, both orders averaged, in input order. Batching is that of
    :func:`crome.score.score_encoded` (length buckets, batch-size independent results)."""
    if not rm.pairwise:
        raise ValueError("compare_texts needs a pairwise model (ModelOptions(pairwise=True)); "
                         "a BT reward model scores answers one at a time: crome.score")
    counts = stats.truncation if stats is not None else None
    encs = encode_both_orders(rm, prompts, firsts, seconds, counts)
    rows = score_encoded(rm, encs, options, stats, on_batch)
    n = len(prompts)
    return preferences(rows[:n], rows[n:])


class PairwiseScorer:
    """A PairPM behind the :class:`crome.evaluate.reference.Comparer` protocol; counts the
    comparisons it ran (each is two forward rows, one per order)."""

    def __init__(self, rm: RewardModel, options: ScoreOptions | None = None,
                 name: str = "pairwise-model") -> None:
        if not rm.pairwise:
            raise ValueError("PairwiseScorer needs a pairwise model; use RewardModelScorer")
        self.rm = rm
        self.options = options or ScoreOptions()
        self.name = name
        self.stats = ScoreStats()
        self.comparisons = 0
        self.seconds = 0.0

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str],
                seconds: Sequence[str]) -> list[Preference]:
        start = time.perf_counter()
        prefs = compare_texts(self.rm, prompts, firsts, seconds, self.options, self.stats)
        self.seconds += time.perf_counter() - start
        self.comparisons += len(prefs)
        return prefs
