"""The MTP coefficient lambda_t: the paper's Optimal Coefficient Calibration (OCC).

One step's improvement of the RL objective J under the update
theta <- theta + eta * (g_RL + lambda * g_MTP), for an L-smooth J, has the MTP-dependent part

    Delta_MTP(lambda) = eta * lambda * (1 - L*eta) * c  -  (L * eta^2 * lambda^2 / 2) * v2,
    c = <g_RL, g_MTP>,   v2 = ||g_MTP||^2   (on the parameters both losses share),

maximised at lambda* proportional to c / v2. OCC replaces the gradients by a log-probability
proxy computed from the current mini-batch at no extra cost (see `occ_coefficient`).

Estimator variants (`regime.estimator`, the registry `ESTIMATORS`), each one registered function:

| name             | lambda_t                                                                          |
|------------------|-----------------------------------------------------------------------------------|
| `paper`          | lambda_plus * sum(d_rl*d_mtp) / (sum(d_mtp^2) + eps) over the response mask (default) |
| `reference_code` | lambda_plus * mean over ALL B*R positions of d_rl*d_mtp / (d_mtp^2 + eps)           |
|                  | (the public reference implementation's form: heavy-tailed, diluted by padding)     |
| `paper_in_clip`  | `paper`, summed only over tokens whose main- and MTP-head ratios exp(logp - logp_old)|
|                  | lie inside the clip region [1 - clip_low, 1 + clip_high] (robust to badly wrong heads)|
| `exact`          | lambda_plus * c / (v2 + eps) from the exact gradients on the shared parameters     |
|                  | (the expensive oracle: two extra backward passes per mini-batch)                   |

Post-processing by `CoefficientState` (smoothing `regime.ema`, clipping `regime.clip`) applies to
every estimator; the paper uses neither.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Estimator = Callable[..., torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str):
    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return deco


_BIG = 1e100  # |d| cap in float64: squares and sums of up to 1e100 tokens stay finite


def proxy_terms(logp_main, logp_mtp, logp_old, mask):
    """(c_hat, v2_hat) of the paper's proxy, summed over the response mask, in float64.
    A non-finite per-token difference (a log-prob of -inf) counts as +-1e100, a NaN one as 0,
    so both sums are always finite. These are plain sums, so a data-parallel learner makes them
    global with one all-reduce (occ_exp.learner gathers the mini-batch's per-token terms first)."""
    m = mask.to(torch.float64)

    def diff(x):
        d = x.detach().to(torch.float64) - logp_old.to(torch.float64)
        return torch.nan_to_num(d, nan=0.0, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG) * m

    d_rl, d_mtp = diff(logp_main), diff(logp_mtp)
    return (d_rl * d_mtp).sum(), (d_mtp * d_mtp).sum()


@torch.no_grad()
def occ_coefficient(
    logp_main: torch.Tensor,
    logp_mtp: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    lambda_plus: float = 1.0,
    eps: float = 1e-8,
    **_,
) -> torch.Tensor:
    """OCC's lambda_t from one mini-batch (the paper's estimator, `regime.estimator=paper`; the
    keywords other estimators take are ignored).

        d_rl  = logp_main - logp_old,    d_mtp = logp_mtp - logp_old      (per response token)
        c_hat = sum(mask * d_rl * d_mtp),  v2_hat = sum(mask * d_mtp^2)
        lambda_t = lambda_plus * c_hat / (v2_hat + eps)

    All tensors are [batch, response_len]; `logp_main` and `logp_mtp` are log-probs of the
    sampled tokens under the current main head and the (aligned) MTP head, `logp_old` under the
    rollout policy. Computed without gradient, in float64; returns a 0-dim float32 tensor. The
    result may be negative (the MTP head moves against the policy's update), and is finite for
    every input: v2_hat >= 0 and eps > 0; log-probs in masked-out positions are ignored, and
    infinite differences inside the mask are capped (see `proxy_terms`), so a head that gives the
    sampled token probability 0 gets lambda ~ 0, the limit of c/v2 as d_mtp -> -inf. The value
    saturates at float32's largest finite number.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (logp_main.shape == logp_mtp.shape == logp_old.shape == mask.shape):
        raise ValueError(
            f"shapes differ: logp_main {tuple(logp_main.shape)}, logp_mtp {tuple(logp_mtp.shape)}, "
            f"logp_old {tuple(logp_old.shape)}, mask {tuple(mask.shape)}"
        )
    keep = mask.bool()
    zero = torch.zeros((), dtype=logp_main.dtype, device=logp_main.device)
    c_hat, v2_hat = proxy_terms(
        torch.where(keep, logp_main, zero), torch.where(keep, logp_mtp, zero), torch.where(keep, logp_old, zero), keep
    )
    lam = torch.nan_to_num(lambda_plus * c_hat / (v2_hat + eps), nan=0.0)
    f32 = torch.finfo(torch.float32).max
    return lam.clamp(-f32, f32).to(torch.float32)


# Every estimator: fn(logp_main, logp_mtp, logp_old, mask, lambda_plus, eps, **kw) -> 0-dim float32,
# without gradient. Keywords the learner passes: clip_low, clip_high (the policy loss's clip
# range), probe (a diagnostics.GradientProbe on this mini-batch's graph), k (the depth, 0-based)
# and loss_k (the depth's MTP loss, with graph). estimator=paper is occ_coefficient itself.
register_estimator("paper")(occ_coefficient)


@register_estimator("reference_code")
@torch.no_grad()
def _reference_code(logp_main, logp_mtp, logp_old, mask, lambda_plus, eps, **_):
    """The public reference implementation's form: the per-token ratio d_rl*d_mtp / (d_mtp^2 + eps)
    (0 outside the mask), averaged over all B*R positions, padding included. Each term is bounded
    by |d_rl| / (2*sqrt(eps)) but dominated by tokens where d_mtp is tiny, and the mean shrinks
    with the share of padding."""
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=logp_main.device)
    d_rl = torch.where(keep, logp_main.detach().double() - logp_old.double(), zero)
    d_mtp = torch.where(keep, logp_mtp.detach().double() - logp_old.double(), zero)
    ratio = d_rl * d_mtp / (d_mtp * d_mtp + eps)
    return (lambda_plus * ratio.mean()).to(torch.float32)


@register_estimator("paper_in_clip")
def _paper_in_clip(logp_main, logp_mtp, logp_old, mask, lambda_plus, eps, *, clip_low=0.2, clip_high=0.28, **_):
    """`paper`, with the sums restricted to tokens where both heads' importance ratios
    exp(logp - logp_old) lie in [1 - clip_low, 1 + clip_high]: the few tokens where the MTP head is
    badly wrong (|d_mtp| large, and outside the trust region anyway) no longer dominate v2_hat."""
    lo, hi = math.log1p(-clip_low), math.log1p(clip_high)
    keep = mask.bool()
    for logp in (logp_main, logp_mtp):
        d = (logp.detach() - logp_old).double()
        keep = keep & (d >= lo) & (d <= hi)
    return occ_coefficient(logp_main, logp_mtp, logp_old, keep, lambda_plus, eps)


@register_estimator("exact")
def _exact(logp_main, logp_mtp, logp_old, mask, lambda_plus, eps, *, probe=None, k=0, loss_k=None, **_):
    """lambda_plus * c / (v2 + eps) with c = <grad L_RL, grad L_MTP,k>, v2 = ||grad L_MTP,k||^2 on
    the shared parameters of this mini-batch (`diagnostics.GradientProbe`): the oracle the proxy
    stands in for, at the price of two extra backward passes per mini-batch."""
    if probe is None or loss_k is None:
        raise ValueError("regime.estimator=exact needs the learner's gradient probe and the MTP loss "
                         "(it runs inside occ_exp.trainer.learner_update); use estimator=paper elsewhere")
    t = probe.terms(k, loss_k)
    return torch.tensor(lambda_plus * t.corr / (t.penalty + eps), dtype=torch.float32)


class CoefficientState:
    """Optional post-processing of the raw estimate (both off in the paper): an exponential
    moving average (`ema` in [0, 1)) and a clip of |lambda| (`clip`). Its state is part of a
    checkpoint."""

    def __init__(self, ema: float = 0.0, clip: float | None = None):
        self.ema = ema
        self.clip = clip
        self.value: float | None = None

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        lam = raw
        if not torch.isfinite(raw):  # never let one bad estimate poison the EMA; the learner skips the update
            return raw
        if self.ema > 0:
            prev = lam if self.value is None else torch.as_tensor(self.value, dtype=lam.dtype)
            lam = self.ema * prev + (1 - self.ema) * lam
            self.value = float(lam)
        if self.clip is not None:
            lam = lam.clamp(-self.clip, self.clip)
        return lam

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("value")
