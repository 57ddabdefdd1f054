"""Turn a config into the objects a run needs (model, tokenizer, task, reward), and restore
them from a checkpoint. Kept apart from the trainer so the loop reads like the algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from occ_exp.models.loading import CheckpointError, check_tokenizer, load_policy_folder, resolve_dtype


@dataclass
class Env:
    policy: object
    tokenizer: object
    task: object
    reward_fn: object
    warmstart: dict | None = None


def build_task(data_cfg):
    if data_cfg.name == "tiny":
        from occ_exp.data.tasks import CountdownTask

        return CountdownTask(data_cfg.num_numbers, data_cfg.max_number, data_cfg.min_target, data_cfg.max_target,
                             data_cfg.test_fraction)
    raise ValueError(f"data={data_cfg.name!r} is not available in this build; choose data=tiny")


def build(cfg, device: torch.device, log=print, with_warm_start: bool = True) -> Env:
    """`with_warm_start=False` skips the tiny model's warm start (a resumed run loads its checkpoint)."""
    from occ_exp.reward.rewards import build_reward

    task = build_task(cfg.data)
    reward_fn = build_reward(cfg.data)
    dtype = resolve_dtype(cfg.model.dtype, device)
    report = None
    if cfg.model.path is None:
        from occ_exp.models.loading import build_tiny_policy
        from occ_exp.models.warmstart import warm_start

        policy, tokenizer = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)
        policy.to(device)
        if cfg.model.warmstart.enabled and with_warm_start:
            report = warm_start(policy, tokenizer, task, cfg.model, cfg.data, cfg.paths.cache_dir, device,
                                reward_fn, log=log)
        policy.to(dtype=dtype)
    else:
        policy, tokenizer = load_policy_folder(cfg.model.path, device=device, dtype=dtype,
                                               num_mtp_layers=cfg.model.num_mtp_layers)
        check_tokenizer(tokenizer, cfg.model.path)
    return Env(policy, tokenizer, task, reward_fn, report)


def resume_from(ckpt: Path, policy, optimizer, scheduler, coef_states, prompts, gen, device, guard=None,
                rollout=None) -> int:
    """Restore model, optimiser, scheduler, RNGs, data position, OCC state, the numerical guard's
    counters and the rollout engine's state (if it has one); returns the step. A checkpoint of
    another model size is a CheckpointError naming the differences."""
    from occ_exp.checkpoint import load_trainer_state, set_rng_state

    loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config, device=device)
    policy.load_state_dict(loaded.state_dict())
    state = load_trainer_state(ckpt)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: its optimizer state does not fit this run's trainable parameters "
                              f"(written with another regime or model?): {e}") from None
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    gen.set_state(state["generator"])
    prompts.load_state_dict(state["prompts"])
    for cs, s in zip(coef_states, state["coef_states"]):
        cs.load_state_dict(s)
    if guard is not None and "guard" in state:
        guard.load_state_dict(state["guard"])
    if rollout is not None and "rollout" in state and hasattr(rollout, "load_state_dict"):
        rollout.load_state_dict(state["rollout"])
    return int(state["step"])
