"""Fidelity to the reference code (RL-MTP, a verl fork) and to DAPO: the reference_code estimator
against a line-by-line port of its loss function, lambda on the loss vs on the advantages, DAPO's
dynamic sampling, the reward scale and the learner's temperature."""

import math

import pytest
import torch

from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.policy_loss import POLICY_LOSSES, loss_options
from occ_exp.algo.regimes import MTPContext, get_regime, mtp_term
from occ_exp.models.policy import PolicyOutput
from occ_exp.reward.rewards import scale_reward
from occ_exp.rollout.base import RolloutBatch, concat_batches
from occ_exp.rollout.dynamic_sampling import GroupFilter, NoInformativeGroups, group_multiple, informative_groups
from tests.conftest import compose_cfg


# -- a hand-written, line-by-line port of the reference ------------------------------------------
# verl's vanilla policy loss (compute_policy_loss_vanilla) with dual-clip, token-mean aggregation,
# and the MTP part of RL-MTP's megatron_actor loss_func. Tensors are verl's: [b, R_pad], every
# response padded to max_response_length, the log-probs 0 at padding (label_mask), advantages
# per token (0 at padding).
def _port_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _port_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return _port_masked_mean(pg_losses, response_mask)


def _port_loss_func(log_prob, mtp_log_probs, old_log_prob, advantages, response_mask, mtp_loss_scaling_factor,
                    clip_low, clip_high, clip_ratio_c):
    pg_loss = _port_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c)
    policy_loss = pg_loss
    num_mtp_heads = len(mtp_log_probs)
    scalings = []
    for k, aligned_mtp_log_prob_resp in enumerate(mtp_log_probs):
        with torch.no_grad():
            scaling = mtp_loss_scaling_factor / num_mtp_heads
            gradient_dot = (aligned_mtp_log_prob_resp - old_log_prob) * (log_prob - old_log_prob)
            gradient_norm = (aligned_mtp_log_prob_resp - old_log_prob) ** 2
            scaling = scaling * (gradient_dot / (gradient_norm + 1e-8)).mean()
        scalings.append(float(scaling))
        mtp_pg_loss_k = _port_policy_loss(old_log_prob, aligned_mtp_log_prob_resp, advantages * scaling,
                                          response_mask, clip_low, clip_high, clip_ratio_c)
        policy_loss = policy_loss + mtp_pg_loss_k
    return policy_loss, scalings


def _random_micro_batch(seed, sign, b=3, R=7, R_pad=12, K=2):
    """Our compact [b, R] tensors (log-probs arbitrary at padding, logp_old 0 there) and the same
    data as verl holds it ([b, R_pad], zeros at padding). `sign` steers d_mtp with (+) or against
    (-) d_rl, so lambda comes out positive or negative."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([R, R - 3, 2])[:b]
    mask = torch.arange(R)[None] < lengths[:, None]
    old = (-torch.rand(b, R, generator=g) * 2).masked_fill(~mask, 0.0)
    d_rl = 0.6 * torch.randn(b, R, generator=g)
    main = old + d_rl + 5.0 * (~mask)  # garbage at padding: must not count
    mtps = [old + d_rl * (sign * (0.8 + 0.4 * k) + 0.1 * torch.randn(b, R, generator=g)) + 7.0 * (~mask) for k in range(K)]
    adv = torch.tensor([-1.0, 0.8, -0.6])[:b] + 0.1 * torch.randn(b, generator=g)  # both signs
    return main, mtps, old, mask, adv, R_pad


def _to_verl(x, mask, R_pad, zero_padding=True):
    x = x.masked_fill(~mask, 0.0) if zero_padding else x
    return torch.nn.functional.pad(x, (0, R_pad - x.shape[1]))


@pytest.mark.parametrize("seed,sign", [(0, 1.0), (1, -1.0), (2, -1.0), (3, 1.0)])
def test_reference_code_is_a_transcription_of_the_reference_loss(seed, sign):
    """regime=occ_reference (estimator=reference_code, lambda_apply=advantage) with dual-clip gives
    the reference loss function's value and gradients on one micro-batch, lambda < 0 included."""
    main, mtps, old, mask, adv, R_pad = _random_micro_batch(seed, sign)
    # clip_ratio_c 1.5 (the reference script's is 10) so that the dual clip binds on some tokens here
    cfg = compose_cfg(["regime=occ_reference", "algorithm.clip_ratio_c=1.5"])
    a, lp = cfg.algorithm, cfg.regime.lambda_plus
    assert lp == 0.1 and cfg.regime.estimator == "reference_code" and cfg.regime.lambda_apply == "advantage"

    # ours
    ours_main = main.clone().requires_grad_(True)
    ours_mtp = [m.clone().requires_grad_(True) for m in mtps]
    out = PolicyOutput(ours_main, ours_mtp, None, [], None)
    ctx = MTPContext(out, old, adv, mask, cfg.regime, a, [CoefficientState() for _ in mtps], pad_to=R_pad)
    rl_loss, stats = POLICY_LOSSES[a.policy_loss](ours_main, old, adv, mask, **loss_options(a))
    assert stats["clipfrac_lower"] > 0  # the dual clip is exercised
    term = mtp_term(get_regime("occ"), ctx)
    (rl_loss + term.loss).backward()

    # the port, on verl's padded layout
    v_main = main.clone().requires_grad_(True)
    v_mtp = [m.clone().requires_grad_(True) for m in mtps]
    vm = _to_verl(mask.float(), mask, R_pad).bool()
    want, scalings = _port_loss_func(_to_verl(v_main, mask, R_pad),
                                     [_to_verl(m, mask, R_pad, zero_padding=False) for m in v_mtp],
                                     _to_verl(old, mask, R_pad), _to_verl(adv[:, None].expand_as(main), mask, R_pad),
                                     vm, lp, a.clip_low, a.clip_high, a.clip_ratio_c)
    want.backward()

    K = len(mtps)
    assert all((s < 0) == (sign < 0) for s in scalings)  # both signs of lambda are exercised
    for k in range(K):  # the reference's scaling == our lambda_k / K (the regime's 1/K average)
        assert term.coefs[k] / K == pytest.approx(scalings[k], rel=1e-5)
    assert float((rl_loss + term.loss).detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours_main.grad[mask], v_main.grad[mask], rtol=1e-5, atol=1e-7)
    for o, v in zip(ours_mtp, v_mtp):
        torch.testing.assert_close(o.grad[mask], v.grad[mask], rtol=1e-5, atol=1e-7)
        assert bool((o.grad[~mask] == 0).all())


def _term_for(apply, lam, clip_ratio_c=None, seed=0):
    main, mtps, old, mask, adv, _ = _random_micro_batch(seed, 1.0, K=1)
    over = ["regime=policy", f"regime.coef={abs(lam)}", f"regime.lambda_apply={apply}"]
    if clip_ratio_c is not None:
        over.append(f"algorithm.clip_ratio_c={clip_ratio_c}")
    cfg = compose_cfg(over)
    cfg.regime.coef = lam  # a negative fixed lambda (validation refuses it in a config; here it stands for occ's)
    mtp = mtps[0].clone().requires_grad_(True)
    ctx = MTPContext(PolicyOutput(main, [mtp], None, [], None), old, adv, mask, cfg.regime, cfg.algorithm,
                     [CoefficientState()])
    term = mtp_term(get_regime("policy"), ctx)
    term.loss.backward()
    return float(term.loss.detach()), mtp.grad


@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_lambda_on_loss_and_on_advantages_agree_for_positive_lambda(clip_ratio_c):
    loss_l, g_l = _term_for("loss", 0.3, clip_ratio_c)
    loss_a, g_a = _term_for("advantage", 0.3, clip_ratio_c)
    assert loss_l == pytest.approx(loss_a, rel=1e-6)
    torch.testing.assert_close(g_l, g_a)


def test_lambda_on_loss_and_on_advantages_differ_for_negative_lambda():
    """lambda * L(A) keeps the clip of A; L(lambda * A) clips on the other side of the ratio."""
    loss_l, g_l = _term_for("loss", -0.3)
    loss_a, g_a = _term_for("advantage", -0.3)
    assert loss_l != pytest.approx(loss_a, rel=1e-3)
    assert not torch.allclose(g_l, g_a)


# -- dynamic sampling -------------------------------------------------------------------------------
def _gen_batch(n_groups, G, P=3, R=4, offset=0):
    """A rollout batch of n_groups groups; the row values tell the rows apart."""
    B = n_groups * G
    rows = torch.arange(B) + offset
    ids = rows[:, None].repeat(1, P + R)
    return RolloutBatch(
        input_ids=ids, attention_mask=torch.ones(B, P + R, dtype=torch.long),
        response_mask=torch.ones(B, R, dtype=torch.bool), logp_sampler=-rows[:, None].float().repeat(1, R),
        prompt_len=P, texts=[str(int(r)) for r in rows], prompt_index=torch.arange(n_groups).repeat_interleave(G),
        truncated=torch.zeros(B, dtype=torch.bool), rewards=torch.zeros(B))


def test_informative_groups_are_those_with_varying_values():
    v = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.3])
    assert informative_groups(v, 3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(v, 4)


def test_group_filter_keeps_exactly_the_target_in_generation_order():
    G = 2
    f = GroupFilter(target=3, group_size=G, max_batches=5)
    b1 = _gen_batch(4, G)
    f.add(b1, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]))  # groups 0 and 3 vary
    assert f.wants_more() and f.kept == 2
    b2 = _gen_batch(4, G, P=5, R=6, offset=100)  # other widths: re-padded
    f.add(b2, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))  # groups 1 and 2 vary
    assert not f.wants_more()
    out = f.result()
    assert out.texts == ["0", "1", "6", "7", "102", "103"]  # groups 0, 3 of b1, then group 1 of b2
    assert out.prompt_len == 5 and out.response_len == 6
    assert out.prompt_index.view(-1, G).unique(dim=0).shape[0] == 3  # one distinct index per group
    assert torch.equal(out.logp_sampler[:, :4], -torch.tensor([0, 1, 6, 7, 102, 103.0])[:, None].repeat(1, 4))
    assert not out.response_mask[:4, 4:].any()
    assert f.metrics() == {"rollout/kept_groups": 3.0, "rollout/gen_batches": 2.0,
                           "rollout/filtered_share": pytest.approx(0.5), "rollout/gen_cap_hit": 0.0}


def test_group_filter_at_the_cap_trains_on_what_was_kept():
    G = 2
    f = GroupFilter(target=4, group_size=G, max_batches=2, multiple=2)
    for _ in range(2):
        f.add(_gen_batch(4, G), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))  # one varying group
    assert not f.wants_more() and f.cap_hit and f.kept == 2
    assert f.result().input_ids.shape[0] == 2 * G
    assert f.metrics()["rollout/kept_groups"] == 2.0 and f.metrics()["rollout/gen_cap_hit"] == 1.0
    empty = GroupFilter(target=4, group_size=G, max_batches=1, multiple=2)
    empty.add(_gen_batch(4, G), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert empty.metrics()["rollout/kept_groups"] == 0.0  # 1 group, rounded down to 0
    with pytest.raises(NoInformativeGroups, match="algorithm.max_num_gen_batches"):
        empty.result()
    # whole groups per mini-batch, rows even over ranks: 4 mini-batches, G=16, 32 ranks -> steps of 8 groups
    assert group_multiple(4, 16, 32) == 8 and group_multiple(2, 4, 1) == 2 and group_multiple(4, 6, 4) == 8


def test_concat_batches_keeps_the_policy_outputs(tiny_policy):
    """Re-padding two rollout batches into one changes no log-prob of the learner."""
    from occ_exp.rollout.hf import HFRollout

    policy, tok = tiny_policy
    ro = HFRollout(compose_cfg(["rollout.max_new_tokens=6"]).rollout, policy, tok, "cpu")
    torch.manual_seed(0)
    b1 = ro.generate(["Make 12 with 5 9 8.\n"], 2)
    b2 = ro.generate(["Hi\n", "Make 7 with 1 2 3 4 5 6 7 8 9.\n"], 2)
    both = concat_batches([b1, b2])
    with torch.no_grad():
        whole = policy(both.input_ids, both.attention_mask, both.response_len, with_mtp=False).logp_main
        for part, rows in ((b1, slice(0, 2)), (b2, slice(2, 6))):
            own = policy(part.input_ids, part.attention_mask, part.response_len, with_mtp=False).logp_main
            m = part.response_mask
            torch.testing.assert_close(whole[rows, : part.response_len][m], own[m], rtol=1e-5, atol=1e-5)
    assert both.texts == b1.texts + b2.texts


# -- reward scale, temperature ----------------------------------------------------------------------
def test_reward_scale():
    s = torch.tensor([1.0, 0.0, 1.0])
    assert torch.equal(scale_reward(s, "binary"), s)
    assert torch.equal(scale_reward(s, "signed"), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="reward.scale"):
        scale_reward(s, "nope")
    assert compose_cfg([]).reward.scale == "signed"  # algorithm=dapo's default (verl's DAPO reward)
    assert compose_cfg(["algorithm=grpo"]).reward.scale == "binary"


def test_learner_divides_every_heads_logits_by_the_temperature(tiny_policy):
    policy, tok = tiny_policy
    ids = torch.randint(4, policy.config.vocab_size, (2, 9))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        cold = policy(ids, attn, 4)
        policy.temperature = 0.7
        warm = policy(ids, attn, 4)
    policy.temperature = 1.0
    targets = ids[:, 5:]
    for c, w in [(cold.logits_main, warm.logits_main), *zip(cold.logits_mtp, warm.logits_mtp)]:
        torch.testing.assert_close(w, c / 0.7)
    want = (cold.logits_main / 0.7).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(warm.logp_main, want)
    want_mtp = (cold.logits_mtp[0] / 0.7).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(warm.logp_mtp[0], want_mtp)
    assert compose_cfg(["rollout.temperature=0.7"]).algorithm.temperature == 0.7  # follows the sampler


# -- the learner: learning-rate schedule, per-micro-batch lambda ---------------------------------------
def _learner_setup(policy, tok, overrides):
    from occ_exp.rollout.hf import HFRollout

    cfg = compose_cfg(["experiment=smoke", *overrides])
    torch.manual_seed(0)
    batch = HFRollout(cfg.rollout, policy, tok, "cpu").generate(
        ["12 3 4 5 -> 17", "1 2 3 4 -> 10", "9 9 2 1 -> 20", "5 5 5 5 -> 25"], 4, max_new_tokens=8)
    batch.rewards = torch.zeros(16)
    batch.advantages = torch.randn(16, generator=torch.Generator().manual_seed(1))
    batch.logp_old = batch.logp_sampler
    return cfg, batch


def test_warm_up_counts_rl_steps_not_mini_batches(tiny_policy):
    """optimizer.warmup_steps=10 with 4 mini-batches per RL step: the peak lr is reached at RL step
    10 (verl steps its scheduler once per RL step), not at step 3."""
    from occ_exp.learner import build_optimizer, learner_update

    policy, tok = tiny_policy
    cfg, batch = _learner_setup(policy, tok, ["regime=detach", "algorithm.num_mini_batches=4", "optimizer.warmup_steps=10",
                                              "optimizer.lr=1e-3"])
    regime = get_regime("detach")
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    gen = torch.Generator().manual_seed(0)
    lrs = []
    for step in range(1, 12):
        m = learner_update(policy, opt, sched, regime, batch, cfg, [CoefficientState()] * 2, gen, step=step)
        lrs.append(m["train/lr"])
    assert lrs[:10] == pytest.approx([1e-3 * k / 10 for k in range(1, 11)])  # the lr each RL step trained at
    assert lrs[8] < 1e-3 and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)


def test_reference_code_estimates_lambda_on_each_micro_batch(tiny_policy, monkeypatch):
    """estimator=reference_code with trainer.micro_batch_size: one lambda per micro-batch, each from
    that micro-batch alone (padded to rollout.max_new_tokens), none from the whole mini-batch."""
    import occ_exp.algo.coefficient as C
    from occ_exp.learner import build_optimizer, learner_update

    policy, tok = tiny_policy
    cfg, batch = _learner_setup(policy, tok, ["regime=occ_reference", "trainer.micro_batch_size=2"])
    seen = []
    real = C.ESTIMATORS["reference_code"]

    def spy(main, mtp, old, mask, *args, **kw):
        seen.append((main.shape[0], kw["pad_to"]))
        return real(main, mtp, old, mask, *args, **kw)

    monkeypatch.setitem(C.ESTIMATORS, "reference_code", spy)
    regime = get_regime("occ")
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    m = learner_update(policy, opt, sched, regime, batch, cfg, [CoefficientState() for _ in range(2)],
                       torch.Generator().manual_seed(0), step=1)
    # 16 rows, 2 mini-batches of 8, micro-batches of 2 rows: 4 per mini-batch, K=2 heads each
    assert seen == [(2, cfg.rollout.max_new_tokens)] * (2 * 4 * 2)
    assert m["mtp/coef"] != 0 and math.isfinite(m["mtp/coef"])
