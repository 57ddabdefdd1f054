"""Turn a config into the objects a run needs (model, tokenizer, task, reward), and restore
them from a checkpoint. Kept apart from the trainer so the loop reads like the algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from occ_exp.models.loading import load_policy_folder, resolve_dtype


@dataclass
class Env:
    policy: object
    tokenizer: object
    task: object
    reward_fn: object
    warmstart: dict | None = None
    fresh_mtp_layers: list[int] = field(default_factory=list)  # MTP layers not in the checkpoint


def build_task(data_cfg):
    if data_cfg.name == "tiny":
        from occ_exp.data.tasks import CountdownTask

        return CountdownTask(data_cfg.num_numbers, data_cfg.max_number, data_cfg.min_target, data_cfg.max_target,
                             data_cfg.test_fraction)
    raise ValueError(f"data={data_cfg.name!r} is not available in this build; choose data=tiny")


def build(cfg, device: torch.device, log=print) -> Env:
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
        if cfg.model.warmstart.enabled:
            report = warm_start(policy, tokenizer, task, cfg.model, cfg.data, cfg.paths.cache_dir, device,
                                reward_fn, log=log)
        policy.to(dtype=dtype)
        return Env(policy, tokenizer, task, reward_fn, report)
    from occ_exp.models.loading import load_pretrained

    m = cfg.model
    loaded = load_pretrained(m.path, num_mtp_layers=m.num_mtp_layers, gguf_file=m.gguf_file, device=device,
                             dtype=dtype, attn_implementation=m.attn_implementation, seed=cfg.seed,
                             cache_dir=cfg.paths.cache_dir, log=log)
    log(f"model: {m.path} ({loaded.source}), MTP layers loaded {loaded.loaded_mtp_layers}, "
        f"fresh {loaded.fresh_mtp_layers}")
    if loaded.tokenizer is None:
        raise ValueError(f"model.path={m.path}: the folder has no tokenizer files")
    if m.gradient_checkpointing:
        loaded.policy.lm.gradient_checkpointing_enable()
    return Env(loaded.policy, loaded.tokenizer, task, reward_fn, None, loaded.fresh_mtp_layers)


def resume_from(ckpt: Path, policy, optimizer, scheduler, coef_states, prompts, gen, device) -> int:
    """Restore model, optimiser, scheduler, RNGs, data position and OCC state; returns the step."""
    from occ_exp.checkpoint import load_trainer_state, set_rng_state

    loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config, device=device)
    policy.load_state_dict(loaded.state_dict())
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    gen.set_state(state["generator"])
    prompts.load_state_dict(state["prompts"])
    for cs, s in zip(coef_states, state["coef_states"]):
        cs.load_state_dict(s)
    return int(state["step"])
