"""Loss functions against values computed by hand."""

import math

import pytest
import torch

from gere_plugin.losses import (
    INACTIVE,
    NEG,
    POS,
    dynamic_weight,
    kl_loss,
    masked_feature_loss,
    tm_loss,
    token_ce,
)


def test_tm_hand_computed_violations_and_mean():
    # one sample, two tokens, H = 3; thresholds pos = 1, neg = -1 for every unit
    pos = torch.tensor([1.0, 1.0, 1.0])
    neg = torch.tensor([-1.0, -1.0, -1.0])
    h = torch.tensor([[[0.5, 2.0, -3.0], [-0.5, 0.0, 4.0]]])
    labels = torch.tensor([[[NEG, INACTIVE, POS], [POS, NEG, INACTIVE]]])
    mask = torch.tensor([[1, 1]])
    # token 0: NEG 0.5 -> relu(0.5+1)=1.5 ; INACTIVE 2.0 -> relu(2-1)=1 ; POS -3 -> relu(1+3)=4
    # token 1: POS -0.5 -> 1.5 ; NEG 0.0 -> 1.0 ; INACTIVE 4.0 -> 3.0
    total = 1.5 + 1 + 4 + 1.5 + 1 + 3
    out = tm_loss(h, labels, pos, neg, mask, "violations")
    assert out.loss.item() == pytest.approx(total / 6)
    assert out.out_of_state.item() == pytest.approx(1.0)
    out = tm_loss(h, labels, pos, neg, mask, "mean")
    assert out.loss.item() == pytest.approx(total / 6)


def test_tm_zero_inside_states_and_masks_padding():
    pos = torch.tensor([1.0, 2.0])
    neg = torch.tensor([-1.0, 0.0])
    h = torch.tensor([[[-2.0, 1.0], [5.0, 5.0]]])  # token 1 is padding and wildly off
    labels = torch.tensor([[[NEG, INACTIVE], [NEG, NEG]]])
    mask = torch.tensor([[1, 0]])
    out = tm_loss(h, labels, pos, neg, mask, "violations")
    assert out.loss.item() == 0.0
    assert out.out_of_state.item() == 0.0


def test_tm_partial_violations_reduction_differs():
    pos = torch.tensor([1.0, 1.0])
    neg = torch.tensor([-1.0, -1.0])
    h = torch.tensor([[[3.0, 0.0]]])
    labels = torch.tensor([[[INACTIVE, INACTIVE]]])
    mask = torch.ones(1, 1)
    assert tm_loss(h, labels, pos, neg, mask, "violations").loss.item() == pytest.approx(2.0)  # 2 / 1 violating
    assert tm_loss(h, labels, pos, neg, mask, "mean").loss.item() == pytest.approx(1.0)  # 2 / 2 elements
    assert tm_loss(h, labels, pos, neg, mask).out_of_state.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gere_tm_reduction"):
        tm_loss(h, labels, pos, neg, mask, "median")


def test_tm_gradient_pushes_back_into_state():
    pos = torch.tensor([1.0])
    neg = torch.tensor([-1.0])
    h = torch.tensor([[[3.0]]], requires_grad=True)
    tm_loss(h, torch.tensor([[[INACTIVE]]]), pos, neg, torch.ones(1, 1)).loss.backward()
    assert h.grad.item() == pytest.approx(1.0)  # descending lowers h towards pos


def test_feature_losses_hand_computed():
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    assert masked_feature_loss(h, b, mask, 1).loss.item() == pytest.approx((1 + 2) / 2)
    assert masked_feature_loss(h, b, mask, 2).loss.item() == pytest.approx((1 + 4) / 2)


def test_kl_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [5.0, 1.0]]])
    base = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p_base = (0.75, 0.25)
    mask = torch.tensor([[1, 0]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_loss(logits, base, mask).loss.item() == pytest.approx(expected, rel=1e-5)
    assert kl_loss(base, base, mask).loss.item() == pytest.approx(0.0, abs=1e-7)


def test_token_ce_masks_padding_and_shifts():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # predicts token 2 at position 1
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])
    s, n = token_ce(logits, ids, mask)
    assert n.item() == 1
    expected = -torch.log_softmax(logits[0, 0], -1)[2]
    assert s.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dynamic_weight_matches_primary_and_is_detached():
    ce = torch.tensor(2.0, requires_grad=True)
    reg = torch.tensor(0.5, requires_grad=True)
    w = dynamic_weight(ce, reg)
    assert not w.requires_grad
    assert (w * reg).item() == pytest.approx(2.0)


def test_weight_cap_bounds_only_the_dynamic_weight():
    from gere_plugin.losses import resolve_weight

    ce, small, large = torch.tensor(2.0), torch.tensor(1e-4), torch.tensor(0.5)
    assert resolve_weight(None, ce, small).item() == pytest.approx(2e4, rel=1e-4)  # the paper: unbounded
    assert resolve_weight(None, ce, small, cap=10.0).item() == pytest.approx(10.0)  # bounded
    assert resolve_weight(None, ce, large, cap=10.0).item() == pytest.approx(4.0)  # below the bound: CE / R
    assert resolve_weight(3.0, ce, small, cap=1.0).item() == pytest.approx(3.0)  # fixed weight ignores the cap


def test_unbounded_dynamic_weight_makes_the_tm_reduction_irrelevant_and_the_bound_does_not():
    """The paper's rule is one key away: with ``gere_weight_max=None`` the gradient of ``w * TM`` is
    ``CE * grad(S) / S`` whatever the reduction, so ``violations`` and ``mean`` train identically; with the
    default bound they differ (the bound acts on the mean-reduced value)."""
    from gere_plugin.losses import resolve_weight

    # early in training: every element is inactive at the base, and a few drift just past a threshold
    h0 = torch.zeros(2, 5, 7)
    h0[0, 1, 2], h0[0, 3, 5], h0[1, 0, 0] = 0.51, -0.52, 0.505
    labels = torch.full((2, 5, 7), INACTIVE)
    pos, neg = torch.full((7,), 0.5), torch.full((7,), -0.5)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    ce = torch.tensor(2.3)

    def grad(reduction, cap):
        h = h0.clone().requires_grad_(True)
        r = tm_loss(h, labels, pos, neg, mask, reduction).loss
        (resolve_weight(None, ce, r, cap) * r).backward()
        return h.grad

    torch.testing.assert_close(grad("violations", None), grad("mean", None), rtol=1e-4, atol=1e-6)  # up to the 1e-8 eps
    assert not torch.allclose(grad("violations", 100.0), grad("mean", 100.0))
    assert grad("mean", 100.0).abs().sum() < grad("mean", None).abs().sum()  # the bound binds here


def test_replay_ce_weight_matches_replay_ce_and_ignores_the_sign_of_the_task_loss():
    """The grpo family's weight: w = CE_replay / (R + 1e-8), detached, never negative, capped, or the fixed number."""
    from gere_plugin.losses import replay_ce_weight, resolve_weight

    ce = torch.tensor(3.0, requires_grad=True)
    reg = torch.tensor(0.5, requires_grad=True)
    w = replay_ce_weight(None, ce, reg)
    assert not w.requires_grad
    assert (w * reg).item() == pytest.approx(3.0)  # w * R matches the replay CE
    # a negative GRPO loss would make the SFT/DPO rule negative; this rule does not read it at all
    assert resolve_weight(None, torch.tensor(-0.2), reg).item() < 0
    assert w.item() == pytest.approx(6.0)
    assert replay_ce_weight(None, ce, reg, cap=4.0).item() == pytest.approx(4.0)
    assert replay_ce_weight(2.5, ce, reg, cap=1.0).item() == pytest.approx(2.5)  # fixed: as given
    assert replay_ce_weight(None, torch.tensor(0.0), reg).item() == 0.0
    # R exactly 0 (TM at the first step): a finite weight, and w * R stays 0
    w0 = replay_ce_weight(None, ce, torch.tensor(0.0))
    assert torch.isfinite(w0) and (w0 * 0.0).item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_replay_ce_weight_is_never_negative(seed):
    from gere_plugin.losses import replay_ce_weight

    g = torch.Generator().manual_seed(seed)
    ce = torch.randn(64, generator=g) * 5  # even malformed negative inputs cannot make it negative
    reg = torch.randn(64, generator=g).abs() * torch.rand(64, generator=g)
    for c, r in zip(ce, reg):
        assert replay_ce_weight(None, c, r).item() >= 0
        assert replay_ce_weight(None, c, -r).item() >= 0
