"""Rollout engines behind one interface (occ_exp.rollout.base.Rollout). Importing the package
registers every engine; rollout=vllm imports vLLM itself only when its engine starts."""

from occ_exp.rollout import hf, vllm  # noqa: F401  (engines register themselves on import)
from occ_exp.rollout.base import ROLLOUTS, Rollout


def build_rollout(cfg, policy, tokenizer, device) -> Rollout:
    if cfg.name not in ROLLOUTS:
        raise ValueError(f"rollout={cfg.name!r} is not available; choose one of {sorted(ROLLOUTS)}")
    return ROLLOUTS[cfg.name](cfg, policy, tokenizer, device)
