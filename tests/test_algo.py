"""Advantage estimators, policy losses and aggregations equal their formulas."""

import pytest
import torch

from occ_exp.algo.advantages import ADVANTAGES
from occ_exp.algo.policy_loss import POLICY_LOSSES, aggregate


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = ADVANTAGES["grpo"](r, 4, 1e-6)
    g = r[:4]
    assert torch.allclose(adv[:4], (g - g.mean()) / (g.std() + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal


def test_drgrpo_and_rloo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(ADVANTAGES["drgrpo"](r, 4), r - 0.25)
    assert torch.allclose(ADVANTAGES["rloo"](r, 4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    with pytest.raises(ValueError, match="groups of 3"):
        ADVANTAGES["grpo"](r, 3)


def test_clipped_loss_is_the_dapo_formula():
    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(3, 5, generator=g)
    logp = logp_old + 0.4 * torch.randn(3, 5, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, m = POLICY_LOSSES["clipped"](logp, logp_old, adv, mask, clip_low=0.2, clip_high=0.28)
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None]
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    assert torch.isclose(loss, per_tok[mask].mean())  # token-mean over all tokens of the batch
    assert 0 <= m["clipfrac"] <= 1


def test_clipped_gradient_vanishes_outside_the_clip_region():
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 > 1.28: clipped for A > 0
    loss, _ = POLICY_LOSSES["clipped"](logp, logp_old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


def test_gspo_uses_the_sequence_ratio():
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, _ = POLICY_LOSSES["gspo"](logp, logp_old, torch.tensor([1.0, 1.0]), mask, clip_low=0.5, clip_high=0.5)
    s = torch.exp(torch.tensor([0.1, 0.0]))  # exp(mean log-ratio) per sequence, inside the clip
    assert torch.isclose(loss, -s.mean())


@pytest.mark.parametrize("how", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregations(how):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    want = {"token_mean": 10 / 4, "seq_mean_token_mean": (2 + 4) / 2, "seq_mean_token_sum": (6 + 4) / 2}[how]
    assert float(aggregate(x, m, how)) == pytest.approx(want)
    if how == "token_mean":  # a global token count (micro-batches, ranks) replaces the local one
        assert float(aggregate(x, m, how, num_tokens=8)) == pytest.approx(10 / 8)


def test_dual_clip_is_verls_formula():
    """clip_ratio_c (verl's dual-clip): tokens with A < 0 take min(max(-A r, -A clip(r)), -A c); a
    ratio above c then gets no gradient. Off (null): the plain clipped loss."""
    logp_old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[4.0, 1.1, 0.5], [4.0, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, m = POLICY_LOSSES["clipped"](logp, logp_old, adv, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    r = torch.exp(logp.detach())
    a = adv[:, None]
    plain = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
    want = torch.where(a < 0, torch.minimum(plain, -a * 3.0), plain)
    assert torch.isclose(loss, want.mean())
    assert m["clipfrac_lower"] == pytest.approx(1 / 6)  # ratio 4 > 3 with A < 0
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0  # dual-clipped; clipped above for A > 0
    off, m_off = POLICY_LOSSES["clipped"](logp.detach(), logp_old, adv, mask)
    assert torch.isclose(off, plain.mean()) and "clipfrac_lower" not in m_off
