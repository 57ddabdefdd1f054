"""The sharded learner on a fixed global batch, for tests/test_distributed.py.

    torchrun --nproc_per_node=2 -m tests.distributed_worker OUT.pt     # FSDP2 over gloo, 2 ranks
    torchrun --nproc_per_node=2 -m tests.distributed_worker --checkpoint OUT.pt   # save, resume
    torchrun --nproc_per_node=1 -m tests.distributed_worker --resume CKPT OUT.pt  # resume elsewhere
    (the test runs the same cases in its own process, without a process group, and compares)

Each case builds the same random tiny policy, feeds the same global RolloutBatch (every rank
takes its prompts' rows, compacts them so that the widths differ, and gathers), runs one
`learner_update` and returns its metrics and the full updated weights. Rank 0 also checks
rollout=hf generation under `full_params` (ranks decode different numbers of tokens) and a
checkpoint save / resume round trip."""

from __future__ import annotations

import os
import sys
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


SOURCES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the dtype the model folder is saved in


def full_optimizer(policy, opt) -> dict:
    """The optimiser state keyed by parameter name, whole (rank 0; any world size, or one process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_checkpoint(dist, run_dir: Path, source: str) -> dict:
    """Train one step and save it with the trainer's own checkpoint writer (under a process group:
    the model folder from rank 0, the rest sharded by every rank). `source` bf16: a bf16 source
    trained in float32 (the folder is bf16, the float32 master weights go into the shards).
    Returns what a resume must give back: full weights, full optimiser state, every rank's RNG."""
    from occ_exp import builders
    from occ_exp.learner import NonFiniteGuard, learner_update
    from occ_exp.rollout.base import Rollout

    cfg = compose_cfg(CASES["occ"])
    policy, tok, regime, opt, sched = build(cfg, dist)
    policy.source_format["dtype"] = SOURCES[source]
    cs = [CoefficientState() for _ in range(policy.num_mtp_layers)]
    batch = fixed_batch(policy.config.vocab_size, seed=1)  # every rank holds the whole (gathered) batch
    learner_update(policy, opt, sched, regime, batch, cfg, cs, torch.Generator().manual_seed(0), dist)
    torch.manual_seed(100 + dist.rank)  # a different RNG state on each rank
    rng = dist.all_gather_object(torch.get_rng_state())
    builders.save_run_checkpoint(run_dir, 1, policy, tok, opt, sched, cs, _NoPrompts(), torch.Generator(), dist,
                                 NonFiniteGuard(3), Rollout(), None, "{}", 2)
    return {"weights": full_state(policy, dist), "optimizer": full_optimizer(policy, opt), "rng": rng}


def resume_sharded_checkpoint(dist, ckpt: Path) -> dict:
    """A fresh learner (on this run's ranks, or one process) resumed from `ckpt`: step, full
    weights, full optimiser state, every rank's RNG (rank 0's view)."""
    from occ_exp import builders

    policy, _, _, opt, sched = build(compose_cfg(CASES["occ"]), dist)
    torch.manual_seed(999)
    cs = [CoefficientState() for _ in range(policy.num_mtp_layers)]
    step = builders.resume_from(ckpt, policy, opt, sched, cs, _NoPrompts(), torch.Generator(), dist.device,
                                dist=dist).step
    return {"step": step, "weights": full_state(policy, dist), "optimizer": full_optimizer(policy, opt),
            "rng": dist.all_gather_object(torch.get_rng_state())}


def same(x, y) -> bool:
    """Nested dicts / lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def checkpoint_round_trip(dist, out_dir: Path) -> dict:
    """For each source dtype: save on this run's ranks, resume into a fresh sharded learner,
    compare weights, optimiser state and the per-rank RNGs bit for bit. Returns, per source, the
    checkpoint folder, what was saved and the comparison (rank 0)."""
    out = {}
    for source in SOURCES:
        run_dir = out_dir / source
        saved = save_sharded_checkpoint(dist, run_dir, source)
        ckpt = run_dir / "checkpoints" / "step_000001"
        back = resume_sharded_checkpoint(dist, ckpt)
        if dist.is_main:
            out[source] = {"ckpt": str(ckpt), "saved": saved, "step": back["step"],
                           "weights_equal": same(saved["weights"], back["weights"]),
                           "optimizer_equal": bool(saved["optimizer"]["state"]) and same(saved["optimizer"], back["optimizer"]),
                           "rng_equal": same(saved["rng"], back["rng"])}
    return out


class _NoPrompts:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def resume_main(ckpt: str, out: str) -> None:
    """`-m tests.distributed_worker --resume CKPT OUT.pt`: resume a checkpoint on this launch's ranks."""
    torch.set_num_threads(1)
    dist = D.init_distributed(compose_cfg([]).distributed, "cpu")
    back = resume_sharded_checkpoint(dist, Path(ckpt))
    if dist.is_main:
        torch.save({"world_size": dist.world_size, **back}, out)
    dist.close()


def checkpoint_main(out: str) -> None:
    """`-m tests.distributed_worker --checkpoint OUT.pt`: `checkpoint_round_trip` next to OUT.pt."""
    torch.set_num_threads(1)
    dist = D.init_distributed(compose_cfg([]).distributed, "cpu")
    result = checkpoint_round_trip(dist, Path(out).parent / "ckpt")
    if dist.is_main:
        torch.save(result, out)
    dist.close()


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist = D.init_distributed(compose_cfg([]).distributed, "cpu")
    results = {"world_size": dist.world_size, "cases": {n: run_case(o, dist) for n, o in CASES.items()}}
    policy, tok, *_ = build(compose_cfg(CASES["occ"]), dist)
    prompts, max_new = gen_plan(dist.world_size)[dist.rank]
    tokens = generate(policy, tok, dist, prompts, max_new)
    results["generated"] = dist.all_gather_object(tokens)
    if dist.is_main:
        torch.save(results, out)
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1] == "--resume":
        resume_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--checkpoint":
        checkpoint_main(sys.argv[2])
    else:
        main(sys.argv[1])
