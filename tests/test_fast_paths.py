"""The fast paths, the defaults: the static-cache decode loop (rollout.static_cache / rollout.compile)
samples what transformers.generate (the plain path, rollout.static_cache=false) samples and records
exact log-probs, so the sampler's log-probs serve as logp_old; the compiled learner takes the eager
learner's steps. (Timing lives in scripts/bench.py, not here.)"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers.generation.logits_process import TopPLogitsWarper

from occ_exp.rollout.decode import StaticDecoder, top_p_filter
from occ_exp.rollout.hf import HFRollout
from occ_exp.learner import recompute_logp_old
from tests.conftest import compose_cfg

PROMPTS = ["Make 12 with 5 9 8.\n", "Make 100 with 10 10.\n", "Hi\n", "Make 7 with 1 2 3 4 5 6 7 8 9.\n"]


def engine(policy, tok, **kw) -> HFRollout:
    cfg = OmegaConf.merge(compose_cfg(["rollout.max_new_tokens=12"]).rollout, kw)
    return HFRollout(cfg, policy, tok, "cpu")


def test_greedy_equals_generate(tiny_policy):
    """Same tokens as transformers.generate (prompts of different widths: left padding), same log-probs."""
    policy, tok = tiny_policy
    ref = engine(policy, tok, static_cache=False).generate(PROMPTS, 2, greedy=True)
    fast = engine(policy, tok).generate(PROMPTS, 2, greedy=True)  # the default: static_cache=true
    assert torch.equal(fast.input_ids, ref.input_ids)
    assert torch.equal(fast.response_mask, ref.response_mask)
    assert torch.allclose(fast.logp_sampler, ref.logp_sampler, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_learners(tiny_policy, temperature):
    """The recorded log-probs are log softmax(logits / T) of the sampled tokens, which is what the
    learner recomputes as logp_old at its temperature (algorithm.temperature = rollout.temperature):
    rollout/logp_diff_mean stays at float precision, so recompute_logp_old can be skipped. A learner
    at T = 1 against a sampler at 0.7 is far off (the error the config refuses)."""
    policy, tok = tiny_policy
    torch.manual_seed(0)
    b = engine(policy, tok, static_cache=True, temperature=temperature).generate(PROMPTS, 4)
    assert b.response_mask.sum() > 4 * len(PROMPTS)  # real samples, not immediate EOS
    policy.temperature = temperature
    try:
        learner = recompute_logp_old(policy, b, chunk=8)
    finally:
        policy.temperature = 1.0
    gap = (learner - b.logp_sampler).abs()[b.response_mask]
    assert gap.mean() < 1e-6 and gap.max() < 1e-5, gap.max()
    if temperature != 1.0:
        untempered = recompute_logp_old(policy, b, chunk=8)
        assert (untempered - b.logp_sampler).abs()[b.response_mask].mean() > 1e-2


def test_default_takes_logp_old_from_the_sampler_where_exact(tiny_policy):
    """algorithm.recompute_logp_old=null (the default): the sampler's log-probs at temperature 1 on
    rollout=hf, a learner forward otherwise; true / false as set."""
    from occ_exp.rollout.base import Rollout, recompute_logp_old_needed

    policy, tok = tiny_policy
    cfg = compose_cfg([])
    assert cfg.algorithm.recompute_logp_old is None and cfg.rollout.static_cache
    assert not recompute_logp_old_needed(None, engine(policy, tok))
    assert recompute_logp_old_needed(None, engine(policy, tok, temperature=0.7))
    assert recompute_logp_old_needed(None, Rollout())  # an engine that does not say (e.g. vLLM)
    assert recompute_logp_old_needed(True, engine(policy, tok))
    assert not recompute_logp_old_needed(False, engine(policy, tok, temperature=0.7))


def test_sampling_follows_the_distribution(tiny_policy):
    """Gumbel-max sampling: token frequencies of the first sampled token match softmax(logits)."""
    policy, tok = tiny_policy
    policy = copy.deepcopy(policy)
    with torch.no_grad():  # a skewed next-token distribution (the random init is near uniform)
        policy.lm.lm_head.weight.mul_(40.0)
        logits = policy.lm(**tok(PROMPTS[:1], return_tensors="pt")).logits[0, -1].float()
    p = logits.softmax(-1)
    assert p.max() > 0.05
    torch.manual_seed(0)
    n = 4000
    b = engine(policy, tok, static_cache=True, max_new_tokens=1).generate(PROMPTS[:1], n)
    freq = torch.bincount(b.input_ids[:, -1], minlength=p.numel()).float() / n
    assert (freq - p).abs().max() < 4 * (p.max() / n) ** 0.5 + 2e-3  # a few standard errors


def test_top_p_matches_transformers():
    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    for top_p in (0.3, 0.9, 0.99):
        ref = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(torch.isinf(top_p_filter(scores, top_p)), torch.isinf(ref))


def test_min_new_tokens_and_early_stop(tiny_policy):
    """EOS is not sampled before min_new_tokens; once every row has finished the loop stops."""
    policy, tok = tiny_policy
    p = copy.deepcopy(policy)
    with torch.no_grad():  # make EOS the most likely token everywhere by a wide margin
        h = p.lm.model(**tok(PROMPTS, return_tensors="pt", padding=True)).last_hidden_state[:, -1].mean(0)
        p.lm.lm_head.weight[tok.eos_token_id] = 200.0 * h / h.norm() ** 2
    for static in (False, True):
        torch.manual_seed(0)
        free = engine(p, tok, static_cache=static).generate(PROMPTS, 2)
        assert free.response_len <= 3 and not free.truncated.any()  # stopped early: every row said EOS
        forced = engine(p, tok, static_cache=static, min_new_tokens=5).generate(PROMPTS, 2)
        lengths = forced.response_mask.sum(-1)
        assert (lengths >= 6).all(), lengths  # 5 forced tokens, then (almost surely) EOS
        gen = forced.input_ids[:, forced.prompt_len:]
        assert not (gen[:, :5] == tok.eos_token_id).any()


def test_group_prefill_equals_per_row(tiny_policy):
    """Running each prompt once for its G samples gives what running every row gives."""
    policy, tok = tiny_policy
    expanded = [p for p in PROMPTS for _ in range(3)]
    enc = tok(expanded, return_tensors="pt", padding=True, padding_side="left")
    dec = StaticDecoder(policy.lm)
    kw = dict(greedy=True, temperature=1.0, top_p=1.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with torch.no_grad():
        a = dec.generate(enc.input_ids, enc.attention_mask, 10, group=3, **kw)
        b = dec.generate(enc.input_ids, enc.attention_mask, 10, group=1, **kw)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="groups of 5"):
        dec.generate(enc.input_ids, enc.attention_mask, 4, group=5, **kw)


def test_weights_updated_in_place_are_seen(tiny_policy):
    """The engine reads the learner's current weights (an optimiser step between two rollouts)."""
    policy, tok = tiny_policy
    ro = engine(policy, tok, static_cache=True)
    a = ro.generate(PROMPTS, 1, greedy=True)
    with torch.no_grad():
        for prm in policy.lm.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    b = ro.generate(PROMPTS, 1, greedy=True)
    ref = engine(policy, tok, static_cache=False).generate(PROMPTS, 1, greedy=True)
    assert not torch.equal(a.input_ids, b.input_ids) and torch.equal(b.input_ids, ref.input_ids)


@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny_policy):
    policy, tok = tiny_policy
    ref = engine(policy, tok, static_cache=True).generate(PROMPTS, 2, greedy=True)
    fast = engine(policy, tok, compile=True).generate(PROMPTS, 2, greedy=True)
    assert torch.equal(fast.input_ids, ref.input_ids)
    assert torch.allclose(fast.logp_sampler, ref.logp_sampler, atol=1e-5)
    torch.manual_seed(0)
    b = engine(policy, tok, compile=True).generate(PROMPTS, 4)
    gap = (recompute_logp_old(policy, b, chunk=16) - b.logp_sampler).abs()[b.response_mask]
    assert gap.max() < 1e-5


@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
@pytest.mark.slow
def test_compiled_learner_equals_eager(tiny_policy):
    """model.compile: the same parameters after two occ updates (2 mini-batches) as the eager learner."""
    from occ_exp.algo.coefficient import CoefficientState
    from occ_exp.algo.regimes import get_regime
    from occ_exp.learner import build_optimizer, learner_update

    policy, tok = tiny_policy
    cfg = compose_cfg(["regime=occ", "algorithm.group_size=4", "data.prompts_per_step=4", "algorithm.num_mini_batches=2"])
    torch.manual_seed(0)
    batch = engine(policy, tok, static_cache=True).generate(PROMPTS, 4)
    batch.rewards = torch.randn(16)
    batch.advantages = batch.rewards - batch.rewards.view(4, 4).mean(-1).repeat_interleave(4)
    batch.logp_old = batch.logp_sampler
    results = []
    for compiled in (False, True):
        p = copy.deepcopy(policy)
        if compiled:
            p.compile_forward(dynamic=True)
        regime = get_regime("occ")
        opt, sched = build_optimizer(cfg.optimizer, p, regime)
        states = [CoefficientState() for _ in range(p.num_mtp_layers)]
        m = learner_update(p, opt, sched, regime, batch, cfg, states, torch.Generator().manual_seed(0))
        results.append((m, [q.detach().clone() for q in p.parameters()]))
    (m0, p0), (m1, p1) = results
    assert max((a - b).abs().max().item() for a, b in zip(p0, p1)) < 1e-5
    for k in ("train/loss", "mtp/coef_last", "mtp/acceptance"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6), k


def test_the_step_profile_counts_the_cache_the_decode_loop_reads(tiny_policy, monkeypatch):
    """scripts/profile_step.py rates the decode's attention by the KV-cache bytes it reads: its count
    equals the keys and values the loop's cache hands to attention, step by step (min_new_tokens keeps
    every row going, as in the bench's work)."""
    import importlib.util
    import sys
    from pathlib import Path

    from occ_exp.rollout.decode import DecodeCache

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("profile_step", scripts / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    assert "bench" in sys.modules  # it runs the bench's work

    read = []
    real_update = DecodeCache.update

    def counted(self, *a, **k):
        keys, values = real_update(self, *a, **k)
        read.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
        return keys, values

    monkeypatch.setattr(DecodeCache, "update", counted)
    policy, tok = tiny_policy
    b = engine(policy, tok, max_new_tokens=20, min_new_tokens=20).generate(PROMPTS, 2)
    prompt_len = b.input_ids.shape[1] - b.response_len
    assert sum(read) == profile_step.kv_bytes_read(prompt_len, 20, len(PROMPTS) * 2, policy.lm.config)
