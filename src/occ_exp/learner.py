"""The pieces that let one optimiser step run on a mini-batch split into micro-batches (gradient
accumulation, dynamic batch by token count) and across ranks, with the same result as one
forward/backward on the whole mini-batch in one process.

Why the result is the same:
  - Losses: every part's loss is its sum over tokens (sequences) divided by the mini-batch's
    GLOBAL token (sequence) count (`Denominators`), so the parts' losses and gradients add up to
    the whole's; FSDP2 sums gradients over ranks (occ_exp.distributed.shard_policy).
  - lambda_t: OCC's estimate needs the whole mini-batch's log-probs before any backward. With
    more than one part, `estimate_coefs` collects logp_main, logp_mtp, logp_old and the mask of
    every part (a no-grad forward when there are several micro-batches, the training forward's
    own outputs otherwise), all-gathers them over ranks in the one-process row order, and runs
    the regime's estimator once on that whole-mini-batch view. The coefficient state (EMA) is
    stepped once per mini-batch, as in one process.
  - Metrics: sums (losses, the proxy terms c_hat and v2_hat) are summed over parts and ranks;
    masked means (entropy, acceptance, clip fraction, ...) are averaged with token weights, which
    is exact for token means (`MetricAccumulator`); a sequence-mean metric (GSPO's approx_kl) is
    token-weighted too, so it is close to, not equal to, the one-process value.
  - Gradient norms are global (occ_exp.distributed.grad_norm); an exact <g_RL, g_MTP> over FSDP2
    shards is the sum over ranks of the local shards' inner products (DTensor.full_tensor() or an
    all-reduce of the local partial sums), which is what grad_norm does for ||g||^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from occ_exp.algo.regimes import MTPContext
from occ_exp.models.policy import PolicyOutput
from occ_exp.rollout.base import RolloutBatch

# Metrics that are sums over the mini-batch (everything else is a token-weighted mean).
SUM_METRICS = ("train/loss", "train/rl_loss", "mtp/term", "mtp/corr_proxy", "mtp/penalty_proxy")


@dataclass(frozen=True)
class Denominators:
    """Global counts of a mini-batch: response tokens and sequences (over all parts and ranks)."""

    tokens: float
    seqs: float

    @classmethod
    def of(cls, mb: RolloutBatch, dist) -> "Denominators":
        return cls(dist.sum(mb.response_mask.sum()), dist.sum(mb.response_mask.shape[0]))


# -- dynamic micro-batches -------------------------------------------------------------------------
def micro_batch_indices(lengths: torch.Tensor, max_tokens: int, dist=None) -> list[torch.Tensor]:
    """Split rows into micro-batches of at most `max_tokens` padded tokens (rows x the longest
    row), rows sorted by length so that padding stays small; 0 = one micro-batch. A row longer
    than the budget is a micro-batch on its own. Under several ranks every rank gets the same
    number of micro-batches (the largest any rank needs; FSDP2's collectives need matching
    forward/backward calls): the costliest ones are halved until the counts agree."""
    lengths = lengths.cpu()  # indices live on the CPU; they select rows of any device's tensors
    n = lengths.numel()
    if max_tokens <= 0 or n == 0:
        parts = [torch.arange(n)]
    else:
        order = torch.argsort(lengths, descending=True, stable=True)
        parts, start = [], 0
        while start < n:
            longest = max(int(lengths[order[start]]), 1)
            rows = max(1, min(n - start, max_tokens // longest))
            parts.append(order[start : start + rows])
            start += rows
    target = dist.max(len(parts)) if dist is not None else len(parts)
    if target > n:
        raise ValueError(f"ranks need {target} micro-batches but this rank holds {n} rows; "
                         "balance the rows per rank (data.prompts_per_step, algorithm.num_mini_batches)")
    while len(parts) < target:
        cost = [len(p) * int(lengths[p].max()) if len(p) > 1 else -1 for p in parts]
        i = max(range(len(parts)), key=cost.__getitem__)
        a, b = parts[i].tensor_split(2)
        parts[i : i + 1] = [a, b]
    return parts


def row_lengths(batch: RolloutBatch) -> torch.Tensor:
    """Real tokens per row (prompt + response)."""
    return batch.attention_mask.sum(-1)


def split_micro_batches(mb: RolloutBatch, max_tokens: int, dist=None) -> list[tuple[torch.Tensor, RolloutBatch]]:
    """(row indices within mb, compacted micro-batch) pairs."""
    parts = micro_batch_indices(row_lengths(mb), max_tokens, dist)
    if len(parts) == 1:
        return [(parts[0], mb.compact())]
    return [(ix, mb.select(ix).compact()) for ix in parts]


# -- lambda_t on the whole mini-batch -------------------------------------------------------------
def _pad_cat(parts: list[torch.Tensor], width: int, order: torch.Tensor) -> torch.Tensor:
    x = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])
    out = torch.empty_like(x)
    out[order] = x
    return out


def whole_view(rows: list[torch.Tensor], outs: list[PolicyOutput], micro: list[RolloutBatch], dist):
    """logp_main, logp_mtp (K), logp_old and the mask of the whole mini-batch, in one-process row
    order, from per-micro-batch outputs (this rank) and an all-gather (all ranks)."""
    width = dist.max(max(m.response_len for m in micro))
    order = torch.cat(rows)
    K = len(outs[0].logp_mtp)
    fields = [
        [o.logp_main.detach().float() for o in outs],
        *[[o.logp_mtp[k].detach().float() for o in outs] for k in range(K)],
        [m.logp_old.float() for m in micro],
        [m.response_mask.float() for m in micro],
    ]
    local = torch.stack([_pad_cat([p.to(dist.device) for p in f], width, order.to(dist.device)) for f in fields])
    if dist.enabled and dist.world_size > 1:
        import torch.distributed as tdist

        parts = [torch.empty_like(local) for _ in range(dist.world_size)]
        tdist.all_gather(parts, local.contiguous())
        local = torch.cat(parts, dim=1)
    main, mtp, old, mask = local[0], list(local[1 : 1 + K]), local[1 + K], local[2 + K].bool()
    return main, mtp, old.masked_fill(~mask, 0.0), mask


@torch.no_grad()
def estimate_coefs(regime, rows, outs, micro, advantages, cfg, coef_states, dist) -> list[torch.Tensor]:
    """lambda_k for k = 1..K from the whole mini-batch (see the module docstring)."""
    main, mtp, old, mask = whole_view(rows, outs, micro, dist)
    view = PolicyOutput(logp_main=main, logp_mtp=mtp, logits_main=None, logits_mtp=[], trunk=None)
    ctx = MTPContext(view, old, advantages.to(main.device), mask, cfg.regime, cfg.algorithm, coef_states)
    return [regime.term(ctx, k)[0].detach() for k in range(len(mtp))]


# -- metrics ------------------------------------------------------------------------------------------
class MetricAccumulator:
    """Per-part metrics of one optimiser step -> the whole mini-batch's values on every rank."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.means: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict, weight: float) -> None:
        for k, v in metrics.items():
            v = float(v)
            if k.startswith(SUM_METRICS):
                self.sums[k] = self.sums.get(k, 0.0) + v
            else:
                self.means[k] = self.means.get(k, 0.0) + v * weight
        self.weight += weight

    def reduce(self, dist) -> dict[str, float]:
        keys = sorted(self.sums) + sorted(self.means)
        vals = [self.sums[k] for k in sorted(self.sums)] + [self.means[k] for k in sorted(self.means)] + [self.weight]
        t = dist.all_reduce(torch.tensor(vals, dtype=torch.float64, device=dist.device)).tolist()
        w = max(t[-1], 1e-12)
        n_sum = len(self.sums)
        return {k: (v if i < n_sum else v / w) for i, (k, v) in enumerate(zip(keys, t[:-1]))}
