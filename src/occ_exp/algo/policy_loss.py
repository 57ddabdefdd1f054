"""Policy losses (registry) and loss aggregation.

A policy loss maps per-token log-probs under the current head, the rollout policy's log-probs,
advantages and the response mask to a scalar loss (to minimise) plus metrics. The MTP regimes
`policy` and `occ` put the MTP head's log-probs through the SAME function as the main head's.
"""

from __future__ import annotations

from typing import Callable

import torch

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, how: str, num_tokens: float | None = None,
              num_seqs: float | None = None) -> torch.Tensor:
    """token_mean: sum over all tokens / number of tokens (DAPO).
    seq_mean_token_mean: mean over sequences of per-sequence token means (GRPO).
    seq_mean_token_sum: mean over sequences of per-sequence token sums (Dr. GRPO).
    `num_tokens` / `num_seqs` override the denominators with global counts when a mini-batch is
    split into micro-batches or across ranks: the parts' losses then sum to the whole's."""
    m = mask.to(loss_tok.dtype)
    if how == "token_mean":
        denom = m.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
        return (loss_tok * m).sum() / denom
    if how == "seq_mean_token_mean":
        per_seq = (loss_tok * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean() if num_seqs is None else per_seq.sum() / max(float(num_seqs), 1.0)
    if how == "seq_mean_token_sum":
        per_seq = (loss_tok * m).sum(-1)
        return per_seq.mean() if num_seqs is None else per_seq.sum() / max(float(num_seqs), 1.0)
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {LOSS_AGGREGATIONS}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1.0))


def _clipped_surrogate(log_ratio, adv, mask, clip_low, clip_high, agg, num_tokens, num_seqs, clip_ratio_c=None):
    """Per token max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)), r = exp(log_ratio),
    aggregated; with `clip_ratio_c` (verl's dual-clip, null = off) tokens with A < 0 take
    min(that, -A * clip_ratio_c). Returns the loss and the clip fractions / mean ratio."""
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    pg1 = -a * ratio
    pg2 = -a * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_tok = torch.maximum(pg1, pg2)
    lower = None
    if clip_ratio_c is not None:
        pg3 = -a * clip_ratio_c
        lower = (a < 0) & (per_tok > pg3)
        per_tok = torch.where(a < 0, torch.minimum(per_tok, pg3), per_tok)
    loss = aggregate(per_tok, mask, agg, num_tokens, num_seqs)
    with torch.no_grad():
        stats = {"clipfrac": _masked_mean((pg2 > pg1).float(), mask), "ratio_mean": _masked_mean(ratio, mask)}
        if lower is not None:
            stats["clipfrac_lower"] = _masked_mean(lower.float(), mask)
    return loss, stats


@register_policy_loss("clipped")
def clipped(logp, logp_old, adv, mask, *, clip_low=0.2, clip_high=0.28, clip_ratio_c=None, agg="token_mean",
            num_tokens=None, num_seqs=None):
    """PPO/DAPO clipped surrogate with clip-higher: per token
    max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)),  r = exp(logp - logp_old);
    with dual-clip (`clip_ratio_c`, verl's vanilla loss) min(that, -A * clip_ratio_c) where A < 0.
    `adv` is per sequence [B] or per token [B, R]."""
    log_ratio = (logp - logp_old).clamp(-20.0, 20.0)
    loss, stats = _clipped_surrogate(log_ratio, adv, mask, clip_low, clip_high, agg, num_tokens, num_seqs, clip_ratio_c)
    with torch.no_grad():
        stats["approx_kl"] = _masked_mean(0.5 * log_ratio.pow(2), mask)
    return loss, stats


@register_policy_loss("gspo")
def gspo(logp, logp_old, adv, mask, *, clip_low=3e-4, clip_high=4e-4, clip_ratio_c=None, agg="seq_mean_token_mean",
         num_tokens=None, num_seqs=None):
    """GSPO: sequence-level ratio s = exp(mean_t(logp - logp_old)), clipped, with the per-token
    gradient of s_i routed through each token (token ratio = sg(s) * exp(logp - sg(logp)))."""
    m = mask.to(logp.dtype)
    seq_log_ratio = ((logp - logp_old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    log_s = seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()
    loss, stats = _clipped_surrogate(log_s, adv, mask, clip_low, clip_high, agg, num_tokens, num_seqs, clip_ratio_c)
    stats["approx_kl"] = float(0.5 * seq_log_ratio.detach().pow(2).mean())
    return loss, stats


def loss_options(algo_cfg) -> dict:
    """The policy loss's keyword arguments from `algorithm.*` (every caller passes the same ones)."""
    return {"clip_low": algo_cfg.clip_low, "clip_high": algo_cfg.clip_high,
            "clip_ratio_c": algo_cfg.clip_ratio_c, "agg": algo_cfg.loss_agg}
