"""Regimes: how the MTP term enters the learner's loss (registry).

    loss = L_RL(logp_main)  +  (1/K) * sum_k  lambda_k * L_MTP,k

A regime is one registered function `term(ctx, k) -> (lambda_k, L_MTP,k)` plus two flags that
decide which gradients the MTP path may send into the shared parameters:

    detach_trunk  the MTP layers see the trunk's hidden states and the token embeddings detached
    detach_head   the MTP logits use the shared LM head's weight detached

| regime  | detach_trunk | detach_head | L_MTP                           | lambda                           |
|---------|--------------|-------------|---------------------------------|----------------------------------|
| detach  | yes          | yes         | CE on rollout tokens            | fixed `regime.coef`              |
| ce      | no           | no          | CE on rollout tokens            | fixed `regime.coef`              |
| policy  | no           | no          | clipped policy loss of logp_mtp | fixed `regime.coef`              |
| occ     | no           | no          | clipped policy loss of logp_mtp | lambda_plus * c_hat/(v2_hat+eps) |

Under `detach` the MTP heads still train (their own parameters get the CE gradient) but no
gradient reaches the trunk or the LM head. Adding a regime is one function here and one YAML
file in conf/regime/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from occ_exp.algo.coefficient import ESTIMATORS, CoefficientState
from occ_exp.algo.policy_loss import POLICY_LOSSES, aggregate
from occ_exp.models.policy import PolicyOutput

TermFn = Callable[["MTPContext", int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Regime:
    name: str
    term: TermFn
    detach_trunk: bool
    detach_head: bool
    train_heads: bool = True
    estimates_coef: bool = False  # lambda comes from the mini-batch's log-probs (occ)
    doc: str = ""


REGIMES: dict[str, Regime] = {}


def register_regime(name: str, *, detach_trunk: bool, detach_head: bool, train_heads: bool = True,
                    estimates_coef: bool = False):
    def deco(fn: TermFn) -> TermFn:
        REGIMES[name] = Regime(name, fn, detach_trunk, detach_head, train_heads, estimates_coef,
                               (fn.__doc__ or "").strip())
        return fn

    return deco


def get_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; choose one of {sorted(REGIMES)}")
    return REGIMES[name]


@dataclass
class MTPContext:
    """What a regime may look at on one mini-batch."""

    out: PolicyOutput
    logp_old: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, R]
    regime_cfg: object
    algo_cfg: object
    coef_states: list[CoefficientState]
    num_tokens: float | None = None  # global token count for token-mean aggregation
    num_seqs: float | None = None  # global sequence count for sequence-mean aggregation
    # lambda_k already estimated on the whole mini-batch (when it is split into micro-batches or
    # across ranks, see occ_exp.learner.estimate_coefs); used instead of estimating it here
    coefs: list[torch.Tensor] | None = None
    cache: dict = field(default_factory=dict)

    # -- building blocks ----------------------------------------------------------------------
    def fixed_coef(self) -> torch.Tensor:
        return torch.tensor(float(self.regime_cfg.coef))

    def ce(self, k: int) -> torch.Tensor:
        """Cross-entropy of the depth-k head on the sampled response tokens (token mean)."""
        return aggregate(-self.out.logp_mtp[k], self.mask, "token_mean", self.num_tokens)

    def policy_loss(self, k: int) -> torch.Tensor:
        """The RL objective's own clipped policy loss, with the depth-k head's log-probs."""
        a = self.algo_cfg
        fn = POLICY_LOSSES[a.policy_loss]
        loss, _ = fn(self.out.logp_mtp[k], self.logp_old, self.advantages, self.mask, clip_low=a.clip_low,
                     clip_high=a.clip_high, agg=a.loss_agg, num_tokens=self.num_tokens, num_seqs=self.num_seqs)
        return loss

    def occ_coef(self, k: int) -> torch.Tensor:
        if self.coefs is not None:
            return self.coefs[k]
        r = self.regime_cfg
        raw = ESTIMATORS[r.estimator](
            self.out.logp_main, self.out.logp_mtp[k], self.logp_old, self.mask, r.lambda_plus, r.eps, ctx=self, k=k
        )
        return self.coef_states[k](raw)


# -- the regimes -------------------------------------------------------------------------------
@register_regime("detach", detach_trunk=True, detach_head=True)
def detach(ctx: MTPContext, k: int):
    """Industry default: heads learn CE on rollout tokens; nothing reaches trunk or LM head."""
    return ctx.fixed_coef(), ctx.ce(k)


@register_regime("ce", detach_trunk=False, detach_head=False)
def ce(ctx: MTPContext, k: int):
    """The same CE, with gradients into the trunk (c is about 0: it only costs)."""
    return ctx.fixed_coef(), ctx.ce(k)


@register_regime("policy", detach_trunk=False, detach_head=False)
def policy(ctx: MTPContext, k: int):
    """The head's log-prob of the sampled token in the same clipped policy loss, fixed lambda."""
    return ctx.fixed_coef(), ctx.policy_loss(k)


@register_regime("occ", detach_trunk=False, detach_head=False, estimates_coef=True)
def occ(ctx: MTPContext, k: int):
    """Policy loss with lambda_t = lambda_plus * c_hat / (v2_hat + eps) from this mini-batch."""
    return ctx.occ_coef(k), ctx.policy_loss(k)


@dataclass
class MTPTerm:
    loss: torch.Tensor  # (1/K) sum_k lambda_k * L_k  (added to the RL loss)
    coefs: list[float]
    losses: list[torch.Tensor]  # un-scaled L_k, with graph (diagnostics differentiate these)


def mtp_term(regime: Regime, ctx: MTPContext) -> MTPTerm:
    K = len(ctx.out.logp_mtp)
    coefs, losses = [], []
    total = ctx.out.logp_main.new_zeros(())
    for k in range(K):
        lam, lk = regime.term(ctx, k)
        lam = lam.to(lk.device, lk.dtype)
        total = total + lam * lk
        coefs.append(float(lam))
        losses.append(lk)
    return MTPTerm(total / max(K, 1), coefs, losses)
