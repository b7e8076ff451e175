"""Reward-model losses: Bradley–Terry (optionally with a margin), the tie loss of Crome's
neutral pairs, reward centering, and the cross-entropy of a pairwise preference model.

All functions take rewards of the first and second answer of each pair and return a *sum*
over pairs; the trainer divides by the number of pairs in the global batch, so that a batch
split over processes or accumulation steps weighs every pair the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``Σ −log σ(r_w − r_l − m)``: the chosen answer should win by at least ``m``."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).sum()


def tie(r_first: torch.Tensor, r_second: torch.Tensor) -> torch.Tensor:
    """``Σ −½[log σ(r₁ − r₂) + log σ(r₂ − r₁)]``: minimal (= log 2 per pair) at equal rewards.

    It is symmetric in the two answers and its gradient pushes the rewards together, which
    is how neutral pairs teach invariance to what differs between their answers.
    """
    d = r_first - r_second
    return (-0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))).sum()


def centering(rewards: torch.Tensor) -> torch.Tensor:
    """``Σ r²`` over all rewards: keeps rewards near zero (TRL's ``center_rewards_coefficient``,
    from Eisenstein et al. 2023), which a pairwise loss alone leaves free."""
    return (rewards ** 2).sum()


def pair_loss(r_first: torch.Tensor, r_second: torch.Tensor, is_tie: torch.Tensor, *,
              tie_weight: float = 1.0, margin: float = 0.0,
              center_coef: float = 0.0) -> torch.Tensor:
    """Crome's objective over a mixed batch, as a sum over its pairs.

    ``L = Σ_pref BT + λ Σ_tie tie + c Σ (r₁² + r₂²)/2``; ``is_tie`` marks neutral pairs.
    """
    pref = ~is_tie
    loss = r_first.new_zeros(())
    if pref.any():
        loss = loss + bradley_terry(r_first[pref], r_second[pref], margin)
    if is_tie.any():
        loss = loss + tie_weight * tie(r_first[is_tie], r_second[is_tie])
    if center_coef:
        loss = loss + center_coef * 0.5 * centering(torch.cat([r_first, r_second]))
    return loss


# Class indices of a pairwise model's outputs (crome.model.LABELS: "A", "B", "Same").
FIRST, SECOND, SAME = 0, 1, 2


def preference(logits_first: torch.Tensor, logits_second: torch.Tensor, is_tie: torch.Tensor,
               *, tie_weight: float = 1.0) -> torch.Tensor:
    """A pairwise model's loss over a mixed batch, as a sum over its pairs.

    Each pair is read in both orders: ``logits_first`` with the chosen answer as A (target
    A), ``logits_second`` with it as B (target B); a tie (neutral pair) targets "Same" in
    both. A pair's loss is the mean of its two cross-entropies, so it weighs one as a BT pair
    does, and ties are weighted by ``tie_weight`` (the λ of :func:`pair_loss`).
    """
    target_first = torch.where(is_tie, SAME, FIRST)
    target_second = torch.where(is_tie, SAME, SECOND)
    ce = 0.5 * (F.cross_entropy(logits_first, target_first, reduction="none")
                + F.cross_entropy(logits_second, target_second, reduction="none"))
    weights = torch.where(is_tie, tie_weight, 1.0).to(ce.dtype)
    return (weights * ce).sum()
