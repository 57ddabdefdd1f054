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
`regime.lambda_apply` says where lambda_k enters for the regimes whose L_MTP is the policy loss
(policy, occ): `loss` (default, the paper's equation: lambda_k * L(logp_mtp, A)) or `advantage`
(the reference code: L(logp_mtp, lambda_k * A)). The two are equal for lambda_k >= 0; for
lambda_k < 0 scaling the advantages flips their sign, so the clip acts on the other side of the
ratio (and verl's dual-clip `algorithm.clip_ratio_c` applies to the now-negative advantages),
whereas lambda_k * L keeps the clip of A and reverses the whole term. docs/fidelity.md compares them.

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
from occ_exp.algo.policy_loss import POLICY_LOSSES, aggregate, loss_options


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
    policy_term: bool = False  # L_MTP is the policy loss (lambda may scale the advantages instead)
    doc: str = ""


REGIMES: dict[str, Regime] = {}


def register_regime(name: str, *, detach_trunk: bool, detach_head: bool, train_heads: bool = True,
                    estimates_coef: bool = False, policy_term: bool = False):
    def deco(fn: TermFn) -> TermFn:
        REGIMES[name] = Regime(name, fn, detach_trunk, detach_head, train_heads, estimates_coef, policy_term,
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
    pad_to: int = 0  # padded response width the reference_code estimator averages over (rollout.max_new_tokens)

    # -- building blocks ----------------------------------------------------------------------
    def fixed_coef(self) -> torch.Tensor:
        return torch.tensor(float(self.regime_cfg.coef))

    def ce(self, k: int) -> torch.Tensor:
        """Cross-entropy of the depth-k head on the sampled response tokens (token mean)."""
        return aggregate(-self.out.logp_mtp[k], self.mask, "token_mean", self.num_tokens)

    @property
    def by_advantage(self) -> bool:
        """lambda scales the advantages of the MTP policy loss (`regime.lambda_apply=advantage`)."""
        return self.regime_cfg.lambda_apply == "advantage"

    def policy_loss(self, k: int, adv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The RL objective's own clipped policy loss, with the depth-k head's log-probs, against
        the MAIN head's logp_old; `adv_scale` multiplies the advantages (lambda_apply=advantage)."""
        a = self.algo_cfg
        adv = self.advantages if adv_scale is None else self.advantages * adv_scale.detach().to(self.advantages)
        loss, _ = POLICY_LOSSES[a.policy_loss](self.out.logp_mtp[k], self.logp_old, adv, self.mask, **loss_options(a),
                                              num_tokens=self.num_tokens, num_seqs=self.num_seqs)
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
            clip_low=a.clip_low, clip_high=a.clip_high, pad_to=self.pad_to, probe=self.probe, k=k, loss_k=loss_k,
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


@register_regime("policy", detach_trunk=False, detach_head=False, policy_term=True)
def policy(ctx: MTPContext, k: int):
    """The head's log-prob of the sampled token in the same clipped policy loss, fixed lambda."""
    lam = ctx.fixed_coef()
    return lam, ctx.policy_loss(k, lam if ctx.by_advantage else None)


@register_regime("occ", detach_trunk=False, detach_head=False, estimates_coef=True, policy_term=True)
def occ(ctx: MTPContext, k: int):
    """Policy loss with lambda_t = lambda_plus * c_hat / (v2_hat + eps) from this mini-batch."""
    if ctx.by_advantage:  # lambda first, then the loss with scaled advantages (the reference code)
        lam = ctx.occ_coef(k)
        return lam, ctx.policy_loss(k, lam)
    loss_k = ctx.policy_loss(k)
    return ctx.occ_coef(k, loss_k), loss_k


@dataclass
class MTPTerm:
    """loss == (1/K) sum_k weights[k] * losses[k] + extra (the learner's gradient assembly relies on
    it); weights == coefs under lambda_apply=loss, 1 under lambda_apply=advantage (lambda is then
    inside losses[k])."""

    loss: torch.Tensor  # added to the RL loss
    coefs: list[float]  # lambda_k as applied
    losses: list[torch.Tensor]  # L_k, with graph (diagnostics differentiate these)
    extra: torch.Tensor | None = None  # head_ce * (1/K) sum_k detached CE_k (heads only), or None
    weights: list[float] | None = None  # multipliers of losses[k] (None: coefs)

    def __post_init__(self):
        if self.weights is None:
            self.weights = list(self.coefs)


def mtp_term(regime: Regime, ctx: MTPContext) -> MTPTerm:
    K = len(ctx.out.logp_mtp)
    coefs, losses, weights = [], [], []
    in_advantage = regime.policy_term and ctx.by_advantage
    total = ctx.out.logp_main.new_zeros(())
    for k in range(K):
        lam, lk = regime.term(ctx, k)
        w = torch.ones((), device=lk.device, dtype=lk.dtype) if in_advantage else lam.to(lk.device, lk.dtype)
        total = total + w * lk
        coefs.append(float(lam))
        weights.append(float(w))
        losses.append(lk)
    total = total / max(K, 1)
    extra = None
    head_ce = float(getattr(ctx.regime_cfg, "head_ce", 0.0) or 0.0)
    if head_ce > 0 and K:
        extra = head_ce * sum(ctx.detached_ce(k) for k in range(K)) / K
        total = total + extra
    return MTPTerm(total, coefs, losses, extra, weights)
