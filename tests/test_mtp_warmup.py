"""The MTP warm-up of fresh layers: detached MTP cross-entropy that trains those layers only."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from occ_exp.data.tasks import CountdownTask
from occ_exp.models.loading import load_pretrained
from occ_exp.models.tiny import build_tokenizer
from occ_exp.warmstart import mtp_warmup
from occ_exp.rollout.hf import HFRollout
from tests.conftest import compose_cfg


@pytest.fixture
def fresh_policy(tmp_path):
    """A small plain Qwen2 folder (no MTP weights) loaded with two MTP layers: layer 0 taken from a
    first save, layer 1 fresh."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    lm.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    return load_pretrained(tmp_path / "plain", num_mtp_layers=2)


@pytest.mark.parametrize("source", ["reference", "rollouts"])
def test_warmup_trains_only_the_fresh_layers(fresh_policy, source):
    m = fresh_policy
    policy, tok = m.policy, m.tokenizer
    assert m.fresh_mtp_layers == [0, 1]
    cfg = compose_cfg(["model.mtp_warmup_steps=8", "model.mtp_warmup_lr=3e-3", "model.mtp_warmup_batch_size=8",
                       f"model.mtp_warmup_source={source}", "rollout.max_new_tokens=24",
                       "rollout.temperature=0.1", "algorithm.temperature=0.1"])  # a random model samples noise at T=1: nothing an MTP layer could learn in 8 steps
    before = {n: p.detach().clone() for n, p in policy.lm.named_parameters()}
    policy.mtp_layers[0].requires_grad_(False)  # as a regime that freezes heads would leave it
    rollout = HFRollout(cfg.rollout, policy, tok, "cpu")
    report = mtp_warmup(policy, tok, CountdownTask(), cfg.model, [1], "cpu", rollout=rollout, log=lambda _: None)
    assert report["source"] == source and report["steps"] == 8
    assert report["ce_last"] < report["ce_first"]
    changed = {n for n, p in policy.lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.mtp_layers.1.") for n in changed), sorted(changed)[:5]
    assert not any(p.requires_grad for p in policy.mtp_layers[0].parameters())  # flags restored
    assert all(p.grad is None for p in policy.parameters())


def test_reference_source_needs_a_task_with_solutions(fresh_policy):
    cfg = compose_cfg(["model.mtp_warmup_steps=1", "model.mtp_warmup_source=reference"])

    class NoSolutions:
        pass

    with pytest.raises(ValueError, match="no reference"):
        mtp_warmup(fresh_policy.policy, fresh_policy.tokenizer, NoSolutions(), cfg.model, [0], "cpu")


def test_rollout_warmup_prompts_are_formatted_as_in_training(fresh_policy):
    """A fresh head warmed up on the policy's own samples sees the prompts RL will use: wrapped in
    the tokenizer's chat template when it has one (model.chat_template), raw text otherwise."""
    m = fresh_policy
    tok = m.tokenizer
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    seen = []

    class Recorder(HFRollout):
        def generate(self, prompts, n, **kw):
            seen.append(list(prompts))
            return super().generate(prompts, n, **kw)

    for chat in (True, False):
        cfg = compose_cfg(["model.mtp_warmup_steps=1", "model.mtp_warmup_batch_size=2", "model.mtp_warmup_source=rollouts",
                           "rollout.max_new_tokens=4", f"model.chat_template={str(chat).lower()}"])
        seen.clear()
        mtp_warmup(m.policy, tok, CountdownTask(), cfg.model, [1], "cpu", rollout=Recorder(cfg.rollout, m.policy, tok, "cpu"),
                   log=lambda _: None)
        texts = [t for batch in seen for t in batch]  # the warm-up's batch and its health check's
        assert len(texts) >= 2
        wrapped = [t.startswith("<user>") and t.endswith("<assistant>") for t in texts]
        assert (all(wrapped) if chat else not any(wrapped)), texts
