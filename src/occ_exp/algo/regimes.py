"""Regimes: how the MTP term enters the learner's loss (registry).

    loss = L_RL(logp_main)  +  (1/K) * sum_k  lambda_k * L_MTP,k  [+ head_ce * (1/K) * sum_k CE_k(detached)]

A regime is one registered function `term(ctx, k) -> (lambda_k, L_MTP,k)` plus flags that decide
which gradients the MTP path may send into the shared parameters, and whether the heads train:

    detach_trunk  the MTP layers see the trunk's hidden states and the token embeddings detached
    detach_head   the MTP logits use the shared LM head's weight detached
    train_heads   the MTP layers' own parameters are optimised

| regime     | detach_trunk | detach_head | heads train | L_MTP                                  | lambda             |
|------------|--------------|-------------|-------------|----------------------------------------|--------------------|
| detach     | yes          | yes         | yes         | CE on rollout tokens                   | fixed `regime.coef` |
| detach_ref | yes          | no          | yes         | CE on rollout tokens                   | fixed `regime.coef` |
| frozen     | yes          | yes         | no          | CE (logged only)                       | 0                  |
| soft_ce    | yes          | yes         | yes         | CE against the main head's distribution | fixed `regime.coef` |
| ce         | no           | no          | yes         | CE on rollout tokens                   | fixed `regime.coef` |
| policy     | no           | no          | yes         | clipped policy loss of logp_mtp        | fixed `regime.coef` |
| occ        | no           | no          | yes         | clipped policy loss of logp_mtp        | `regime.estimator` (default lambda_plus * c_hat/(v2_hat+eps)) |

Under `detach` the MTP heads still train (their own parameters get the CE gradient) but no
gradient reaches the trunk or the LM head. `detach_ref` is the public reference implementation's
detach: with an untied LM head the MTP CE still trains the main model's output layer.
`regime.head_ce > 0` adds the detach regime's detached head CE on top of any regime (meant for
occ and policy: the heads stay useful drafters while the trunk sees only the regime's term); it
reruns only the MTP layers on the trunk outputs already computed. Adding a regime is one
function here and one YAML file in conf/regime/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from occ_exp.algo.coefficient import ESTIMATORS, CoefficientState
from occ_exp.algo.policy_loss import POLICY_LOSSES, aggregate


class HeadOutputs(Protocol):
    """What a regime reads from one forward of the policy (occ_exp.models.policy.PolicyOutput is
    one; the learner's whole-mini-batch view is another): per-token log-probs of the sampled
    tokens under the main head and each MTP head, their logits, and the trunk's outputs."""

    logp_main: torch.Tensor  # [B, R]
    logp_mtp: list[torch.Tensor]  # K x [B, R]
    logits_main: torch.Tensor | None  # [B, R, V]
    logits_mtp: list[torch.Tensor]  # K x [B, R, V]
    trunk: object  # what policy.mtp_forward reruns the MTP layers on (head_ce)


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

    out: HeadOutputs
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
    policy: object | None = None  # the MTPPolicy (head_ce reruns its MTP layers on `out.trunk`)
    probe: object | None = None  # diagnostics.GradientProbe on this mini-batch (estimator=exact)

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

    def soft_ce(self, k: int) -> torch.Tensor:
        """Cross-entropy of the depth-k head against the main head's (detached) next-token
        distribution at the same position: distillation on the policy instead of the sample."""
        p = self.out.logits_main.detach().float().softmax(-1)
        logq = self.out.logits_mtp[k].float().log_softmax(-1)
        return aggregate(-(p * logq).sum(-1), self.mask, "token_mean", self.num_tokens)

    def detached_ce(self, k: int) -> torch.Tensor:
        """The detach regime's CE for depth k (gradient only into the MTP layers), whatever this
        regime's own detach flags: the MTP layers are rerun on the detached trunk outputs."""
        if "detached_logp" not in self.cache:
            if self.policy is None:
                raise ValueError("regime.head_ce > 0 needs MTPContext.policy (to rerun the MTP layers)")
            _, self.cache["detached_logp"] = self.policy.mtp_forward(self.out.trunk, detach_trunk=True, detach_head=True)
        return aggregate(-self.cache["detached_logp"][k], self.mask, "token_mean", self.num_tokens)

    def occ_coef(self, k: int, loss_k: torch.Tensor | None = None) -> torch.Tensor:
        """lambda_k from `regime.estimator` on this mini-batch, through the smoothing / clip state
        (or the value the learner estimated on the whole mini-batch before splitting it)."""
        if self.coefs is not None:
            return self.coefs[k]
        r, a = self.regime_cfg, self.algo_cfg
        raw = ESTIMATORS[r.estimator](
            self.out.logp_main, self.out.logp_mtp[k], self.logp_old, self.mask, r.lambda_plus, r.eps,
            clip_low=a.clip_low, clip_high=a.clip_high, probe=self.probe, k=k, loss_k=loss_k,
        )
        return self.coef_states[k](raw)


# -- the regimes -------------------------------------------------------------------------------
@register_regime("detach", detach_trunk=True, detach_head=True)
def detach(ctx: MTPContext, k: int):
    """Industry default: heads learn CE on rollout tokens; nothing reaches trunk or LM head."""
    return ctx.fixed_coef(), ctx.ce(k)


@register_regime("detach_ref", detach_trunk=True, detach_head=False)
def detach_ref(ctx: MTPContext, k: int):
    """The reference code's detach: trunk states and embeddings detached, the LM head not."""
    return ctx.fixed_coef(), ctx.ce(k)


@register_regime("frozen", detach_trunk=True, detach_head=True, train_heads=False)
def frozen(ctx: MTPContext, k: int):
    """MTP heads not trained during RL (MiMo's practice); their CE is computed for logging only."""
    return torch.zeros(()), ctx.ce(k)


@register_regime("soft_ce", detach_trunk=True, detach_head=True)
def soft_ce(ctx: MTPContext, k: int):
    """Detached heads distilled on the policy's own next-token distribution."""
    return ctx.fixed_coef(), ctx.soft_ce(k)


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
    loss_k = ctx.policy_loss(k)
    return ctx.occ_coef(k, loss_k), loss_k


@dataclass
class MTPTerm:
    """loss == (1/K) sum_k coefs[k] * losses[k] + extra (the learner's gradient assembly relies on it)."""

    loss: torch.Tensor  # added to the RL loss
    coefs: list[float]
    losses: list[torch.Tensor]  # un-scaled L_k, with graph (diagnostics differentiate these)
    extra: torch.Tensor | None = None  # head_ce * (1/K) sum_k detached CE_k (heads only), or None


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
    total = total / max(K, 1)
    extra = None
    head_ce = float(getattr(ctx.regime_cfg, "head_ce", 0.0) or 0.0)
    if head_ce > 0 and K:
        extra = head_ce * sum(ctx.detached_ce(k) for k in range(K)) / K
        total = total + extra
    return MTPTerm(total, coefs, losses, extra)
