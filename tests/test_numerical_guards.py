"""Numerical guards: a non-finite loss, gradient norm or lambda skips the optimiser update
(weights, optimiser, scheduler and OCC state untouched), is counted in train/skipped_steps, and
too many in a row stop the run with a clear error. OCC's lambda is finite for every input."""

import math

import pytest
import torch

import occ_exp.learner as learner_mod
from occ_exp.algo.coefficient import CoefficientState, occ_coefficient
from occ_exp.algo.regimes import get_regime
from occ_exp.learner import NonFiniteError, NonFiniteGuard, build_optimizer, learner_update
from occ_exp.rollout.hf import HFRollout
from occ_exp.trainer import train
from tests.conftest import compose_cfg
from tests.reliability_log import record

INF, NAN = float("inf"), float("nan")


@pytest.fixture
def setup(tiny_policy):
    policy, tok = tiny_policy
    cfg = compose_cfg(["experiment=smoke", "regime=occ", "regime.ema=0.5", "trainer.max_consecutive_skips=3"])
    rollout = HFRollout(cfg.rollout, policy, tok, "cpu")
    torch.manual_seed(0)
    batch = rollout.generate(["12 3 4 5 -> 17", "1 2 3 4 -> 10", "9 9 2 1 -> 20", "5 5 5 5 -> 25"], 4,
                             max_new_tokens=8)
    batch.rewards = torch.zeros(16)
    batch.advantages = torch.randn(16, generator=torch.Generator().manual_seed(1))
    batch.logp_old = batch.logp_sampler
    regime = get_regime("occ")
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    coefs = [CoefficientState(ema=0.5) for _ in range(policy.num_mtp_layers)]
    for c in coefs:
        c.value = 0.25  # an EMA in progress
    return policy, cfg, batch, regime, opt, sched, coefs


def poison(monkeypatch, kind: str, bad_calls: set[int], policy):
    """Make mini-batch updates number `bad_calls` (0-based, counted over the test) non-finite."""
    real = learner_mod.mtp_term
    calls = {"n": 0}

    def wrapped(regime, ctx):
        term = real(regime, ctx)
        i, calls["n"] = calls["n"], calls["n"] + 1
        if i in bad_calls:
            if kind == "loss":
                term.loss = term.loss * NAN
            elif kind == "lambda":
                term.coefs[0] = NAN
            elif kind == "grad_norm":
                p = policy.trunk_parameters()[0]
                handle = None

                def bomb(g):
                    handle.remove()
                    return torch.full_like(g, INF)

                handle = p.register_hook(bomb)
        return term

    monkeypatch.setattr(learner_mod, "mtp_term", wrapped)


def snapshot(policy, opt, sched, coefs):
    return ([p.detach().clone() for p in policy.parameters()], repr(opt.state_dict()["state"]), sched.last_epoch,
            [c.value for c in coefs])


@pytest.mark.parametrize("kind", ["loss", "grad_norm", "lambda"])
def test_non_finite_update_is_skipped_untouched(setup, monkeypatch, kind):
    policy, cfg, batch, regime, opt, sched, coefs = setup
    before = snapshot(policy, opt, sched, coefs)
    poison(monkeypatch, kind, {0, 1}, policy)  # both mini-batches of the step
    gen = torch.Generator().manual_seed(0)
    m = learner_update(policy, opt, sched, regime, batch, cfg, coefs, gen, guard=NonFiniteGuard(5), step=1)
    after = snapshot(policy, opt, sched, coefs)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights changed"
    assert before[1:] == after[1:], "optimiser, scheduler or OCC state changed"
    assert m["train/skipped_steps"] == 2 and m["train/skipped_steps_total"] == 2
    record("numerical_guards", f"skip_{kind}", non_finite_injected=2, skipped=2, weights_changed=False)


def test_one_bad_mini_batch_skips_only_itself(setup, monkeypatch):
    policy, cfg, batch, regime, opt, sched, coefs = setup
    before = [p.detach().clone() for p in policy.parameters()]
    poison(monkeypatch, "loss", {0}, policy)
    guard = NonFiniteGuard(2)
    m = learner_update(policy, opt, sched, regime, batch, cfg, coefs, torch.Generator().manual_seed(0), guard=guard, step=1)
    assert m["train/skipped_steps"] == 1 and guard.streak == 0 and sched.last_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_consecutive_skips_stop_the_run_with_a_clear_error(setup, monkeypatch):
    policy, cfg, batch, regime, opt, sched, coefs = setup
    before = [p.detach().clone() for p in policy.parameters()]
    poison(monkeypatch, "loss", set(range(100)), policy)
    guard = NonFiniteGuard(3)
    gen = torch.Generator().manual_seed(0)
    learner_update(policy, opt, sched, regime, batch, cfg, coefs, gen, guard=guard, step=1)  # 2 skips
    with pytest.raises(NonFiniteError) as e:
        learner_update(policy, opt, sched, regime, batch, cfg, coefs, gen, guard=guard, step=2)  # the 3rd stops it
    msg = str(e.value)
    assert "3 optimiser updates in a row" in msg and "step 2" in msg and "loss=nan" in msg
    assert "trainer.max_consecutive_skips" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    record("numerical_guards", "stop_after_consecutive", non_finite_injected=3, limit=3, stopped=True)


def test_guard_state_round_trips():
    g = NonFiniteGuard(4)
    assert g.skip(1, NAN, 1.0, [0.1]) and not g.skip(1, 1.0, 1.0, [0.1]) and g.skip(2, 1.0, INF, [0.1])
    h = NonFiniteGuard(4)
    h.load_state_dict(g.state_dict())
    assert (h.streak, h.total) == (1, 2)


def test_train_stops_with_error_and_counts_skips(smoke_overrides, tmp_path, monkeypatch):
    """End to end (random model, no warm start): every update is NaN; the run logs
    train/skipped_steps and stops at the limit with NonFiniteError."""
    cfg = compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", "trainer.max_consecutive_skips=3",
                                         "trainer.total_steps=5", "trainer.eval_every=0",
                                         "trainer.eval_before_train=false"])
    poison(monkeypatch, "loss", set(range(1000)), None)
    with pytest.raises(NonFiniteError, match="3 optimiser updates in a row"):
        train(cfg, tmp_path, log=lambda *_: None)
    import json

    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # step 1 skipped both updates; step 2 hit the limit
    assert rows[0]["train/skipped_steps"] == 2 and rows[0]["train/skipped_steps_total"] == 2
    assert not (tmp_path / "checkpoints").exists()


def _hostile_inputs(n: int, seed: int = 0):
    """(logp_main, logp_mtp, logp_old, mask, lambda_plus, eps, label) covering the cases that
    break a naive c/v2: no MTP change, empty masks, huge and infinite gaps, NaN, tiny eps."""
    g = torch.Generator().manual_seed(seed)
    specials = [0.0, -1e-45, -1e-30, -1e30, -3.4e38, -INF, INF, NAN, 1e30]
    for i in range(n):
        B, R = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g))
        old = -torch.rand(B, R, generator=g) * 5
        main = old + 0.1 * torch.randn(B, R, generator=g)
        mtp = old + 0.3 * torch.randn(B, R, generator=g)
        mask = torch.rand(B, R, generator=g) > 0.3
        case = i % 8
        if case == 0:
            mtp, label = old.clone(), "zero_mtp_change"
        elif case == 1:
            mask, label = torch.zeros_like(mask), "all_masked"
        elif case in (2, 3, 4):
            label = "extreme_values"
            for t in (main, mtp, old):
                hit = torch.rand(B, R, generator=g) < 0.3
                vals = torch.tensor(specials)[torch.randint(0, len(specials), (B, R), generator=g)]
                t[hit] = vals[hit]
        elif case == 5:
            main, mtp, label = main * 1e30, mtp * -1e30, "huge_gaps"
        elif case == 6:
            main, mtp, old = main.half().float(), mtp.bfloat16().float(), old
            label = "low_precision"
        else:
            label = "plain"
        lam_plus = [1.0, 1e-30, 1e30, 0.0][i % 4]
        eps = [1e-8, 1e-300, 5e-324, 1.0][(i // 4) % 4]
        yield main, mtp, old, mask, lam_plus, eps, label


def test_occ_lambda_finite_for_every_input():
    n, labels = 0, {}
    for main, mtp, old, mask, lp, eps, label in _hostile_inputs(4000):
        lam = occ_coefficient(main, mtp, old, mask, lambda_plus=lp, eps=eps)
        assert lam.dtype == torch.float32 and lam.shape == ()
        assert math.isfinite(float(lam)), (label, lp, eps)
        if label in ("zero_mtp_change", "all_masked"):
            assert float(lam) == 0.0
        n += 1
        labels[label] = labels.get(label, 0) + 1
    # a head that gives the sampled token probability 0 pushes lambda to 0 (the limit of c/v2)
    old = torch.full((1, 3), -1.0)
    lam = occ_coefficient(old + 0.1, torch.tensor([[-INF, -1.2, -0.9]]), old, torch.ones(1, 3, dtype=torch.bool))
    assert abs(float(lam)) < 1e-90 or float(lam) == 0.0
    record("numerical_guards", "occ_lambda_fuzz", inputs=n, by_case=labels, non_finite_results=0)
