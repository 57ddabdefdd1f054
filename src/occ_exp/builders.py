"""Turn a config into the objects a run needs (model, tokenizer, task, reward), and restore
them from a checkpoint. Kept apart from the trainer so the loop reads like the algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from occ_exp.config import ConfigError
from occ_exp.models.loading import CheckpointError, check_tokenizer, load_policy_folder, resolve_dtype


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
        from occ_exp.data.tasks import CountdownTask

        return CountdownTask.from_config(data_cfg)
    if data_cfg.path:
        from occ_exp.data.benchmarks import MathDataset

        return MathDataset(data_cfg.path, data_cfg.prompt_template, data_cfg.max_row_chars)
    raise ValueError(f"data={data_cfg.name!r} has no data.path; choose data=tiny or data=dapo_math, or set data.path")


def build(cfg, device: torch.device, log=print, with_warm_start: bool = True) -> Env:
    """`with_warm_start=False` skips the tiny model's warm start (a resumed run loads its checkpoint)."""
    from occ_exp.reward.rewards import build_reward

    task = build_task(cfg.data)
    if hasattr(task, "duplicates"):
        log(f"data: {len(task)} problems from {task.path} ({task.duplicates} duplicate rows dropped)")
    reward_fn = build_reward(cfg.data)
    dtype = resolve_dtype(cfg.model.dtype, device)
    report = None
    if cfg.model.path is None:
        from occ_exp.models.loading import build_tiny_policy
        from occ_exp.models.warmstart import warm_start

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
    from occ_exp.models.loading import load_pretrained

    m = cfg.model
    loaded = load_pretrained(m.path, num_mtp_layers=m.num_mtp_layers, gguf_file=m.gguf_file, device=device,
                             dtype=dtype, attn_implementation=m.attn_implementation, seed=cfg.seed,
                             cache_dir=cfg.paths.cache_dir, log=log)
    check_tokenizer(loaded.tokenizer, m.path)
    log(f"model: {m.path} ({loaded.source}), MTP layers loaded {loaded.loaded_mtp_layers}, "
        f"fresh {loaded.fresh_mtp_layers}")
    return Env(loaded.policy, loaded.tokenizer, task, reward_fn, None, loaded.fresh_mtp_layers)


def resume_from(ckpt: Path, policy, optimizer, scheduler, coef_states, prompts, gen, device, dist=None, guard=None,
                rollout=None) -> int:
    """Restore model, optimiser, scheduler, RNGs, data position, OCC state, the numerical guard's
    counters and the rollout engine's state (if it has one); returns the step. Under FSDP2
    (`dist.enabled`) rank 0 reads the files and the state is broadcast and sharded. A checkpoint of
    another model size is a CheckpointError naming the differences."""
    from occ_exp import distributed as D
    from occ_exp.checkpoint import load_trainer_state, set_rng_state

    dist = dist or D.Dist()
    state = load_trainer_state(ckpt)
    if dist.enabled:
        lm_sd = None
        if dist.is_main:
            loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config)
            lm_sd = loaded.lm.state_dict()
        D.load_full_model_state_dict(policy, lm_sd, dist)
    else:
        loaded, _ = load_policy_folder(ckpt / "model", expected_config=policy.config, device=device)
        policy.load_state_dict(loaded.state_dict())
    try:
        D.load_optimizer_state_dict(policy, optimizer, state["optimizer"], dist)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: its optimizer state does not fit this run's trainable parameters "
                              f"(written with another regime or model?): {e}") from None
    scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or []  # written by sharded runs; may hold fewer ranks than now
    set_rng_state(per_rank[dist.rank] if dist.rank < len(per_rank) else state["rng"])
    gen.set_state(state["generator"])
    prompts.load_state_dict(state["prompts"])
    for cs, s in zip(coef_states, state["coef_states"]):
        cs.load_state_dict(s)
    if guard is not None and "guard" in state:
        guard.load_state_dict(state["guard"])
    if rollout is not None and "rollout" in state and hasattr(rollout, "load_state_dict"):
        rollout.load_state_dict(state["rollout"])
    return int(state["step"])
