"""Advantage estimators (registry). Each maps rewards [N*G] grouped by prompt to per-sequence
advantages [N*G]; the trainer broadcasts them over response tokens."""

from __future__ import annotations

from typing import Callable

import torch

AdvantageFn = Callable[[torch.Tensor, int, float], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size).to(torch.float32)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO / DAPO: (r - mean_group) / (std_group + eps); all-equal groups get 0."""
    r = _groups(rewards, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=True) + eps)
    return adv.flatten()


@register_advantage("drgrpo")
def drgrpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: r - mean_group (no std normalisation)."""
    r = _groups(rewards, group_size)
    return (r - r.mean(1, keepdim=True)).flatten()


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """RLOO: r - mean of the other G-1 rewards of the group."""
    r = _groups(rewards, group_size)
    loo = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - loo).flatten()
