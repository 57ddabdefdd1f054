"""`trainer.dry_run=true`: print the resolved plan of a run without loading any weights."""

from __future__ import annotations

from omegaconf import OmegaConf


def print_plan(cfg, console) -> dict:
    from occ_exp.config import validate

    validate(cfg)
    a, d, r = cfg.algorithm, cfg.data, cfg.rollout
    seqs = d.prompts_per_step * a.group_size
    plan = {
        "model": cfg.model.path or f"tiny (built in code, {cfg.model.arch.num_hidden_layers} layers, "
                                   f"hidden {cfg.model.arch.hidden_size})",
        "mtp_layers": cfg.model.num_mtp_layers,
        "regime": cfg.regime.name,
        "sequences_per_step": seqs,
        "max_response_tokens_per_step": seqs * r.max_new_tokens,
        "optimizer_steps_per_rollout": a.num_mini_batches * a.ppo_epochs,
        "total_steps": cfg.trainer.total_steps,
    }
    console.print(OmegaConf.to_yaml(cfg))
    for k, v in plan.items():
        console.print(f"{k:>32}: {v}")
    return plan
