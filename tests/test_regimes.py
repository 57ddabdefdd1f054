"""Gradient routing of each regime, exactly."""

import pytest
import torch

from occ_exp.algo.regimes import REGIMES, MTPContext, get_regime, mtp_term
from occ_exp.algo.coefficient import CoefficientState
from tests.conftest import compose_cfg


def _batch(vocab, B=4, P=6, R=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[0, :2] = 0  # left padding on one prompt
    ids[0, :2] = 0
    resp_mask = torch.ones(B, R, dtype=torch.bool)
    resp_mask[1, 5:] = False  # a short response
    attn[1, P + 5 :] = 0
    return ids, attn, resp_mask


def _term(policy, regime_name, coef=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = compose_cfg([f"regime={regime_name}"])
    if "coef" in cfg.regime:
        cfg.regime.coef = coef
    regime = get_regime(regime_name)
    ids, attn, mask = _batch(policy.config.vocab_size, seed=seed)
    R = mask.shape[1]
    out = policy(ids, attn, R, detach_trunk=regime.detach_trunk, detach_head=regime.detach_head)
    logp_old = (out.logp_main.detach() + 0.05 * torch.randn_like(out.logp_main)).masked_fill(~mask, 0)
    adv = torch.randn(ids.shape[0])
    ctx = MTPContext(out, logp_old, adv, mask, cfg.regime, cfg.algorithm,
                     [CoefficientState() for _ in range(policy.num_mtp_layers)])
    return mtp_term(regime, ctx), out


def _grads(params):
    return [p.grad for p in params]


def _is_zero(g):
    return g is None or bool((g == 0).all())


def test_detach_isolates_trunk_and_head_exactly(tiny_policy):
    policy, _ = tiny_policy
    policy.zero_grad(set_to_none=True)
    term, _ = _term(policy, "detach")
    term.loss.backward()
    names = [n for n, _ in policy.trunk_named_parameters()]
    assert any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)
    for n, p in policy.trunk_named_parameters():
        assert _is_zero(p.grad), f"trunk parameter {n} received an MTP gradient under detach"
    mtp_grads = _grads(policy.mtp_parameters())
    assert all(g is not None for g in mtp_grads)
    assert sum(float(g.abs().sum()) for g in mtp_grads) > 0


@pytest.mark.parametrize("regime", ["ce", "policy"])
def test_joint_regimes_reach_trunk_and_head(tiny_policy, regime):
    policy, _ = tiny_policy
    policy.zero_grad(set_to_none=True)
    term, _ = _term(policy, regime)
    term.loss.backward()
    named = dict(policy.trunk_named_parameters())
    assert not _is_zero(named["lm_head.weight"].grad)
    assert not _is_zero(named["model.embed_tokens.weight"].grad)
    assert not _is_zero(named["model.layers.0.self_attn.q_proj.weight"].grad)
    assert any(not _is_zero(p.grad) for p in policy.mtp_parameters())


def test_occ_uses_estimated_coefficient(tiny_policy):
    policy, _ = tiny_policy
    term, out = _term(policy, "occ")
    assert len(term.coefs) == policy.num_mtp_layers
    # the applied coefficient is the estimator's value on this mini-batch
    from occ_exp.algo.coefficient import occ_coefficient

    torch.manual_seed(0)
    ids, attn, mask = _batch(policy.config.vocab_size)
    ref = _term(policy, "occ")[1]
    assert term.coefs[0] != 0.1
    for k, c in enumerate(term.coefs):
        assert c == c  # finite, not NaN


def test_fixed_coefficient_scales_the_term(tiny_policy):
    policy, _ = tiny_policy
    t1, _ = _term(policy, "policy", coef=0.1)
    t2, _ = _term(policy, "policy", coef=0.4)
    assert torch.isclose(t2.loss, 4 * t1.loss, rtol=1e-5)
    assert t1.coefs == [pytest.approx(0.1)] * policy.num_mtp_layers


def test_unknown_regime_is_clear():
    with pytest.raises(ValueError, match="choose one of"):
        get_regime("nope")


def test_registry_has_the_four_regimes():
    assert {"detach", "ce", "policy", "occ"} <= set(REGIMES)
