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


def _ctx(policy, regime_name, overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = compose_cfg([f"regime={regime_name}", *overrides])
    regime = get_regime(regime_name)
    ids, attn, mask = _batch(policy.config.vocab_size, seed=seed)
    out = policy(ids, attn, mask.shape[1], detach_trunk=regime.detach_trunk, detach_head=regime.detach_head)
    logp_old = (out.logp_main.detach() + 0.05 * torch.randn_like(out.logp_main)).masked_fill(~mask, 0)
    ctx = MTPContext(out, logp_old, torch.randn(ids.shape[0]), mask, cfg.regime, cfg.algorithm,
                     [CoefficientState() for _ in range(policy.num_mtp_layers)])
    return regime, ctx


def test_occ_applies_exactly_occ_coefficient_of_the_same_mini_batch(tiny_policy):
    """Value equality: lambda_k is occ_coefficient(logp_main, logp_mtp[k], logp_old, mask) of THIS
    mini-batch (a wrong sign, swapped inputs or another batch's log-probs fail), and the term is
    (1/K) sum_k lambda_k * L_k with L_k the MTP head's policy loss."""
    from occ_exp.algo.coefficient import occ_coefficient
    from occ_exp.algo.policy_loss import POLICY_LOSSES, loss_options

    policy, _ = tiny_policy
    regime, ctx = _ctx(policy, "occ", ["regime.lambda_plus=0.7"])
    term = mtp_term(regime, ctx)
    out, a = ctx.out, ctx.algo_cfg
    K = policy.num_mtp_layers
    want_loss = 0.0
    for k in range(K):
        want = occ_coefficient(out.logp_main, out.logp_mtp[k], ctx.logp_old, ctx.mask, 0.7, 1e-8)
        assert term.coefs[k] == float(want) and float(want) != 0.0
        swapped = occ_coefficient(out.logp_mtp[k], out.logp_main, ctx.logp_old, ctx.mask, 0.7, 1e-8)
        assert float(swapped) != term.coefs[k]  # the inputs' order matters: the test would see a swap
        lk, _ = POLICY_LOSSES[a.policy_loss](out.logp_mtp[k], ctx.logp_old, ctx.advantages, ctx.mask, **loss_options(a))
        want_loss = want_loss + want * lk
    assert torch.allclose(term.loss, want_loss / K, rtol=1e-6, atol=0)


def test_mtp_ratio_uses_the_main_heads_logp_old(tiny_policy):
    """The MTP head's ratio is exp(logp_mtp - logp_old) with the MAIN head's logp_old (as the paper
    and the reference code): the term must differ from one built on the MTP head's own old log-prob
    (ratio 1 everywhere), and its gradient must vanish where the ratio against logp_old is clipped."""
    from occ_exp.algo.policy_loss import POLICY_LOSSES, loss_options

    policy, _ = tiny_policy
    regime, ctx = _ctx(policy, "policy")
    term = mtp_term(regime, ctx)
    a, lp = ctx.algo_cfg, ctx.out.logp_mtp[0]
    fn = POLICY_LOSSES[a.policy_loss]
    main_old, _ = fn(lp, ctx.logp_old, ctx.advantages, ctx.mask, **loss_options(a))
    own_old, _ = fn(lp, lp.detach(), ctx.advantages, ctx.mask, **loss_options(a))
    K = policy.num_mtp_layers
    assert torch.allclose(term.losses[0], main_old) and not torch.allclose(term.losses[0], own_old)
    # exactly the tokens whose ratio against the main head's logp_old is clipped get no gradient
    # (against its own old log-prob every ratio is 1 and every token would get one)
    (g,) = torch.autograd.grad(term.losses[0], lp, retain_graph=True)
    ratio = torch.exp(lp.detach() - ctx.logp_old)
    A = ctx.advantages[:, None].expand_as(ratio)
    clipped = ((A > 0) & (ratio > 1 + a.clip_high)) | ((A < 0) & (ratio < 1 - a.clip_low))
    assert bool((clipped & ctx.mask).any())
    assert bool((g[clipped & ctx.mask] == 0).all()) and bool((g[~clipped & ctx.mask] != 0).all())
    assert K == len(term.losses)


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


def test_registry_has_the_extra_baselines():
    assert {"detach_ref", "frozen", "soft_ce"} <= set(REGIMES)
    assert not get_regime("frozen").train_heads


def test_detach_ref_reaches_the_lm_head_only(tiny_policy):
    policy, _ = tiny_policy
    assert not policy.config.tie_word_embeddings
    policy.zero_grad(set_to_none=True)
    term, _ = _term(policy, "detach_ref")
    term.loss.backward()
    for n, p in policy.trunk_named_parameters():
        if n == "lm_head.weight":
            assert not _is_zero(p.grad), "the reference detach lets the MTP CE reach the LM head"
        else:
            assert _is_zero(p.grad), f"{n} received an MTP gradient under detach_ref"


def test_frozen_applies_no_mtp_term(tiny_policy):
    policy, _ = tiny_policy
    term, _ = _term(policy, "frozen")
    assert term.coefs == [0.0] * policy.num_mtp_layers
    assert term.loss.item() == 0.0 and all(l.item() > 0 for l in term.losses)  # CE still measured


def test_soft_ce_is_distillation_on_the_main_head(tiny_policy):
    policy, _ = tiny_policy
    policy.zero_grad(set_to_none=True)
    term, out = _term(policy, "soft_ce", coef=1.0)
    ids, attn, mask = _batch(policy.config.vocab_size)
    p = out.logits_main.detach().softmax(-1)
    for k, lk in enumerate(term.losses):
        per_tok = -(p * out.logits_mtp[k].log_softmax(-1)).sum(-1)
        assert torch.isclose(lk, per_tok[mask].mean(), rtol=1e-5)
    term.loss.backward()
    assert all(_is_zero(p.grad) for p in policy.trunk_parameters())
    assert any(not _is_zero(p.grad) for p in policy.mtp_parameters())


def test_head_ce_trains_only_the_heads(tiny_policy):
    """regime.head_ce adds the detach regime's CE: same trunk gradient, more head gradient."""
    policy, _ = tiny_policy

    def grads(head_ce):
        policy.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        cfg = compose_cfg(["regime=policy", f"regime.head_ce={head_ce}"])
        ids, attn, mask = _batch(policy.config.vocab_size)
        out = policy(ids, attn, mask.shape[1])
        logp_old = (out.logp_main.detach() + 0.05 * torch.randn_like(out.logp_main)).masked_fill(~mask, 0)
        ctx = MTPContext(out, logp_old, torch.randn(ids.shape[0]), mask, cfg.regime, cfg.algorithm,
                         [CoefficientState() for _ in range(policy.num_mtp_layers)], policy=policy)
        term = mtp_term(get_regime("policy"), ctx)
        term.loss.backward()
        g = lambda ps: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps]  # noqa: E731
        return term, out, g(policy.trunk_parameters()), g(policy.mtp_parameters())

    t0, _, trunk0, heads0 = grads(0.0)
    t1, out1, trunk1, heads1 = grads(0.5)
    assert t0.extra is None and t1.extra is not None
    mask = _batch(policy.config.vocab_size)[2]
    ce = sum(-lp.detach()[mask].mean() for lp in out1.logp_mtp) / policy.num_mtp_layers
    assert torch.isclose(t1.extra, 0.5 * ce, rtol=1e-5)
    assert torch.isclose(t1.loss - t0.loss, t1.extra, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(trunk0, trunk1))
    assert any(not torch.allclose(a, b) for a, b in zip(heads0, heads1))
