"""Turn a config into the objects a run needs (model, tokenizer, task, reward), and move the
run's state into a checkpoint's TrainState and back (`capture_state` / `resume_from`, side by
side). Kept apart from the trainer so the loop reads like the algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from occ_exp import distributed as D
from occ_exp.checkpoint import TrainState, manifest_entry, save_checkpoint
from occ_exp.config import ConfigError
from occ_exp.data.benchmarks import MathDataset
from occ_exp.data.tasks import CountdownTask
from occ_exp.models.loading import (CheckpointError, build_tiny_policy, check_tokenizer, load_policy_folder,
                                    load_pretrained, resolve_dtype, save_dtype, save_policy)
from occ_exp.reward.rewards import build_reward
from occ_exp.runtime import rng_state, set_rng_state
from occ_exp.warmstart import warm_start


@dataclass
class Env:
    policy: object
    tokenizer: object
    task: object
    reward_fn: object
    warmstart: dict | None = None
    fresh_mtp_layers: list[int] = field(default_factory=list)  # MTP layers not in the checkpoint


def build_task(data_cfg):
    """data=tiny: the procedural countdown task; a data config with a `path`: a JSONL file of math
    problems (data=dapo_math), deduplicated, with `prompt_template` around each problem."""
    if data_cfg.name == "tiny":
        return CountdownTask.from_config(data_cfg)
    if data_cfg.path:
        return MathDataset(data_cfg.path, data_cfg.prompt_template, data_cfg.max_row_chars)
    raise ValueError(f"data={data_cfg.name!r} has no data.path; choose data=tiny or data=dapo_math, or set data.path")


def build(cfg, device: torch.device, log=print, with_warm_start: bool = True) -> Env:
    """`with_warm_start=False` skips the tiny model's warm start (a resumed run loads its checkpoint)."""
    task = build_task(cfg.data)
    if hasattr(task, "duplicates"):
        log(f"data: {len(task)} problems from {task.path} ({task.duplicates} duplicate rows dropped)")
    reward_fn = build_reward(cfg.data)
    dtype = resolve_dtype(cfg.model.dtype, device)
    report = None
    if cfg.model.path is None:
        policy, tokenizer = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)
        policy.to(device)
        if cfg.model.warmstart.enabled and with_warm_start:
            if cfg.data.name != "tiny":
                raise ConfigError(f"model=tiny warm-starts on the countdown task, not data={cfg.data.name}; use "
                                 "data=tiny, a checkpoint (model.path=...), or model.warmstart.enabled=false")
            report = warm_start(policy, tokenizer, task, cfg.model, cfg.data, cfg.paths.cache_dir, device,
                                reward_fn, log=log)
        policy.to(dtype=dtype)
        return Env(policy, tokenizer, task, reward_fn, report)
    m = cfg.model
    loaded = load_pretrained(m.path, num_mtp_layers=m.num_mtp_layers, gguf_file=m.gguf_file, device=device,
                             dtype=dtype, attn_implementation=m.attn_implementation, seed=cfg.seed,
                             cache_dir=cfg.paths.cache_dir, log=log)
    check_tokenizer(loaded.tokenizer, m.path)
    log(f"model: {m.path} ({loaded.source}), MTP layers loaded {loaded.loaded_mtp_layers}, "
        f"fresh {loaded.fresh_mtp_layers}")
    return Env(loaded.policy, loaded.tokenizer, task, reward_fn, None, loaded.fresh_mtp_layers)


def capture_state(step: int, policy, optimizer, scheduler, coef_states, prompts, gen, dist, guard, rollout,
                  wandb_id: str | None = None) -> TrainState:
    """The run's state after `step` (the weights are written apart, by the model writer). Under a
    process group the optimizer state, master weights and per-rank RNGs are not in it: every rank
    writes its shards of them (`write_sharded_state`), and `sharded_state` names their folder."""
    sharded = dist.enabled
    return TrainState(
        step=step, optimizer=None if sharded else D.optimizer_state_dict(policy, optimizer, dist),
        scheduler=scheduler.state_dict(), rng=rng_state(), generator=gen.get_state(), prompts=prompts.state_dict(),
        coef_states=[c.state_dict() for c in coef_states], guard=guard.state_dict(), rollout=rollout.state_dict(),
        wandb_id=wandb_id, master_weights=None if sharded else master_weights(policy),
        sharded_state=SHARDED_DIR if sharded else None,
    )


SHARDED_DIR = "dcp"  # the checkpoint's subfolder of sharded trainer state (torch.distributed.checkpoint)


def master_weights(policy) -> dict | None:
    """The trained weights of `policy.lm` that its saved model folder would round (it is written in
    the source checkpoint's dtype, e.g. bf16, while the run trains float32), else None."""
    saved = save_dtype(policy)
    kept = {k: v.detach().cpu().clone() for k, v in policy.lm.state_dict().items()
            if v.is_floating_point() and v.dtype != saved}
    return kept or None


def write_sharded_state(folder: Path | None, policy, optimizer, dist) -> dict:
    """Collective: every rank writes its shards of the optimizer state, the master weights (the
    float weights the model folder's dtype would round) and its RNGs into `<folder>/dcp` (`folder`
    is rank 0's; the others pass None). The files are then hashed, split over the ranks; returns
    their manifest entries (relative to `folder`), complete on rank 0."""
    folder = Path(dist.broadcast_object(str(folder) if folder is not None else None))
    saved = save_dtype(policy)
    D.save_sharded_state(folder / SHARDED_DIR, policy, optimizer, dist,
                         keep_weight=lambda t: t.is_floating_point() and t.dtype != saved)
    files = sorted(p for p in (folder / SHARDED_DIR).rglob("*") if p.is_file())
    mine = {str(p.relative_to(folder)): manifest_entry(p) for p in files[dist.rank :: dist.world_size]}
    return {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}


def save_run_checkpoint(run_dir: Path, step: int, policy, tokenizer, optimizer, scheduler, coef_states, prompts, gen,
                        dist, guard, rollout, wandb_id: str | None, config_yaml: str, keep_last: int) -> Path | None:
    """Checkpoint step `step` (collective); returns the folder on rank 0. One process: today's
    format (everything in trainer_state.pt). Under a process group: rank 0 writes the model folder
    (gathered a tensor at a time, in the folder's dtype) and the small trainer_state.pt, and every
    rank writes its shards of the rest (`write_sharded_state`)."""
    state = capture_state(step, policy, optimizer, scheduler, coef_states, prompts, gen, dist, guard, rollout, wandb_id)
    model_sd = D.full_model_state_dict(policy, dist, dtype=save_dtype(policy))  # collective; None in one process
    shards = partial(write_sharded_state, policy=policy, optimizer=optimizer, dist=dist) if dist.enabled else None
    path = None
    if dist.is_main:
        path = save_checkpoint(run_dir, step, partial(save_policy, policy, tokenizer, state_dict=model_sd), state,
                               config_yaml, keep_last, write_shards=shards)
    elif shards is not None:
        shards(None)
    dist.barrier()
    return path


def resume_from(ckpt: Path, policy, optimizer, scheduler, coef_states, prompts, gen, device, dist=None, guard=None,
                rollout=None) -> TrainState:
    """Restore model, optimiser, scheduler, RNGs, data position, OCC state, the numerical guard's
    counters and the rollout engine's state (what `capture_state` saved); returns the TrainState. Under
    FSDP2 (`dist.enabled`) rank 0 reads the model folder and it is broadcast and sharded. The
    sharded trainer state of a checkpoint written under a process group (`<ckpt>/dcp`) is read by
    every rank, resharded to this run's ranks or to one process; ranks the writing run did not have
    take rank 0's RNG state. A checkpoint of another model size is a CheckpointError naming the
    differences."""
    dist = dist or D.Dist()
    state = TrainState.load(ckpt)
    if dist.enabled:
        lm_sd = None
        if dist.is_main:
            loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config)
            lm_sd = {**loaded.lm.state_dict(), **(state.master_weights or {})}
        D.load_full_model_state_dict(policy, lm_sd, dist)
    else:
        loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config, device=device)
        policy.load_state_dict(loaded.state_dict())
        if state.master_weights:
            policy.lm.load_state_dict(state.master_weights, strict=False)
    rng = None
    try:  # a sharded checkpoint (any number of writing ranks) loads into any number of ranks or one process
        if state.sharded_state:
            rng = D.load_sharded_state(ckpt / state.sharded_state, policy, optimizer, dist)
        else:
            D.load_optimizer_state_dict(policy, optimizer, state.optimizer, dist)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: its optimizer state does not fit this run's trainable parameters "
                              f"(written with another regime or model?): {e}") from None
    scheduler.load_state_dict(state.scheduler)
    per_rank = state.rng_per_rank or []  # written by sharded runs before `sharded_state`
    if rng is None:
        rng = per_rank[dist.rank] if dist.rank < len(per_rank) else state.rng
    set_rng_state(rng)
    gen.set_state(state.generator)
    prompts.load_state_dict(state.prompts)
    for cs, s in zip(coef_states, state.coef_states):
        cs.load_state_dict(s)
    if guard is not None and state.guard is not None:
        guard.load_state_dict(state.guard)
    if rollout is not None and state.rollout is not None:
        rollout.load_state_dict(state.rollout)
    return state
