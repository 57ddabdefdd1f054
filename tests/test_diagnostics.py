"""Exact correlation / penalty, the gradient assembly, the Taylor check and the MTP health metrics."""

import json
import math

import pytest
import torch

from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.policy_loss import POLICY_LOSSES
from occ_exp.algo.regimes import MTPContext, get_regime, mtp_term
from occ_exp.diagnostics import GradientProbe, exact_diagnostics, mtp_health
from occ_exp.models.policy import PolicyOutput
from tests.conftest import compose_cfg
from tests.test_regimes import _batch


def _setup(policy, regime_name, overrides=(), seed=0, dtype=torch.float64):
    """One mini-batch of the tiny policy: forward, RL loss, the regime's term, a probe."""
    policy.to(dtype)
    cfg = compose_cfg([f"regime={regime_name}", "diagnostics.exact_every=1", *overrides])
    regime = get_regime(regime_name)
    if not regime.train_heads:
        for p in policy.mtp_parameters():
            p.requires_grad_(False)
    ids, attn, mask = _batch(policy.config.vocab_size, seed=seed)
    R = mask.shape[1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp = policy(ids, attn, R, with_mtp=False).logp_main
    logp_old = (lp + 0.05 * torch.randn(lp.shape, generator=g, dtype=dtype)).masked_fill(~mask, 0)
    adv = torch.randn(ids.shape[0], generator=g, dtype=dtype)
    a = cfg.algorithm

    def objective():
        out = policy(ids, attn, R, with_mtp=False)
        return POLICY_LOSSES[a.policy_loss](out.logp_main, logp_old, adv, mask)[0]

    def build():
        out = policy(ids, attn, R, detach_trunk=regime.detach_trunk, detach_head=regime.detach_head)
        rl, _ = POLICY_LOSSES[a.policy_loss](out.logp_main, logp_old, adv, mask)
        shared = [p for p in policy.trunk_parameters() if p.requires_grad]
        heads = [p for p in policy.mtp_parameters() if p.requires_grad]
        probe = GradientProbe(rl, shared, heads)
        ctx = MTPContext(out, logp_old, adv, mask, cfg.regime, a,
                         [CoefficientState() for _ in range(policy.num_mtp_layers)], policy=policy, probe=probe)
        return rl, mtp_term(regime, ctx), ctx, probe

    return cfg, build, objective


def _flat_grad(loss, params):
    for p in params:
        p.grad = None
    loss.backward(retain_graph=True)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


@pytest.mark.parametrize("regime", ["ce", "policy", "occ"])
def test_exact_corr_and_penalty_equal_brute_force(tiny_policy, regime):
    policy, _ = tiny_policy
    cfg, build, _ = _setup(policy, regime)
    rl, term, ctx, probe = build()
    diag = exact_diagnostics(probe, term, ctx, cfg.diagnostics)
    shared = policy.trunk_parameters()
    g_rl = _flat_grad(rl, shared)
    for k, lk in enumerate(term.losses, start=1):
        g_k = _flat_grad(lk, shared)
        c, v2 = float(g_rl @ g_k), float(g_k @ g_k)
        assert v2 > 0 and abs(c) > 0
        assert diag[f"diag/corr_d{k}"] == pytest.approx(c, rel=1e-5)
        assert diag[f"diag/penalty_d{k}"] == pytest.approx(v2, rel=1e-5)
        assert diag[f"diag/cosine_d{k}"] == pytest.approx(c / (g_rl.norm() * g_k.norm()).item(), rel=1e-5)
        assert diag[f"diag/lambda_star_d{k}"] == pytest.approx(cfg.regime.lambda_plus * c / (v2 + cfg.regime.eps), rel=1e-5)
    assert diag["diag/corr"] == diag["diag/corr_d1"]
    assert diag["diag/g_rl_norm"] == pytest.approx(g_rl.norm().item(), rel=1e-5)


def test_detach_has_zero_exact_mtp_gradient_on_the_trunk(tiny_policy):
    policy, _ = tiny_policy
    cfg, build, _ = _setup(policy, "detach")
    _, term, ctx, probe = build()
    diag = exact_diagnostics(probe, term, ctx, cfg.diagnostics)
    assert diag["diag/corr"] == 0.0 and diag["diag/penalty"] == 0.0 and diag["diag/cosine"] == 0.0
    assert diag["diag/g_rl_norm"] > 0


@pytest.mark.parametrize("regime,overrides", [
    ("detach", []), ("detach_ref", []), ("frozen", []), ("soft_ce", []), ("ce", []), ("policy", ["regime.head_ce=0.3"]),
    ("occ", []), ("occ", ["regime.estimator=exact", "regime.head_ce=0.1"]),
])
def test_assembled_gradient_equals_backward(tiny_policy, regime, overrides):
    """A diagnosed mini-batch applies the gradient loss.backward() gives (up to the float32 rounding of
    HF RMSNorm, which computes in float32 even in a float64 model)."""
    policy, _ = tiny_policy
    cfg, build, _ = _setup(policy, regime, overrides)
    params = [p for p in policy.parameters() if p.requires_grad]
    rl, term, ctx, probe = build()
    policy.zero_grad(set_to_none=True)
    (rl + term.loss).backward()
    ref = [None if p.grad is None else p.grad.clone() for p in params]
    rl, term2, ctx, probe = build()
    exact_diagnostics(probe, term2, ctx, cfg.diagnostics)
    assert probe.used and term2.coefs == term.coefs
    policy.zero_grad(set_to_none=True)
    probe.backward(term2)
    for p, r in zip(params, ref):
        if r is None or not bool(r.any()):
            assert p.grad is None or not bool(p.grad.any())
        else:
            assert torch.allclose(p.grad, r, rtol=1e-5, atol=1e-6 * float(r.abs().max())), float((p.grad - r).abs().max())


def test_exact_estimator_is_the_oracle(tiny_policy):
    policy, _ = tiny_policy
    cfg, build, _ = _setup(policy, "occ", ["regime.estimator=exact", "regime.lambda_plus=0.5"])
    _, term, ctx, probe = build()
    diag = exact_diagnostics(probe, term, ctx, cfg.diagnostics)
    for k in range(policy.num_mtp_layers):
        assert term.coefs[k] == pytest.approx(diag[f"diag/lambda_star_d{k + 1}"], rel=1e-5)
    assert term.coefs[0] != pytest.approx(diag["diag/lambda_proxy"], rel=1e-3)


def _taylor_errors(policy, eta):
    cfg, build, objective = _setup(policy, "policy", ["regime.coef=1.0", "diagnostics.taylor_check=true",
                                                       f"diagnostics.taylor_eta={eta}"], seed=1)
    _, term, ctx, probe = build()
    d = exact_diagnostics(probe, term, ctx, cfg.diagnostics, objective)
    assert d["diag/taylor_eta"] == eta
    real = d["diag/delta_mtp_realised"]
    return real, abs(real - d["diag/delta_mtp_predicted"]), abs(real - d["diag/delta_mtp_predicted2"])


def test_taylor_check_first_order_error_shrinks_like_eta_squared(tiny_policy):
    """float64 tiny model, SGD step: realised MTP-induced change = eta*<g, u> + O(eta^2). (HF's RMSNorm
    computes in float32, so the float64 model has a noise floor near 1e-9; the step sizes sit above it.)"""
    policy, _ = tiny_policy
    weights = [p.detach().clone() for p in policy.parameters()]
    real_big, err1_big, err2_big = _taylor_errors(policy, 1e-3)
    real_small, err1_small, _ = _taylor_errors(policy, 3e-4)
    assert all(torch.equal(p.double(), w.double()) for p, w in zip(policy.parameters(), weights))  # restored
    assert abs(real_big) > 1e-5 and abs(real_small) > 1e-6  # the MTP term does move the objective
    assert err1_small / abs(real_small) < 0.01  # first order is accurate ...
    assert err1_small < err1_big / 5  # ... with an error that falls like eta^2 (eta / 3.33 -> / 11; linear: / 3.33)
    assert err2_big < err1_big  # the exact second-order term (Hessian-vector product) improves on it


def test_mtp_health_by_hand():
    logits_main = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
    logits_mtp = torch.log(torch.tensor([[[0.5, 0.4, 0.1], [0.6, 0.3, 0.1]]]))
    tokens = torch.tensor([[0, 2]])
    lp_main = logits_main.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    lp_mtp = logits_mtp.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    out = PolicyOutput(lp_main, [lp_mtp], logits_main, [logits_mtp], None)
    mask = torch.tensor([[True, True]])
    m = mtp_health(out, lp_main.clone(), mask)
    assert m["mtp/acceptance_d1"] == pytest.approx(((0.5 + 0.2 + 0.1) + (0.1 + 0.1 + 0.1)) / 2)
    assert m["mtp/top1_agree"] == pytest.approx(0.5)
    assert m["mtp/loss"] == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2, rel=1e-6)
    m1 = mtp_health(out, lp_main.clone(), torch.tensor([[True, False]]))  # the mask is respected
    assert m1["mtp/acceptance"] == pytest.approx(0.8)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["regime=ce", "diagnostics.exact_every=1", "diagnostics.taylor_check=true", "diagnostics.taylor_eta=1e-3"],
    ["regime=occ", "regime.estimator=exact", "regime.head_ce=0.1", "diagnostics.exact_every=2"],
])
def test_diagnosed_training_run(smoke_overrides, tmp_path, overrides):
    from occ_exp.trainer import train

    train(compose_cfg(smoke_overrides + overrides), tmp_path, log=lambda *_: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if r["step"] > 0}
    every = 1 if "diagnostics.exact_every=1" in overrides else 2
    keys = ["diag/corr", "diag/penalty", "diag/cosine", "diag/g_rl_norm", "diag/lambda_star", "diag/lambda_proxy",
            "mtp/loss_d1", "mtp/acceptance_d1", "mtp/top1_agree_d1", "mtp/grad_norm"]
    if "diagnostics.taylor_check=true" in overrides:
        keys += ["diag/delta_mtp_realised", "diag/delta_mtp_predicted", "diag/delta_mtp_predicted2"]
    for s, r in steps.items():
        diagnosed = s % every == 0
        for k in keys:
            if k.startswith("diag/") and not diagnosed:
                assert k not in r
            else:
                assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), f"step {s}: {k}={r.get(k)!r}"
        if diagnosed:  # (a policy-loss penalty is 0 on a mini-batch whose groups all have equal rewards)
            assert r["diag/penalty"] > 0 if "regime=ce" in overrides else r["diag/penalty"] >= 0
    if "regime.estimator=exact" in overrides:  # the applied lambda is the oracle's on the diagnosed mini-batch
        r = steps[2]
        assert r["mtp/coef_last"] == pytest.approx(r["diag/lambda_star"], rel=1e-4, abs=1e-6)


def test_every_mini_batch_of_a_diagnosed_step_is_diagnosed(tiny_policy):
    """A diagnosed RL step with 2 mini-batches logs diag/<name>_mb<i> for both (the proxy study's
    per-mini-batch view), the unsuffixed diag/* are the last one's, the Taylor check runs once, the
    applied lambda of estimator=exact equals lambda* of the same mini-batch, and
    train/trunk_update_norm is the norm of the trunk's actual change."""
    import copy

    from occ_exp.learner import build_optimizer, learner_update
    from tests.test_fidelity import _learner_setup

    policy, tok = copy.deepcopy(tiny_policy)
    cfg, batch = _learner_setup(policy, tok, ["regime=occ", "regime.estimator=exact", "algorithm.num_mini_batches=2",
                                              "diagnostics.taylor_check=true", "optimizer.lr=1e-3"])
    regime = get_regime("occ")
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    before = [p.detach().clone() for p in policy.trunk_parameters()]
    m = learner_update(policy, opt, sched, regime, batch, cfg, [CoefficientState() for _ in range(2)],
                       torch.Generator().manual_seed(0), step=1, diagnose=True)
    names = ("lambda_star", "lambda_proxy", "lambda_reference_code", "lambda_paper_in_clip", "corr", "penalty",
             "lambda_applied", "cosine")
    for i in (0, 1):
        for n in names:
            assert math.isfinite(m[f"diag/{n}_mb{i}"]), (n, i)
        assert m[f"diag/lambda_applied_mb{i}"] == pytest.approx(m[f"diag/lambda_star_mb{i}"], rel=1e-5)
    assert m["diag/lambda_star_mb0"] != m["diag/lambda_star_mb1"]
    for n in names:
        assert m[f"diag/{n}"] == m[f"diag/{n}_mb1"]
    assert "diag/delta_mtp_realised_mb1" in m and "diag/delta_mtp_realised_mb0" not in m
    assert not any(k.endswith("_mb2") or ("_d1_mb" in k) for k in m)
    moved = math.sqrt(sum(float((p.detach().double() - b.double()).pow(2).sum())
                          for p, b in zip(policy.trunk_parameters(), before)))
    assert moved > 0 and m["train/trunk_update_norm"] == pytest.approx(moved, rel=1e-6)
