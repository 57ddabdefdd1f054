"""DAPO's dynamic sampling (`algorithm.dynamic_sampling`): train only on prompt groups whose
rewards vary, sampling more groups until the batch is full.

A group whose G rewards are all equal has advantage 0 on every sample (GRPO normalises within
the group), so it adds nothing to the policy gradient and dilutes the token mean. DAPO drops
such groups and keeps generating (verl's recipe/dapo: `algorithm.filter_groups.enable`,
`.metric`, `.max_num_gen_batches`, `data.gen_batch_size`):

    filter = GroupFilter(target=data.prompts_per_step, group_size=G, max_batches=max_num_gen_batches)
    while filter.wants_more():
        batch  <- rollout of data.gen_batch_size prompts, G samples each, with rewards
        filter.add(batch, values)             # values: the filter metric of every sample
    batch = filter.result()                   # exactly `target` groups, in generation order

`values` is `algorithm.filter_metric`: `acc` (the verifier's score, DAPO's recipe) or `score`
(the shaped reward the advantages see: scale and overlong penalty included). When
`max_num_gen_batches` batches still hold fewer than `target` informative groups, the step trains
on those kept (rounded down to a multiple of `multiple`, so that mini-batches and ranks still
split whole groups evenly) and `rollout/gen_cap_hit` says so; when that leaves none, `result`
raises NoInformativeGroups, as verl stops (the data are all too easy or too hard for the policy).

The filter holds no state between steps, so a checkpoint needs nothing from it: the prompt
stream's position (advanced by every generation batch) and the RNGs make a resumed run draw the
same batches. Under several ranks the caller hands every rank the same gathered batch, so the
kept set is the same on every rank.
"""

from __future__ import annotations

import torch

import math

from occ_exp.rollout.base import RolloutBatch, concat_batches


class NoInformativeGroups(RuntimeError):
    """Dynamic sampling kept too few informative groups to train on within its generation cap."""


def informative_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] True where a group's values are not all equal (std > 0), compared exactly."""
    if values.numel() % group_size:
        raise ValueError(f"{values.numel()} values do not split into groups of {group_size}")
    v = values.view(-1, group_size)
    return v.max(1).values > v.min(1).values


class GroupFilter:
    """Collects the informative groups of one step's generation batches (see the module docstring)."""

    def __init__(self, target: int, group_size: int, max_batches: int, multiple: int = 1):
        if target < 1 or max_batches < 1 or multiple < 1:
            raise ValueError(f"target ({target}), max_batches ({max_batches}) and multiple ({multiple}) must be >= 1")
        self.target, self.group_size, self.max_batches, self.multiple = target, group_size, max_batches, multiple
        self.parts: list[RolloutBatch] = []
        self.kept = 0  # informative groups collected so far
        self.generated = 0  # groups generated so far
        self.batches = 0  # generation batches seen

    def wants_more(self) -> bool:
        return self.kept < self.target and self.batches < self.max_batches

    def add(self, batch: RolloutBatch, values: torch.Tensor) -> None:
        """One generation batch (rows in groups of `group_size`) and its filter values [rows]."""
        keep = informative_groups(values.detach().cpu(), self.group_size)
        self.batches += 1
        self.generated += keep.numel()
        if keep.any():
            groups = keep.nonzero().flatten()
            rows = (groups[:, None] * self.group_size + torch.arange(self.group_size)).flatten()
            self.parts.append(batch.select(rows.to(batch.input_ids.device)))
            self.kept += groups.numel()

    @property
    def cap_hit(self) -> bool:
        return self.kept < self.target

    def result(self) -> RolloutBatch:
        """The first `target` kept groups (or, at the cap, the kept ones rounded down to a
        multiple of `multiple`); NoInformativeGroups when that leaves none."""
        n = self.target if not self.cap_hit else self.kept // self.multiple * self.multiple
        if n == 0:
            raise NoInformativeGroups(
                f"dynamic sampling kept {self.kept} informative group(s) (need a multiple of {self.multiple}) in "
                f"{self.batches} generation batches of {self.generated // max(self.batches, 1)} prompts: every other "
                "group's rewards were all equal. Raise algorithm.max_num_gen_batches or data.gen_batch_size, or check "
                "that the data suit the policy")
        batch = concat_batches(self.parts)
        return batch.select(torch.arange(n * self.group_size, device=batch.input_ids.device))

    def metrics(self) -> dict[str, float]:
        trained = self.target if not self.cap_hit else self.kept // self.multiple * self.multiple
        return {"rollout/kept_groups": float(trained), "rollout/gen_batches": float(self.batches),
                "rollout/filtered_share": 1.0 - self.kept / max(self.generated, 1),
                "rollout/gen_cap_hit": float(self.cap_hit)}


def group_multiple(num_mini_batches: int, group_size: int, world_size: int) -> int:
    """The smallest group count step that splits into `num_mini_batches` mini-batches of whole
    groups whose rows split evenly over `world_size` ranks."""
    return num_mini_batches * (world_size // math.gcd(group_size, world_size))
