"""Turn a config into the objects a run needs (model, tokenizer, task, reward), and move the
run's state into a checkpoint's TrainState and back (`capture_state` / `resume_from`, side by
side). Kept apart from the trainer so the loop reads like the algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from occ_exp import distributed as D
from occ_exp.checkpoint import TrainState
from occ_exp.config import ConfigError
from occ_exp.data.benchmarks import MathDataset
from occ_exp.data.tasks import CountdownTask
from occ_exp.models.loading import (CheckpointError, build_tiny_policy, check_tokenizer, load_policy_folder,
                                    load_pretrained, resolve_dtype, save_dtype)
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
                  wandb_id: str | None = None, full_model_state_dict: dict | None = None) -> TrainState:
    """The run's state after `step` (the weights are written apart, by the model writer). Under
    FSDP2 the optimizer state and every rank's RNGs are gathered: every rank calls this."""
    return TrainState(
        step=step, optimizer=D.optimizer_state_dict(policy, optimizer, dist), scheduler=scheduler.state_dict(),
        rng=rng_state(), generator=gen.get_state(), prompts=prompts.state_dict(),
        coef_states=[c.state_dict() for c in coef_states], guard=guard.state_dict(), rollout=rollout.state_dict(),
        rng_per_rank=D.rng_per_rank(dist), wandb_id=wandb_id,
        master_weights=master_weights(policy, full_model_state_dict) if dist.is_main else None,
    )


def master_weights(policy, full_state_dict: dict | None) -> dict | None:
    """The trained weights of `policy.lm` that its saved model folder would round (it is written in
    the source checkpoint's dtype, e.g. bf16, while the run trains float32), else None.
    `full_state_dict`: the gathered weights under FSDP2 (rank 0), None in one process."""
    sd = full_state_dict if full_state_dict is not None else policy.lm.state_dict()
    saved = save_dtype(policy)
    kept = {k: v.detach().cpu().clone() for k, v in sd.items() if v.is_floating_point() and v.dtype != saved}
    return kept or None


def resume_from(ckpt: Path, policy, optimizer, scheduler, coef_states, prompts, gen, device, dist=None, guard=None,
                rollout=None) -> TrainState:
    """Restore model, optimiser, scheduler, RNGs, data position, OCC state, the numerical guard's
    counters and the rollout engine's state (what `capture_state` saved); returns the TrainState. Under
    FSDP2 (`dist.enabled`) rank 0 reads the files and the state is broadcast and sharded. A
    checkpoint of another model size is a CheckpointError naming the differences."""
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
    try:
        D.load_optimizer_state_dict(policy, optimizer, state.optimizer, dist)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: its optimizer state does not fit this run's trainable parameters "
                              f"(written with another regime or model?): {e}") from None
    scheduler.load_state_dict(state.scheduler)
    per_rank = state.rng_per_rank or []  # written by sharded runs; may hold fewer ranks than now
    set_rng_state(per_rank[dist.rank] if dist.rank < len(per_rank) else state.rng)
    gen.set_state(state.generator)
    prompts.load_state_dict(state.prompts)
    for cs, s in zip(coef_states, state.coef_states):
        cs.load_state_dict(s)
    if guard is not None and state.guard is not None:
        guard.load_state_dict(state.guard)
    if rollout is not None and state.rollout is not None:
        rollout.load_state_dict(state.rollout)
    return state
