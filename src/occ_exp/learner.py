"""The learner phase of one step: from one rollout batch (rewards in) to the optimiser steps done.

    compute_advantages(batch, rewards)      overlong shaping, group-normalised advantages
    set_logp_old(policy, batch)             logp_old: the learner's forward, or the sampler's
    learner_update(policy, ..., batch)      ppo_epochs x num_mini_batches optimiser steps:
      optimizer_step(u, batch, idx)           one mini-batch (this rank's equal slice of it)
        split_micro_batches                     micro-batches of at most max_tokens_per_micro_batch tokens
        lambda_before_backward                  OCC's lambda_t on the whole mini-batch (split only)
        micro_batch_backward                    forward, RL loss + the regime's MTP term, backward
          run_exact_diagnostics                   exact c and v2, Taylor check (diagnosed steps)
          backward                                loss.backward(), or the probe's per-loss gradients
        clip_gradients, apply_or_skip           global norms, clip; step or skip (NonFiniteGuard)

lambda_t's path: algo.regimes.mtp_term -> the regime's term (occ) -> MTPContext.occ_coef -> the
estimator (algo.coefficient.occ_coefficient itself for estimator=paper).

Splitting a mini-batch into micro-batches (gradient accumulation, dynamic batch by token count)
and across ranks gives the same result as one forward/backward on the whole mini-batch in one
process.

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

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from occ_exp.algo.advantages import ADVANTAGES
from occ_exp.algo.coefficient import PER_MICRO_BATCH
from occ_exp.algo.policy_loss import POLICY_LOSSES, loss_options
from occ_exp.algo.regimes import MTPContext, MTPTerm, Regime, mtp_term
from occ_exp.diagnostics import GradientProbe, exact_diagnostics, mtp_health
from occ_exp.distributed import Dist, clip_grads, global_norm, grad_norm
from occ_exp.models.policy import PolicyOutput
from occ_exp.reward.rewards import scale_reward
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


def split_micro_batches(mb: RolloutBatch, max_tokens: int, dist=None, rows: int = 0) -> list[tuple[torch.Tensor, RolloutBatch]]:
    """(row indices within mb, compacted micro-batch) pairs: `rows` consecutive rows each
    (trainer.micro_batch_size, verl's ppo_micro_batch_size_per_gpu), else by token budget."""
    parts = (list(torch.arange(mb.input_ids.shape[0]).split(rows)) if rows
             else micro_batch_indices(row_lengths(mb), max_tokens, dist))
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
    if dist.multi_rank:
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


# -- the numerical guard -------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Too many optimiser updates in a row had a non-finite loss, gradient norm or lambda."""


class NonFiniteGuard:
    """Numerical guard of the learner: an optimiser update whose loss, gradient norm or MTP
    coefficient is not finite is skipped (weights, optimiser, scheduler and OCC estimator state
    untouched) and counted; `max_consecutive` skips in a row stop the run with NonFiniteError.
    Its counters are part of a checkpoint."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.total = 0

    def skip(self, step: int, loss: float, grad_norm: float, coefs: list[float]) -> bool:
        values = {"loss": loss, "grad_norm": grad_norm, **{f"lambda_d{k + 1}": c for k, c in enumerate(coefs)}}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            self.streak = 0
            return False
        self.streak += 1
        self.total += 1
        if self.streak >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.streak} optimiser updates in a row had non-finite values (last at step {step}: "
                f"{', '.join(f'{k}={v}' for k, v in bad.items())}); each was skipped and the weights are unchanged. "
                "Lower optimizer.lr or regime.lambda_plus, check the data, or raise trainer.max_consecutive_skips; "
                "then resume from the last checkpoint."
            )
        return True

    def state_dict(self) -> dict:
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.total = int(state["streak"]), int(state["total"])


# -- set-up ---------------------------------------------------------------------------------------
def build_optimizer(opt_cfg, policy, regime):
    if not regime.train_heads:
        for p in policy.mtp_parameters():
            p.requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    if opt_cfg.name != "adamw":
        raise ValueError(f"optimizer={opt_cfg.name!r} is not supported; choose adamw")
    opt = torch.optim.AdamW(params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
    warm = opt_cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    return opt, sched


# -- before the updates: advantages and logp_old ----------------------------------------------------
def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -penalty."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def shaped_reward(batch: RolloutBatch, cfg) -> torch.Tensor:
    """The reward the advantages see: the verifier's score (batch.rewards) at `reward.scale`, plus
    DAPO's overlong penalty."""
    a = cfg.algorithm
    return scale_reward(batch.rewards, cfg.reward.scale) + overlong_shaping(
        batch.response_mask.sum(-1), cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)


def compute_advantages(batch: RolloutBatch, rewards: torch.Tensor, cfg) -> None:
    """batch.rewards (the verifier's scores, on the batch's device: RolloutBatch.set_rewards) and
    batch.advantages: group-normalised shaped rewards."""
    a = cfg.algorithm
    batch.set_rewards(rewards)
    batch.advantages = ADVANTAGES[a.advantage](shaped_reward(batch, cfg), a.group_size, a.adv_eps)


@torch.no_grad()
def recompute_logp_old(policy, batch: RolloutBatch, chunk: int, max_tokens: int = 0, dist=None) -> torch.Tensor:
    """The learner's log-probs of the sampled tokens, in chunks of `chunk` rows, or in micro-batches
    of at most `max_tokens` padded tokens (the same count on every rank)."""
    policy.eval()
    B = batch.input_ids.shape[0]
    parts = (micro_batch_indices(row_lengths(batch), max_tokens, dist) if max_tokens
             else [torch.arange(s, min(s + chunk, B)) for s in range(0, B, chunk)])
    logp = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    for idx in parts:
        mb = batch.select(idx).compact() if max_tokens else batch.select(idx)
        out = policy(mb.input_ids, mb.attention_mask, mb.response_len, with_mtp=False)
        logp[idx, : mb.response_len] = out.logp_main.float()
    return logp.masked_fill(~batch.response_mask, 0.0)


def set_logp_old(policy, batch: RolloutBatch, cfg, dist, recompute: bool) -> dict:
    """batch.logp_old: the learner's own log-probs (`recompute`: algorithm.recompute_logp_old as
    resolved by occ_exp.rollout.base.recompute_logp_old_needed) or the sampler's; returns the
    learner-vs-sampler gap as metrics."""
    a = cfg.algorithm
    if not recompute:
        batch.logp_old = batch.logp_sampler
        return {}
    batch.logp_old = recompute_logp_old(policy, batch, chunk=max(1, batch.input_ids.shape[0] // a.num_mini_batches),
                                        max_tokens=a.max_tokens_per_micro_batch, dist=dist)
    diff = (batch.logp_old - batch.logp_sampler).abs()[batch.response_mask]
    return {"rollout/logp_diff_mean": float(diff.mean()) if diff.numel() else 0.0,
            "rollout/logp_diff_max": float(diff.max()) if diff.numel() else 0.0}


# -- the updates ------------------------------------------------------------------------------------
def minibatch_indices(n_groups: int, group_size: int, num_mini_batches: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffle whole groups, split them into mini-batches, return sample indices."""
    order = torch.randperm(n_groups, generator=gen)
    return [
        (g.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()
        for g in torch.tensor_split(order, num_mini_batches)
        if len(g)
    ]


def mean_dict(rows: list[dict]) -> dict:
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            acc[k].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


@dataclass
class Update:
    """What every optimiser step of one learner phase shares: the policy, its optimiser and
    scheduler, the regime, the run config, the state kept across steps (OCC estimator, guard)."""

    policy: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    regime: Regime
    cfg: object
    coef_states: list
    dist: Dist
    guard: NonFiniteGuard
    step: int
    params: list = field(init=False)
    trunk_params: list = field(init=False)
    mtp_params: list = field(init=False)

    def __post_init__(self):
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.trunk_params = [p for p in self.policy.trunk_parameters() if p.requires_grad]
        self.mtp_params = [p for p in self.policy.mtp_parameters() if p.requires_grad]

    def rl_objective(self, out, mb: RolloutBatch, denom: Denominators):
        a = self.cfg.algorithm
        return POLICY_LOSSES[a.policy_loss](out.logp_main, mb.logp_old, mb.advantages, mb.response_mask,
                                            **loss_options(a), num_tokens=denom.tokens, num_seqs=denom.seqs)

    @property
    def whole_coef(self) -> bool:
        """lambda comes from the whole mini-batch (gathered before any backward); False for fixed
        lambdas and for the estimators the reference code runs on each micro-batch alone."""
        return self.regime.estimates_coef and self.cfg.regime.estimator not in PER_MICRO_BATCH


def learner_update(policy, optimizer, scheduler, regime, batch: RolloutBatch, cfg, coef_states, gen,
                   dist=None, guard: NonFiniteGuard | None = None, step: int = 0, diagnose: bool = False) -> dict:
    """Several clipped-policy-gradient updates on one rollout batch, with the regime's MTP term.

    Each optimiser step sees one mini-batch; under several ranks each rank holds an equal slice of
    it, and each slice is cut into micro-batches of at most `algorithm.max_tokens_per_micro_batch`
    tokens whose gradients accumulate (the module docstring explains why the result is the same).
    Updates with a non-finite loss, gradient norm or lambda are skipped (see NonFiniteGuard); the
    values it checks are global (reduced over ranks), so every rank skips the same updates.
    `diagnose`: exact diagnostics on every mini-batch of the last epoch (see occ_exp.diagnostics):
    `diag/<name>_mb<i>` for mini-batch i, the unsuffixed diag/* (and the Taylor check) for the last
    one, and `train/trunk_update_norm` (||theta_after - theta_before|| on the trunk over the phase)."""
    a = cfg.algorithm
    u = Update(policy, optimizer, scheduler, regime, cfg, coef_states, dist or Dist(),
               guard or NonFiniteGuard(cfg.trainer.max_consecutive_skips), step)
    rows = []
    policy.train()
    trunk_before = [p.detach().clone() for p in u.trunk_params] if diagnose else None
    for epoch in range(a.ppo_epochs):
        mbs = minibatch_indices(batch.input_ids.shape[0] // a.group_size, a.group_size, a.num_mini_batches, gen)
        for i, idx in enumerate(mbs):
            last_epoch = epoch == a.ppo_epochs - 1
            rows.append(optimizer_step(u, batch, idx, diagnose=diagnose and last_epoch, mb_index=i,
                                       last=last_epoch and i == len(mbs) - 1))
    if any(not r["train/skipped_steps"] for r in rows):  # the learning rate follows RL steps (verl's schedule)
        u.scheduler.step()
    metrics = summarize_updates(rows, u.guard)
    if trunk_before is not None:
        metrics["train/trunk_update_norm"] = float(update_norm(u.trunk_params, trunk_before, u.dist))
    return metrics


def update_norm(params, before: list[torch.Tensor], dist: Dist) -> torch.Tensor:
    """||params - before||, global over ranks."""
    return global_norm((p.detach() - b for p, b in zip(params, before)), dist)


def optimizer_step(u: Update, batch: RolloutBatch, idx: torch.Tensor, diagnose: bool = False, mb_index: int = 0,
                   last: bool = True) -> dict:
    """One optimiser step on the mini-batch `idx` of `batch` (this rank's slice of it, in
    micro-batches); returns its metrics row. `diagnose`: its exact diagnostics, as
    `diag/<name>_mb<mb_index>`, and unsuffixed too (with the Taylor check) when it is the `last`."""
    mb = batch.select(u.dist.share_of(idx))
    micro = split_micro_batches(mb, u.cfg.algorithm.max_tokens_per_micro_batch, u.dist, u.cfg.trainer.micro_batch_size)
    split = len(micro) > 1 or u.dist.multi_rank
    denom = Denominators.of(mb, u.dist) if split else Denominators(None, None)
    coef_before = [c.state_dict() for c in u.coef_states]
    advantages = batch.advantages[idx]
    coefs = lambda_before_backward(u, micro, advantages) if len(micro) > 1 else None
    u.optimizer.zero_grad(set_to_none=True)
    acc, diag = MetricAccumulator(), {}
    for rows, m in micro:
        out = u.policy(m.input_ids, m.attention_mask, m.response_len,
                       detach_trunk=u.regime.detach_trunk, detach_head=u.regime.detach_head)
        if split and u.whole_coef and coefs is None:  # one micro-batch per rank: its own forward
            coefs = estimate_coefs(u.regime, [rows], [out], [m], advantages, u.cfg, u.coef_states, u.dist)
        term, metrics, diag = micro_batch_backward(u, m, out, denom, coefs, diagnose=diagnose and not split,
                                                   taylor=last)
        if split and u.regime.estimates_coef and not u.whole_coef:  # one lambda per micro-batch: their mean
            metrics.update({f"mtp/coef_d{k + 1}": c for k, c in enumerate(term.coefs)})
        acc.add(metrics, weight=float(m.response_mask.sum()))
    metrics = acc.reduce(u.dist)
    gnorm, trunk_gnorm, mtp_gnorm = clip_gradients(u)
    skipped = apply_or_skip(u, metrics["train/loss"], float(gnorm), term.coefs, coef_before)
    coefs = [metrics.pop(f"mtp/coef_d{k + 1}", c) for k, c in enumerate(term.coefs)]
    return {
        **metrics, "train/grad_norm": float(gnorm), "train/trunk_grad_norm": float(trunk_gnorm),
        "mtp/grad_norm": float(mtp_gnorm), "train/skipped_steps": float(skipped),
        "train/lr": u.scheduler.get_last_lr()[0],
        "mtp/coef": coefs[0] if coefs else 0.0,
        **{f"mtp/coef_d{k + 1}": c for k, c in enumerate(coefs)},
        **per_mini_batch(diag, mb_index, last),
    }


def per_mini_batch(diag: dict, mb_index: int, last: bool) -> dict:
    """A diagnosed mini-batch's diag/* under `diag/<name>_mb<i>` (depth 1's and the step-level
    values; not the per-depth _d<k> copies), and unsuffixed as well for the step's last mini-batch."""
    if not diag:
        return {}
    out = {f"{k}_mb{mb_index}": v for k, v in diag.items() if not re.search(r"_d\d+$", k)}
    return {**out, **diag} if last else out


def lambda_before_backward(u: Update, micro: list[tuple[torch.Tensor, RolloutBatch]],
                           advantages: torch.Tensor) -> list[torch.Tensor] | None:
    """lambda_k of a mini-batch cut into several micro-batches, from no-grad forwards of all of
    them before any backward (None when the regime's lambda is not estimated on the whole mini-batch)."""
    if not u.whole_coef:
        return None
    with torch.no_grad():
        outs = [u.policy(m.input_ids, m.attention_mask, m.response_len) for _, m in micro]
    return estimate_coefs(u.regime, [r for r, _ in micro], outs, [m for _, m in micro], advantages, u.cfg,
                          u.coef_states, u.dist)


def micro_batch_backward(u: Update, m: RolloutBatch, out, denom: Denominators, coefs, diagnose: bool = False,
                         taylor: bool = True):
    """RL loss + the regime's MTP term on one micro-batch, and its backward; returns the term,
    the micro-batch's metrics and (when `diagnose`) the exact diagnostics."""
    rl_loss, pm = u.rl_objective(out, m, denom)
    # per-loss gradients, taken only if an estimator or the diagnostics ask (one micro-batch)
    probe = GradientProbe(rl_loss, u.trunk_params, u.mtp_params)
    ctx = MTPContext(out, m.logp_old, m.advantages, m.response_mask, u.cfg.regime, u.cfg.algorithm, u.coef_states,
                     num_tokens=denom.tokens, num_seqs=denom.seqs, coefs=coefs, policy=u.policy, probe=probe,
                     pad_to=u.cfg.rollout.max_new_tokens)
    term = mtp_term(u.regime, ctx)
    loss = rl_loss + term.loss
    diag = run_exact_diagnostics(u, m, denom, probe, term, ctx, taylor) if diagnose else {}
    backward(loss, term, probe)
    metrics = {"train/loss": loss.item(), "train/rl_loss": rl_loss.item(), "mtp/term": term.loss.item(),
               **{f"train/{k}": v for k, v in pm.items()}, **mtp_health(out, m.logp_old, m.response_mask)}
    return term, metrics, diag


def run_exact_diagnostics(u: Update, m: RolloutBatch, denom: Denominators, probe: GradientProbe, term: MTPTerm,
                          ctx: MTPContext, taylor: bool = True) -> dict:
    """diag/* metrics of the mini-batch (one micro-batch in one process; see occ_exp.diagnostics)."""

    def objective():  # the RL loss at the current weights (the Taylor check)
        return u.rl_objective(u.policy(m.input_ids, m.attention_mask, m.response_len, with_mtp=False), m, denom)[0]

    return exact_diagnostics(probe, term, ctx, u.cfg.diagnostics, objective, lr=u.scheduler.get_last_lr()[0],
                             taylor=taylor)


def backward(loss: torch.Tensor, term: MTPTerm, probe: GradientProbe) -> None:
    """loss.backward(), or the same gradient assembled from the per-loss gradients the probe took."""
    if probe.used:
        probe.backward(term)
    else:
        loss.backward()


def clip_gradients(u: Update) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global gradient norms (all, trunk, MTP layers; over ranks) and the clip to optimizer.grad_clip."""
    mtp_gnorm, trunk_gnorm = grad_norm(u.mtp_params, u.dist), grad_norm(u.trunk_params, u.dist)
    gnorm = torch.hypot(mtp_gnorm, trunk_gnorm)  # params = trunk + MTP layers
    clip_grads(u.params, u.cfg.optimizer.grad_clip, gnorm)
    return gnorm, trunk_gnorm, mtp_gnorm


def apply_or_skip(u: Update, loss: float, gnorm: float, coefs: list[float], coef_before: list[dict]) -> bool:
    """Optimiser step, or, when a value is not finite, no step and the OCC estimator state rolled
    back (NonFiniteGuard); True if skipped. The scheduler steps once per RL step (learner_update)."""
    if u.guard.skip(u.step, loss, gnorm, coefs):
        u.optimizer.zero_grad(set_to_none=True)
        for c, s in zip(u.coef_states, coef_before):
            c.load_state_dict(s)
        return True
    u.optimizer.step()
    return False


def summarize_updates(rows: list[dict], guard: NonFiniteGuard) -> dict:
    """The learner phase's metrics: means over its optimiser steps, skipped steps summed."""
    metrics = mean_dict(rows)
    metrics["train/skipped_steps"] = sum(r["train/skipped_steps"] for r in rows)  # optimiser steps skipped
    metrics["train/skipped_steps_total"] = guard.total
    coefs = [r["mtp/coef"] for r in rows]
    metrics["mtp/coef_first"], metrics["mtp/coef_last"] = coefs[0], coefs[-1]
    return metrics


def rollout_metrics(batch: RolloutBatch, group_size: int) -> dict:
    """Reward and response statistics of the step's (gathered) rollout batch."""
    rewards, lengths = batch.rewards, batch.response_mask.sum(-1)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/solve_all_frac": float((rewards.view(-1, group_size).min(1).values > 0).float().mean()),
        "reward/solve_none_frac": float((rewards.view(-1, group_size).max(1).values <= 0).float().mean()),
        "rollout/response_len": float(lengths.float().mean()),
        "rollout/truncated_frac": float(batch.truncated.float().mean()),
        "rollout/tokens": int(batch.attention_mask.sum()),  # prompt + response tokens of the step
    }
