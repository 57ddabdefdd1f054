"""Diagnostics of the MTP heads and of the theory behind OCC.

Cheap, every step -- `mtp_health` runs under no_grad on outputs the learner already has: per depth k,
- `mtp/loss_d{k}`: cross-entropy of the depth-k head on the sampled response tokens,
- `mtp/acceptance_d{k}`: expected speculative acceptance, the mean over response tokens of
  sum_v min(p_main(v), q_k(v)) with both distributions at the same target position,
- `mtp/top1_agree_d{k}`: how often the depth-k head's argmax equals the main head's,
- `mtp/corr_proxy_d{k}`, `mtp/penalty_proxy_d{k}`: the OCC proxy terms c_hat and v2_hat.
Depth-1 values are also logged without the suffix (`mtp/acceptance`, ...), and `mtp/loss` is the
mean over depths.

Exact, on chosen steps (`diagnostics.exact_every=N`) -- `GradientProbe` takes, from the one graph
of a mini-batch, the gradient of the RL loss and of each depth's MTP loss (one `autograd.grad`
each, no second forward), and `exact_diagnostics` logs on the shared (trunk) parameters

    diag/corr        c  = <grad L_RL, grad L_MTP,k>
    diag/penalty     v2 = ||grad L_MTP,k||^2
    diag/cosine      c / (||grad L_RL|| * ||grad L_MTP,k||);  diag/g_rl_norm = ||grad L_RL||
    diag/lambda_star lambda_plus * c / (v2 + eps): the coefficient the proxy estimates
    diag/lambda_proxy, diag/corr_proxy, diag/penalty_proxy: the paper's proxy on the same mini-batch
    diag/lambda_<estimator>: the other cheap estimator variants there (depth 1), for comparison

(depth 1 unsuffixed, `_d{k}` per depth). The learner then applies the very gradient
`loss.backward()` would have given, assembled from those per-loss gradients, so a diagnosed
mini-batch costs one forward and two backward passes instead of one and one.

Which mini-batch. A step is diagnosed on its LAST mini-batch (of the last epoch). On the first
one the learner's weights are still the rollout weights, so logp_main == logp_old and the proxy's
c_hat is 0 by construction (the exact c is not); by the last one the policy has moved by
num_mini_batches - 1 updates, the setting in which OCC's proxy is meant to track c.

Taylor check (`diagnostics.taylor_check=true`): on the diagnosed mini-batch, apply the plain
gradient step theta - eta*(grad L_RL + u), u = (1/K) sum_k lambda_k grad L_MTP,k, on the shared
parameters, with and without u, and measure the change of the surrogate objective J = -L_RL:

    diag/delta_mtp_realised    J(theta - eta*(g + u)) - J(theta - eta*g)
    diag/delta_mtp_predicted   eta * <g, u>                               (first order: eta*lambda*c)
    diag/delta_mtp_predicted2  eta * <g, u> - eta^2 * (g + u/2)^T H u     (second order, exact Hessian-vector product)

With H = L*I the second-order line is the paper's eta*lambda*(1-L*eta)*c - (L*eta^2*lambda^2/2)*v2.
The step is SGD with eta = `diagnostics.taylor_eta` (default: optimizer.lr), not the optimiser's
Adam step: the theory is about the gradient direction. In float32 with a small eta the realised
change is at rounding level; use model.dtype=float64 on the tiny model for a clean check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from occ_exp.algo.coefficient import ESTIMATORS, occ_coefficient, proxy_terms
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


# -- exact gradients on one mini-batch ------------------------------------------------------------
Grads = list  # one tensor (or None: no path) per parameter


def _dot(a: Grads, b: Grads) -> float:
    """<a, b> over parameters, accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b) if x is not None and y is not None))


@dataclass
class ExactTerms:
    corr: float  # c  = <grad L_RL, grad L_MTP,k> on the shared parameters
    penalty: float  # v2 = ||grad L_MTP,k||^2
    rl_sq: float  # ||grad L_RL||^2


class GradientProbe:
    """Per-loss gradients from the graph of one mini-batch, computed on first request.

    `shared` are the parameters the RL objective and the MTP loss share (the trunk: embeddings,
    decoder, final norm, LM head), `heads` the MTP layers' own. Each request is one
    `autograd.grad` with retain_graph=True (no second forward). If any was made, `backward(term)`
    writes into `.grad` the gradient of `rl_loss + term.loss` assembled from them, instead of a
    third backward pass. Creating a probe costs nothing.
    """

    def __init__(self, rl_loss: torch.Tensor, shared, heads):
        self.rl_loss = rl_loss
        self.shared, self.heads = list(shared), list(heads)
        self._rl: Grads | None = None
        self._mtp: dict[int, Grads] = {}

    @property
    def used(self) -> bool:
        return self._rl is not None or bool(self._mtp)

    def _grad(self, loss: torch.Tensor | None, params) -> Grads:
        if loss is None or not loss.requires_grad or not params:
            return [None] * len(params)
        return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))

    def rl(self) -> Grads:
        """grad L_RL on the shared parameters."""
        if self._rl is None:
            self._rl = self._grad(self.rl_loss, self.shared)
        return self._rl

    def mtp(self, k: int, loss_k: torch.Tensor) -> Grads:
        """grad L_MTP,k on shared + head parameters (in that order)."""
        if k not in self._mtp:
            self._mtp[k] = self._grad(loss_k, self.shared + self.heads)
        return self._mtp[k]

    def terms(self, k: int, loss_k: torch.Tensor) -> ExactTerms:
        g_rl, g_k = self.rl(), self.mtp(k, loss_k)[: len(self.shared)]
        return ExactTerms(_dot(g_rl, g_k), _dot(g_k, g_k), _dot(g_rl, g_rl))

    def _mtp_parts(self, term) -> list[tuple[float, Grads]]:
        K = len(term.losses)
        return [(w / K, self.mtp(k, lk)) for k, (w, lk) in enumerate(zip(term.weights, term.losses))]

    def mtp_direction(self, term) -> Grads:
        """u = (1/K) sum_k lambda_k grad L_MTP,k on the shared parameters (the MTP part of the update)."""
        return _weighted_sum(self._mtp_parts(term), len(self.shared))

    def backward(self, term) -> None:
        """Set .grad to the gradient of rl_loss + term.loss (uses term.loss == mean_k weight_k L_k + extra)."""
        params = self.shared + self.heads
        parts = [(1.0, self.rl()), *self._mtp_parts(term)]
        if term.extra is not None:
            parts.append((1.0, self._grad(term.extra, params)))
        for p, g in zip(params, _weighted_sum(parts, len(params))):
            p.grad = None if g is None else g.detach().to(p.dtype)
        self._rl, self._mtp = None, {}  # free the per-loss gradients


def _weighted_sum(parts: list[tuple[float, Grads]], n: int) -> Grads:
    """sum_j w_j * grads_j over the first n parameters (None = zero)."""
    total: Grads = [None] * n
    for w, grads in parts:
        for i, g in enumerate(grads[:n]):
            if g is not None and w != 0:
                total[i] = g * w if total[i] is None else total[i] + g * w
    return total


def exact_diagnostics(probe: GradientProbe, term, ctx, diag_cfg, objective=None, lr: float = 0.0,
                      taylor: bool = True) -> dict[str, float]:
    """diag/* metrics of one mini-batch (see the module docstring). `objective()` recomputes the
    mini-batch's RL loss at the current weights (needed only for the Taylor check, which runs when
    diagnostics.taylor_check and `taylor`)."""
    t0 = time.perf_counter()
    r = ctx.regime_cfg
    metrics: dict[str, float] = {}
    rl_sq = 0.0
    for k, lk in enumerate(term.losses):
        t = probe.terms(k, lk)
        rl_sq = t.rl_sq
        denom = math.sqrt(t.rl_sq * t.penalty)
        c_hat, v2_hat = proxy_terms(ctx.out.logp_main, ctx.out.logp_mtp[k], ctx.logp_old, ctx.mask)
        lam_proxy = occ_coefficient(ctx.out.logp_main, ctx.out.logp_mtp[k], ctx.logp_old, ctx.mask, r.lambda_plus, r.eps)
        for name, v in (("corr", t.corr), ("penalty", t.penalty), ("cosine", t.corr / denom if denom > 0 else 0.0),
                        ("lambda_star", r.lambda_plus * t.corr / (t.penalty + r.eps)), ("lambda_proxy", float(lam_proxy)),
                        ("lambda_applied", term.coefs[k]), ("corr_proxy", float(c_hat)), ("penalty_proxy", float(v2_hat))):
            metrics[f"diag/{name}_d{k + 1}"] = v
            if k == 0:
                metrics[f"diag/{name}"] = v
    metrics["diag/g_rl_norm"] = math.sqrt(rl_sq)
    a = ctx.algo_cfg
    for name, fn in ESTIMATORS.items():  # the other cheap variants on the same mini-batch, for comparison
        if name not in ("paper", "exact"):
            lam = fn(ctx.out.logp_main, ctx.out.logp_mtp[0], ctx.logp_old, ctx.mask, r.lambda_plus, r.eps,
                     clip_low=a.clip_low, clip_high=a.clip_high, pad_to=ctx.pad_to)
            metrics[f"diag/lambda_{name}"] = float(lam)
    if diag_cfg.taylor_check and taylor:
        eta = diag_cfg.taylor_eta if diag_cfg.taylor_eta is not None else lr
        metrics.update(taylor_check(objective, probe.shared, probe.rl(), probe.mtp_direction(term), eta))
    metrics["diag/time_s"] = time.perf_counter() - t0
    return metrics


def _axpy(params, grads: Grads, alpha: float) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.add_(g.to(p.dtype), alpha=alpha)


def _combine(a: Grads, b: Grads, beta: float) -> Grads:
    """a + beta * b, parameter by parameter (None = zero)."""
    return [x if y is None else (beta * y if x is None else x + beta * y) for x, y in zip(a, b)]


def taylor_check(objective, params, g: Grads, u: Grads, eta: float) -> dict[str, float]:
    """Realised versus predicted MTP-induced change of J = -objective() under a gradient step of
    size eta on `params` (restored exactly afterwards); see the module docstring."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        try:
            _axpy(params, g, -eta)
            j_without = -float(objective())
            _axpy(params, u, -eta)
            j_with = -float(objective())
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    # Hessian-vector product H u (math attention: the fused CPU/GPU kernels have no double backward)
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(objective(), params, create_graph=True, allow_unused=True)
        gu = sum((gi * ui).sum() for gi, ui in zip(grads, u) if gi is not None and ui is not None)
        if torch.is_tensor(gu) and gu.requires_grad:
            hu = list(torch.autograd.grad(gu, params, allow_unused=True))
        else:
            hu = [None] * len(params)
    first = eta * _dot(g, u)
    second = first - eta**2 * _dot(_combine(g, u, 0.5), hu)
    return {"diag/delta_mtp_realised": j_with - j_without, "diag/delta_mtp_predicted": first,
            "diag/delta_mtp_predicted2": second, "diag/taylor_eta": eta}
