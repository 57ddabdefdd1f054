"""Cheap per-step diagnostics of the MTP heads and of the OCC proxy.

`mtp_health` runs under no_grad on outputs the learner already has: per depth k,
- `mtp/loss_d{k}`: cross-entropy of the depth-k head on the sampled response tokens,
- `mtp/acceptance_d{k}`: expected speculative acceptance, the mean over response tokens of
  sum_v min(p_main(v), q_k(v)) with both distributions at the same target position,
- `mtp/top1_agree_d{k}`: how often the depth-k head's argmax equals the main head's,
- `mtp/corr_proxy_d{k}`, `mtp/penalty_proxy_d{k}`: the OCC proxy terms c_hat and v2_hat.
Depth-1 values are also logged without the suffix (`mtp/acceptance`, ...), and `mtp/loss` is the
mean over depths.
"""

from __future__ import annotations

import torch

from occ_exp.algo.coefficient import proxy_terms
from occ_exp.models.policy import PolicyOutput


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    m = m.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1.0))


@torch.no_grad()
def mtp_health(out: PolicyOutput, logp_old: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    metrics: dict[str, float] = {}
    p_main = out.logits_main.detach().float().softmax(-1)
    top_main = p_main.argmax(-1)
    ent = -(p_main * p_main.clamp_min(1e-30).log()).sum(-1)
    metrics["policy/entropy"] = _masked_mean(ent, mask)
    losses = []
    for k, (logits, logp) in enumerate(zip(out.logits_mtp, out.logp_mtp), start=1):
        q = logits.detach().float().softmax(-1)
        acc = torch.minimum(p_main, q).sum(-1)
        agree = (q.argmax(-1) == top_main).float()
        ce = _masked_mean(-logp.detach().float(), mask)
        c_hat, v2_hat = proxy_terms(out.logp_main, logp, logp_old, mask)
        metrics[f"mtp/loss_d{k}"] = ce
        metrics[f"mtp/acceptance_d{k}"] = _masked_mean(acc, mask)
        metrics[f"mtp/top1_agree_d{k}"] = _masked_mean(agree, mask)
        metrics[f"mtp/corr_proxy_d{k}"] = float(c_hat)
        metrics[f"mtp/penalty_proxy_d{k}"] = float(v2_hat)
        losses.append(ce)
    if losses:
        metrics["mtp/loss"] = sum(losses) / len(losses)
        for name in ("acceptance", "top1_agree", "corr_proxy", "penalty_proxy"):
            metrics[f"mtp/{name}"] = metrics[f"mtp/{name}_d1"]
    return metrics
