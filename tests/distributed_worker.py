"""The sharded learner on a fixed global batch, for tests/test_distributed.py.

    torchrun --nproc_per_node=2 -m tests.distributed_worker OUT.pt     # FSDP2 over gloo, 2 ranks
    (the test runs the same cases in its own process, without a process group, and compares)

Each case builds the same random tiny policy, feeds the same global RolloutBatch (every rank
takes its prompts' rows, compacts them so that the widths differ, and gathers), runs one
`learner_update` and returns its metrics and the full updated weights. Rank 0 also checks
rollout=hf generation under `full_params` (ranks decode different numbers of tokens) and a
checkpoint save / resume round trip."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from occ_exp import distributed as D
from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.regimes import get_regime
from occ_exp.config import register_configs
from occ_exp.rollout.base import RolloutBatch

CONF = Path(__file__).resolve().parents[1] / "conf"
N_PROMPTS, GROUP = 4, 4
SMALL = ["model.num_mtp_layers=2", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=2",
         f"algorithm.group_size={GROUP}", f"data.prompts_per_step={N_PROMPTS}", "algorithm.num_mini_batches=2",
         "optimizer.lr=1e-3", "optimizer.grad_clip=0.05", "trainer.device=cpu"]
# name -> overrides (max_tokens_per_micro_batch=40: 2-3 rows per micro-batch, counts differ per rank)
CASES = {
    "occ": ["regime=occ"],
    "occ_micro": ["regime=occ", "algorithm.max_tokens_per_micro_batch=40"],
    "occ_micro_ckpt": ["regime=occ", "algorithm.max_tokens_per_micro_batch=40", "model.gradient_checkpointing=true"],
    "ce_gspo_micro": ["regime=ce", "algorithm=gspo", "algorithm.max_tokens_per_micro_batch=40"],
}


def compose_cfg(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=SMALL + list(overrides))


def fixed_batch(vocab: int, P: int = 7, R: int = 9, seed: int = 0) -> RolloutBatch:
    """Left-padded prompts of varied length, right-padded responses of varied length."""
    g = torch.Generator().manual_seed(seed)
    B = N_PROMPTS * GROUP
    ids = torch.randint(4, vocab, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    plen = torch.randint(3, P + 1, (B,), generator=g)
    rlen = torch.randint(1, R + 1, (B,), generator=g)
    for i in range(B):
        attn[i, : P - plen[i]] = 0
        attn[i, P + rlen[i] :] = 0
    ids[attn == 0] = 0
    mask = attn[:, P:].bool()
    logp_old = (-3 * torch.rand(B, R, generator=g)).masked_fill(~mask, 0.0)
    b = RolloutBatch(ids, attn, mask, logp_old, P, [""] * B, torch.arange(N_PROMPTS).repeat_interleave(GROUP),
                     torch.zeros(B, dtype=torch.bool))
    b.advantages, b.rewards, b.logp_old = torch.randn(B, generator=g), torch.rand(B, generator=g), logp_old
    return b


def build(cfg, dist):
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.learner import build_optimizer

    policy, tok = build_tiny_policy(cfg.model, seed=0)
    D.apply_activation_checkpointing(policy, cfg.model.gradient_checkpointing)
    policy = D.shard_policy(policy, dist, cfg.distributed)
    regime = get_regime(cfg.regime.name)
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    return policy, tok, regime, opt, sched


def full_state(policy, dist) -> dict | None:
    if dist.enabled:
        return D.full_model_state_dict(policy, dist)
    return {k: v.detach().clone() for k, v in policy.lm.state_dict().items()}


def run_case(overrides: list[str], dist) -> dict:
    from occ_exp.learner import learner_update

    cfg = compose_cfg(overrides)
    policy, _, regime, opt, sched = build(cfg, dist)
    batch = fixed_batch(policy.config.vocab_size)
    if dist.world_size > 1:  # this rank's prompts (whole groups), compacted, then gathered
        mine = torch.arange(len(batch.texts)).view(N_PROMPTS, GROUP)[torch.tensor(dist.shard(list(range(N_PROMPTS))))]
        batch = dist.gather_rollouts(batch.select(mine.flatten()).compact(), N_PROMPTS // dist.world_size)
    coef_states = [CoefficientState() for _ in range(policy.num_mtp_layers)]
    metrics = learner_update(policy, opt, sched, regime, batch, cfg, coef_states, torch.Generator().manual_seed(0), dist)
    return {"metrics": metrics, "state": full_state(policy, dist)}


GEN_PROMPTS = ["12+3=", "7*8", "hello there", "a", "(4+5)*6", "x"]


def generate(policy, tok, dist, prompts, max_new: int) -> torch.Tensor:
    from occ_exp.rollout.hf import HFRollout

    cfg = compose_cfg([]).rollout
    with D.full_params(policy, dist):
        b = HFRollout(cfg, policy, tok, dist.device).generate(prompts, 1, greedy=True, max_new_tokens=max_new)
    return b.input_ids[:, b.prompt_len :]


def gen_plan(world: int) -> list[tuple[list[str], int]]:
    """Per rank: its prompts and how many tokens it decodes (different per rank)."""
    per = len(GEN_PROMPTS) // world
    return [(GEN_PROMPTS[r * per : (r + 1) * per], 5 + 4 * r) for r in range(world)]


def checkpoint_round_trip(dist, out_dir: Path) -> dict:
    """Train one step, save (rank 0 writes the HF folder and the full optimizer state), build a
    fresh sharded learner, resume from the folder, compare weights and optimizer state."""
    from occ_exp import builders
    from occ_exp.checkpoint import save_checkpoint
    from occ_exp.learner import NonFiniteGuard
    from occ_exp.models.loading import save_policy
    from occ_exp.rollout.base import Rollout
    from occ_exp.learner import learner_update

    cfg = compose_cfg(CASES["occ"])
    policy, tok, regime, opt, sched = build(cfg, dist)
    cs = [CoefficientState() for _ in range(policy.num_mtp_layers)]
    batch = fixed_batch(policy.config.vocab_size, seed=1)  # every rank holds the whole (gathered) batch
    learner_update(policy, opt, sched, regime, batch, cfg, cs, torch.Generator().manual_seed(0), dist)
    state = builders.capture_state(1, policy, opt, sched, cs, _NoPrompts(), torch.Generator(), dist,
                                   NonFiniteGuard(3), Rollout())
    model_sd = D.full_model_state_dict(policy, dist)
    if dist.is_main:
        save_checkpoint(out_dir, 1, partial(save_policy, policy, tok, state_dict=model_sd), state, "{}")
    dist.barrier()
    saved_w, saved_o = full_state(policy, dist), D.optimizer_state_dict(policy, opt, dist)

    policy2, _, _, opt2, sched2 = build(cfg, dist)
    step = builders.resume_from(out_dir / "checkpoints" / "step_000001", policy2, opt2, sched2, cs, _NoPrompts(),
                                torch.Generator(), dist.device, dist=dist).step
    w2, o2 = full_state(policy2, dist), D.optimizer_state_dict(policy2, opt2, dist)
    if not dist.is_main:
        return {}
    tensors = [(s[k][n], o2["state"][k][n]) for s in [saved_o["state"]] for k in s for n in s[k] if torch.is_tensor(s[k][n])]
    return {"step": step, "weights_equal": set(saved_w) == set(w2) and all(torch.equal(saved_w[k], w2[k]) for k in w2),
            "optimizer_equal": bool(tensors) and all(torch.equal(a, b) for a, b in tensors)}


class _NoPrompts:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist = D.init_distributed(compose_cfg([]).distributed, "cpu")
    results = {"world_size": dist.world_size, "cases": {n: run_case(o, dist) for n, o in CASES.items()}}
    policy, tok, *_ = build(compose_cfg(CASES["occ"]), dist)
    prompts, max_new = gen_plan(dist.world_size)[dist.rank]
    tokens = generate(policy, tok, dist, prompts, max_new)
    results["generated"] = dist.all_gather_object(tokens)
    results["resume"] = checkpoint_round_trip(dist, Path(out).parent / "ckpt")
    if dist.is_main:
        torch.save(results, out)
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
