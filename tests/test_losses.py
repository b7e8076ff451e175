"""Losses checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from crome.losses import bradley_terry, centering, pair_loss, tie


def nlog_sigmoid(x: float) -> float:
    """-log σ(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_bradley_terry_by_hand():
    rc, rr = t(1.0, 0.0, -2.0, 3.5), t(0.0, 0.0, 1.0, -0.5)
    expected = nlog_sigmoid(1.0) + math.log(2) + nlog_sigmoid(-3.0) + nlog_sigmoid(4.0)
    assert bradley_terry(rc, rr).item() == pytest.approx(expected, rel=1e-12)
    # a sum over pairs, not a mean
    assert bradley_terry(rc[:1], rr[:1]).item() == pytest.approx(nlog_sigmoid(1.0), rel=1e-12)


def test_bradley_terry_gradient_favours_the_chosen_answer():
    rc, rr = t(0.3, grad=True), t(0.1, grad=True)
    bradley_terry(rc, rr).backward()
    # d/dr_w −log σ(r_w − r_l) = −σ(r_l − r_w)
    g = 1 / (1 + math.exp(0.2))
    assert rc.grad.item() == pytest.approx(-g, rel=1e-12)
    assert rr.grad.item() == pytest.approx(g, rel=1e-12)


def test_bradley_terry_is_shift_invariant():
    rc, rr = t(1.0, -1.0), t(0.5, 2.0)
    assert bradley_terry(rc + 7, rr + 7).item() == pytest.approx(bradley_terry(rc, rr).item())


def test_margin_shifts_the_difference():
    rc, rr = t(1.0, 0.0), t(0.0, 0.5)
    m = 0.75
    expected = nlog_sigmoid(1.0 - m) + nlog_sigmoid(-0.5 - m)
    assert bradley_terry(rc, rr, m).item() == pytest.approx(expected, rel=1e-12)
    assert bradley_terry(rc, rr, m).item() == pytest.approx(
        bradley_terry(rc - m, rr).item(), rel=1e-12)
    assert bradley_terry(rc, rr, m) > bradley_terry(rc, rr)
    # a margin per pair (a tensor) applies pair by pair
    per_pair = t(0.75, 0.0)
    expected = nlog_sigmoid(1.0 - 0.75) + nlog_sigmoid(-0.5)
    assert bradley_terry(rc, rr, per_pair).item() == pytest.approx(expected, rel=1e-12)


def test_tie_value_by_hand_and_minimum_log2_at_equal_rewards():
    equal = t(0.0, 3.0, -1.25)
    assert tie(equal, equal.clone()).item() == pytest.approx(3 * math.log(2), rel=1e-12)
    d = 1.5
    expected = 0.5 * (nlog_sigmoid(d) + nlog_sigmoid(-d))
    assert tie(t(d), t(0.0)).item() == pytest.approx(expected, rel=1e-12)
    assert expected > math.log(2)


def test_tie_grows_with_the_gap_and_is_symmetric():
    gaps = [0.0, 0.1, 0.5, 1.0, 3.0, 10.0]
    values = [tie(t(g), t(0.0)).item() for g in gaps]
    assert values == sorted(values) and len(set(values)) == len(values)
    a, b = t(0.3, -2.0, 5.0), t(1.7, 0.4, -5.0)
    assert tie(a, b).item() == pytest.approx(tie(b, a).item(), rel=1e-15)
    assert tie(a, b).item() == pytest.approx(tie(-a, -b).item(), rel=1e-15)


def test_tie_gradient_is_zero_at_equal_rewards_and_pulls_them_together_elsewhere():
    a, b = t(0.7, -3.0, grad=True), t(0.7, -3.0, grad=True)
    tie(a, b).backward()
    assert torch.all(a.grad.abs() < 1e-12) and torch.all(b.grad.abs() < 1e-12)

    grads = []
    for gap in (0.5, 2.0):
        a, b = t(gap, grad=True), t(0.0, grad=True)
        tie(a, b).backward()
        # gradient descent lowers the higher reward and raises the lower one
        assert a.grad.item() > 0 and b.grad.item() < 0
        assert a.grad.item() == pytest.approx(-b.grad.item())
        # d/dr1 = ½(σ(d) − σ(−d)) = ½ tanh(d/2)
        assert a.grad.item() == pytest.approx(0.5 * math.tanh(gap / 2), rel=1e-12)
        grads.append(a.grad.item())
    assert grads[1] > grads[0]


def test_pair_loss_mixes_preferences_and_ties():
    r1, r2 = t(1.0, 0.2, -0.5, 2.0), t(0.0, 0.9, -0.5, 1.0)
    is_tie = torch.tensor([False, True, True, False])
    lam, m = 0.5, 0.25
    expected = (nlog_sigmoid(1.0 - m) + nlog_sigmoid(1.0 - m)            # preferences 0, 3
                + lam * (0.5 * (nlog_sigmoid(-0.7) + nlog_sigmoid(0.7))  # tie 1
                         + math.log(2)))                                  # tie 2 (equal)
    got = pair_loss(r1, r2, is_tie, tie_weight=lam, margin=m)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # the parts
    assert got.item() == pytest.approx(
        bradley_terry(r1[~is_tie], r2[~is_tie], m).item()
        + lam * tie(r1[is_tie], r2[is_tie]).item(), rel=1e-12)


def test_pair_loss_all_preferences_all_ties_and_the_margin_leaves_ties_alone():
    r1, r2 = t(1.0, -1.0), t(0.5, 0.0)
    none = torch.zeros(2, dtype=torch.bool)
    every = torch.ones(2, dtype=torch.bool)
    assert pair_loss(r1, r2, none).item() == pytest.approx(bradley_terry(r1, r2).item())
    assert pair_loss(r1, r2, every).item() == pytest.approx(tie(r1, r2).item())
    assert pair_loss(r1, r2, every, margin=3.0).item() == pytest.approx(tie(r1, r2).item())
    assert pair_loss(r1, r2, every, tie_weight=0.0).item() == 0.0


def test_pair_loss_backpropagates_through_both_parts():
    r1, r2 = t(1.0, 0.5, grad=True), t(0.0, -0.5, grad=True)
    pair_loss(r1, r2, torch.tensor([False, True])).backward()
    assert r1.grad[0] < 0 < r2.grad[0]   # preference: push the chosen up
    assert r1.grad[1] > 0 > r2.grad[1]   # tie: pull the pair together


def test_centering_by_hand_and_in_pair_loss():
    r = t(1.0, -2.0, 0.5)
    assert centering(r).item() == pytest.approx(1 + 4 + 0.25)
    r1, r2 = t(1.0, 3.0), t(0.0, -1.0)
    none = torch.zeros(2, dtype=torch.bool)
    c = 0.1
    expected = bradley_terry(r1, r2).item() + c * 0.5 * (1 + 9 + 0 + 1)
    assert pair_loss(r1, r2, none, center_coef=c).item() == pytest.approx(expected, rel=1e-12)


def test_centering_breaks_the_shift_invariance_towards_zero():
    r1, r2 = t(1.0, 3.0), t(0.0, -1.0)
    none = torch.zeros(2, dtype=torch.bool)
    losses = {s: pair_loss(r1 + s, r2 + s, none, center_coef=0.1).item()
              for s in (-3.0, -0.75, 0.0, 2.0)}
    # mean reward is 0.75: the shift that centres the rewards gives the smallest loss
    assert min(losses, key=losses.get) == -0.75
    assert pair_loss(r1, r2, none).item() == pytest.approx(pair_loss(r1 + 5, r2 + 5, none).item())
