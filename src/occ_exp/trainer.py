"""The RL loop with MTP heads, one step at a time, each phase timed.

    for step in 1..T:
        prompts                  <- data
        samples, logp_sampler    <- rollout(prompts, G)                      [rollout]
        rewards                  <- verifier(samples)                        [reward]
        advantages               <- group-normalised rewards                 [advantage]
        logp_old                 <- learner forward (or the sampler's)       [logp_old]
        for each mini-batch:                                                 [update]
            logp_main, logp_mtp  <- one forward through trunk and MTP heads
            loss = L_RL(logp_main) + mean_k lambda_k * L_MTP(logp_mtp[k])    (regime, coefficient)
            backward, clip, optimiser step
        metrics -> metrics.jsonl / W&B; evaluation; checkpoint
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from occ_exp.algo.advantages import ADVANTAGES
from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.policy_loss import POLICY_LOSSES
from occ_exp.algo.regimes import MTPContext, get_regime, mtp_term
from occ_exp.config import validate
from occ_exp.data.benchmarks import load_benchmarks
from occ_exp.data.prompts import format_prompts
from occ_exp.diagnostics import GradientProbe, exact_diagnostics, mtp_health
from occ_exp.evaluate import Evaluator, Scorers, eval_metrics, write_eval
from occ_exp.reward.rewards import reward_kind
from occ_exp.rollout.base import RolloutBatch, build_rollout
from occ_exp.threads import apply_threads


# -- small pieces -------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset (GiB; Linux VmHWM, else 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class PhaseTimer:
    """Wall time per phase, and each phase's peak memory: on a GPU the peak allocated memory
    (`mem/{phase}_peak_gib`, with the device synchronised at the phase's edges so that times are
    the phase's own), on the CPU the process's peak resident memory (`mem/{phase}_peak_rss_gib`,
    Linux only: the kernel's high-water mark, reset at the phase's start)."""

    def __init__(self, cuda: bool = False):
        self.times: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = {}
        self.cuda = cuda
        self.rss = not cuda and reset_peak_rss()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.rss:
            reset_peak_rss()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            elif self.rss:
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_gib())
            self.times[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        mem = "mem/{}_peak_gib" if self.cuda else "mem/{}_peak_rss_gib"
        return {**{f"time/{k}_s": v for k, v in self.times.items()},
                **{mem.format(k): v for k, v in self.peaks.items()}}


@dataclass
class PromptStream:
    """Training prompts, seeded and resumable (its state is the data-loader position a checkpoint
    stores). A procedural task (data=tiny) draws each problem from a seeded RNG; a finite data set
    (a Sequence of problems, e.g. data=dapo_math) is read in a fresh seeded order each epoch."""

    task: object
    seed: int
    rng: random.Random = field(init=False)
    epoch: int = field(init=False, default=0)
    pos: int = field(init=False, default=0)

    def __post_init__(self):
        self.rng = random.Random(f"prompts-{self.seed}")
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(len(self.task)))
            random.Random(f"prompts-{self.seed}-epoch-{self.epoch}").shuffle(self._order)
        return self._order

    def next(self, n: int) -> list:
        if not isinstance(self.task, Sequence):
            return [self.task.sample(self.rng, "train") for _ in range(n)]
        out = []
        while len(out) < n:
            if self.pos == len(self.task):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
            out.append(self.task[self._epoch_order()[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.epoch, self.pos, self._order = state.get("epoch", 0), state.get("pos", 0), None


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -penalty."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


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


# -- the learner phase --------------------------------------------------------------------------
def learner_update(policy, optimizer, scheduler, regime, batch: RolloutBatch, cfg, coef_states, gen,
                   dist=None, guard: "NonFiniteGuard | None" = None, step: int = 0, diagnose: bool = False) -> dict:
    """Several clipped-policy-gradient updates on one rollout batch, with the regime's MTP term.

    Each optimiser step sees one mini-batch; under several ranks each rank holds an equal slice of
    it, and each slice is cut into micro-batches of at most `algorithm.max_tokens_per_micro_batch`
    tokens whose gradients accumulate (occ_exp.learner explains why the result is the same).
    Updates with a non-finite loss, gradient norm or lambda are skipped (see NonFiniteGuard); the
    values it checks are global (reduced over ranks), so every rank skips the same updates.
    `diagnose`: exact diagnostics on the last mini-batch (see occ_exp.diagnostics)."""
    from occ_exp.distributed import Dist, clip_grads, grad_norm
    from occ_exp.learner import Denominators, MetricAccumulator, estimate_coefs, split_micro_batches

    dist = dist or Dist()
    guard = guard or NonFiniteGuard(cfg.trainer.max_consecutive_skips)
    a, o = cfg.algorithm, cfg.optimizer
    params = [p for p in policy.parameters() if p.requires_grad]
    trunk_params = [p for p in policy.trunk_parameters() if p.requires_grad]
    mtp_params = [p for p in policy.mtp_parameters() if p.requires_grad]
    policy_loss = POLICY_LOSSES[a.policy_loss]
    n_groups = batch.input_ids.shape[0] // a.group_size

    def rl_objective(out, mb, denom):
        return policy_loss(out.logp_main, mb.logp_old, mb.advantages, mb.response_mask, clip_low=a.clip_low,
                           clip_high=a.clip_high, agg=a.loss_agg, num_tokens=denom.tokens, num_seqs=denom.seqs)

    rows = []
    policy.train()
    for epoch in range(a.ppo_epochs):
        mbs = minibatch_indices(n_groups, a.group_size, a.num_mini_batches, gen)
        for i, idx in enumerate(mbs):
            mb = batch.select(dist.share_of(idx))
            micro = split_micro_batches(mb, a.max_tokens_per_micro_batch, dist)
            split = len(micro) > 1 or dist.world_size > 1
            denom = Denominators.of(mb, dist) if split else Denominators(None, None)
            coef_before = [c.state_dict() for c in coef_states]
            coefs = None
            if split and regime.estimates_coef and len(micro) > 1:  # lambda before any backward
                with torch.no_grad():
                    outs = [policy(m.input_ids, m.attention_mask, m.response_len) for _, m in micro]
                coefs = estimate_coefs(regime, [r for r, _ in micro], outs, [m for _, m in micro],
                                       batch.advantages[idx], cfg, coef_states, dist)
            optimizer.zero_grad(set_to_none=True)
            acc, diag = MetricAccumulator(), {}
            for _, m in micro:
                out = policy(m.input_ids, m.attention_mask, m.response_len,
                             detach_trunk=regime.detach_trunk, detach_head=regime.detach_head)
                if split and regime.estimates_coef and coefs is None:  # one micro-batch per rank
                    coefs = estimate_coefs(regime, [micro[0][0]], [out], [m], batch.advantages[idx], cfg,
                                           coef_states, dist)
                mask = m.response_mask
                rl_loss, pm = rl_objective(out, m, denom)
                # per-loss gradients, taken only if an estimator or the diagnostics ask (one micro-batch)
                probe = GradientProbe(rl_loss, trunk_params, mtp_params)
                ctx = MTPContext(out, m.logp_old, m.advantages, mask, cfg.regime, a, coef_states,
                                 num_tokens=denom.tokens, num_seqs=denom.seqs, coefs=coefs, policy=policy, probe=probe)
                term = mtp_term(regime, ctx)
                loss = rl_loss + term.loss
                if diagnose and not split and epoch == a.ppo_epochs - 1 and i == len(mbs) - 1:  # see diagnostics.py
                    objective = lambda: rl_objective(policy(m.input_ids, m.attention_mask, m.response_len,  # noqa: E731
                                                            with_mtp=False), m, denom)[0]  # (the Taylor check)
                    diag = exact_diagnostics(probe, term, ctx, cfg.diagnostics, objective, lr=scheduler.get_last_lr()[0])
                if probe.used:  # same gradient as loss.backward(), from the per-loss gradients already taken
                    probe.backward(term)
                else:
                    loss.backward()
                acc.add({"train/loss": loss.item(), "train/rl_loss": rl_loss.item(), "mtp/term": term.loss.item(),
                         **{f"train/{k}": v for k, v in pm.items()}, **mtp_health(out, m.logp_old, mask)},
                        weight=float(mask.sum()))
            metrics = acc.reduce(dist)
            mtp_gnorm, trunk_gnorm = grad_norm(mtp_params, dist), grad_norm(trunk_params, dist)
            gnorm = torch.hypot(mtp_gnorm, trunk_gnorm)  # params = trunk + MTP layers
            clip_grads(params, o.grad_clip, gnorm)
            skipped = guard.skip(step, metrics["train/loss"], float(gnorm), term.coefs)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                for c, s in zip(coef_states, coef_before):
                    c.load_state_dict(s)
            else:
                optimizer.step()
                scheduler.step()
            rows.append({
                **metrics, "train/grad_norm": float(gnorm), "train/trunk_grad_norm": float(trunk_gnorm),
                "mtp/grad_norm": float(mtp_gnorm), "train/skipped_steps": float(skipped),
                "train/lr": scheduler.get_last_lr()[0],
                "mtp/coef": term.coefs[0] if term.coefs else 0.0,
                **{f"mtp/coef_d{k + 1}": c for k, c in enumerate(term.coefs)},
                **diag,
            })
    metrics = mean_dict(rows)
    metrics["train/skipped_steps"] = sum(r["train/skipped_steps"] for r in rows)  # optimiser steps skipped
    metrics["train/skipped_steps_total"] = guard.total
    coefs = [r["mtp/coef"] for r in rows]
    metrics["mtp/coef_first"], metrics["mtp/coef_last"] = coefs[0], coefs[-1]
    return metrics


@torch.no_grad()
def recompute_logp_old(policy, batch: RolloutBatch, chunk: int, max_tokens: int = 0, dist=None) -> torch.Tensor:
    """The learner's log-probs of the sampled tokens, in chunks of `chunk` rows, or in micro-batches
    of at most `max_tokens` padded tokens (the same count on every rank)."""
    from occ_exp.learner import micro_batch_indices, row_lengths

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


# -- the run ------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path, log=print) -> dict:
    """Run one experiment; returns the final metrics. SIGTERM stops it after the current step, with
    a checkpoint (see occ_exp.preemption)."""
    from occ_exp.locks import run_lock
    from occ_exp.preemption import GracefulStop, StopRequested

    with GracefulStop(log=log, setup=True) as stop:
        stop.step, stop.checkpoint = 0, None  # where a stop during set-up leaves the run (set on resume)
        try:
            # one writer per run dir (rank 0 writes; torchrun ends the other ranks if it is refused)
            with run_lock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
                return _train(cfg, run_dir, log, stop)
        except StopRequested:
            return run_summary({}, stop.step, stop.checkpoint, None, run_dir)


def run_summary(last: dict, stopped_at: int | None, checkpoint, metrics_path, run_dir) -> dict:
    """What `train` returns: final accuracy (None unless the final evaluation ran), where it stopped."""
    return {"final/accuracy": last.get("eval/accuracy") if last.get("eval/final") else None,
            "stopped_at_step": stopped_at, "final/n": last.get("eval/n"),
            "final/acceptance": last.get("mtp/acceptance"), "final/reward": last.get("reward/mean"),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "metrics": str(metrics_path) if metrics_path else None, "run_dir": str(run_dir)}


def _train(cfg: DictConfig, run_dir: str | Path, log, stop) -> dict:
    from occ_exp import builders
    from occ_exp import distributed as D
    from occ_exp.checkpoint import resolve_resume, rng_state, save_checkpoint, set_aside_newer
    from occ_exp.faults import fault_point
    from occ_exp.tracking import Tracker

    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t, a = cfg.trainer, cfg.algorithm
    if cfg.regime.name == "occ" and a.num_mini_batches * a.ppo_epochs == 1:
        warnings.warn("regime=occ with a single update per rollout batch: logp_main == logp_old on it, so c_hat "
                      "and lambda_t are always 0. Use algorithm.num_mini_batches >= 2 (the paper uses 4).")
    dist = D.init_distributed(cfg.distributed, t.device)  # no process group outside torchrun / Slurm
    device = dist.device
    log = log if dist.is_main else (lambda *_: None)
    threads = apply_threads(t.threads)  # 0: from the cores available and the runs launched side by side
    seed_everything(cfg.seed)
    ckpt = resolve_resume(run_dir, t.resume, log)

    # 1. evaluation sets (files checked first), model, tokenizer, data, reward, rollout engine
    #    (no warm start when a checkpoint has the weights)
    eval_sets = load_benchmarks(cfg.benchmark.names, cfg.paths.data_dir, cfg.data, limit=t.eval_problems)
    final_sets = load_benchmarks(cfg.benchmark.names, cfg.paths.data_dir, cfg.data, limit=t.final_eval_problems)
    with dist.main_first():  # rank 0 fills the warm-start cache, the others read it
        env = builders.build(cfg, device, log=log, with_warm_start=ckpt is None)
    seed_everything(cfg.seed)  # the RL phase's randomness must not depend on whether the warm start was cached
    policy, tokenizer, task, reward_fn = env.policy, env.tokenizer, env.task, env.reward_fn
    D.apply_activation_checkpointing(policy, cfg.model.gradient_checkpointing)
    policy = D.shard_policy(policy, dist, cfg.distributed)  # FSDP2 under a process group
    policy.share_prompts = cfg.model.share_prompts
    if cfg.model.compile:  # the learner's forward/backward; shapes vary by step, so symbolic from the start
        policy.compile_forward(dynamic=True)
    if dist.enabled:
        log(f"learner: FSDP2 over {dist.world_size} rank(s) on {device.type}, compute dtype "
            f"{D.compute_dtype(cfg.distributed, device)}, activation checkpointing {cfg.model.gradient_checkpointing}")
    if dist.world_size > 1:
        torch.manual_seed(cfg.seed + dist.rank)  # independent samples on each rank
    regime = get_regime(cfg.regime.name)
    rollout = build_rollout(cfg.rollout, policy, tokenizer, device)
    # rollout=hf generates with the learner's own (sharded) module: gather it first
    generating = (lambda: D.full_params(policy, dist)) if getattr(rollout, "shares_learner_weights", False) \
        else contextlib.nullcontext
    optimizer, scheduler = build_optimizer(cfg.optimizer, policy, regime)
    coef_states = [CoefficientState(cfg.regime.ema, cfg.regime.clip) for _ in range(policy.num_mtp_layers)]
    prompts = PromptStream(task, cfg.seed)
    evaluator = Evaluator(rollout, tokenizer, cfg.eval, cfg.model.chat_template,
                          Scorers({reward_kind(cfg.data): reward_fn}), dist=dist)
    gen = torch.Generator().manual_seed(cfg.seed)
    guard = NonFiniteGuard(t.max_consecutive_skips)

    # 2. resume: weights, optimiser, scheduler, RNGs, data position, OCC and guard state
    start = 0
    if t.resume == "never" and dist.is_main:  # starting over: earlier checkpoints are kept, set aside
        set_aside_newer(run_dir, 0, log)
    if ckpt is not None:
        start = builders.resume_from(ckpt, policy, optimizer, scheduler, coef_states, prompts, gen, device,
                                     dist=dist, guard=guard, rollout=rollout)
        if dist.is_main:
            set_aside_newer(run_dir, start, log)
        stop.step, stop.checkpoint = start, ckpt
        log(f"resumed from {ckpt} at step {start}")
        rollout.sync_weights()
    elif env.fresh_mtp_layers and cfg.model.mtp_warmup_steps > 0:  # fresh heads on a real checkpoint
        from occ_exp.models.warmstart import mtp_warmup

        mtp_warmup(policy, tokenizer, task, cfg.model, env.fresh_mtp_layers, device, rollout, seed=cfg.seed, log=log)
        rollout.sync_weights()
    tracker = Tracker(cfg.logger if dist.is_main else OmegaConf.create({"name": "none"}), run_dir,
                      OmegaConf.to_container(cfg, resolve=True), resume_step=start)

    def checkpoint(step: int) -> Path:
        state = {"step": step, "optimizer": D.optimizer_state_dict(policy, optimizer, dist),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "generator": gen.get_state(),
                 "prompts": prompts.state_dict(), "coef_states": [c.state_dict() for c in coef_states],
                 "guard": guard.state_dict(), **D.extra_trainer_state(dist)}
        if hasattr(rollout, "state_dict"):  # e.g. a sampler with its own RNG
            state["rollout"] = rollout.state_dict()
        model_sd = D.full_model_state_dict(policy, dist)  # collective; None without a process group
        path = None
        if dist.is_main:
            path = save_checkpoint(run_dir, step, policy, tokenizer, state, OmegaConf.to_yaml(cfg), t.keep_last,
                                   model_state_dict=model_sd)
        dist.barrier()
        return path

    def run_eval(benchmarks: list) -> dict:
        with generating():
            return evaluator.run(benchmarks)

    if t.eval_before_train and start == 0:
        tracker.log(eval_metrics(run_eval(eval_sets)), step=0)

    # 3. the loop
    from tqdm import tqdm

    bar = tqdm(range(start + 1, t.total_steps + 1), desc=f"{cfg.regime.name}", disable=not (t.progress and dist.is_main),
               initial=start, total=t.total_steps, mininterval=1.0)
    last: dict = tracker.last_row if start >= t.total_steps else {}  # resuming a finished run: nothing to do
    last_ckpt = ckpt
    stopped_at = None
    stop.ready()  # set-up is over: SIGTERM now finishes the step and checkpoints
    log(str(threads))
    for step in bar:
        if step == start + 1 and stop.should_stop():  # SIGTERM during set-up: nothing new to save
            stopped_at = start
            break
        timer = PhaseTimer(cuda=device.type == "cuda")
        t_step = time.perf_counter()
        with timer("rollout"):
            problems = dist.shard(prompts.next(cfg.data.prompts_per_step))  # this rank's share (all of them)
            with generating():
                batch = rollout.generate(format_prompts(problems, tokenizer, cfg.model.chat_template), a.group_size)
        with timer("reward"):
            sample_problems = [problems[i] for i in batch.prompt_index.tolist()]
            rewards, rstats = reward_fn(batch.texts, sample_problems)
        with timer("advantage"):
            lengths = batch.response_mask.sum(-1)
            shaped = rewards + overlong_shaping(lengths, cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            batch.rewards = rewards
            batch.advantages = ADVANTAGES[a.advantage](shaped, a.group_size, a.adv_eps)
        with timer("logp_old"):
            if a.recompute_logp_old:
                batch.logp_old = recompute_logp_old(policy, batch, chunk=max(1, batch.input_ids.shape[0] // a.num_mini_batches),
                                                    max_tokens=a.max_tokens_per_micro_batch, dist=dist)
                diff = (batch.logp_old - batch.logp_sampler).abs()[batch.response_mask]
                rstats["rollout/logp_diff_mean"] = float(diff.mean()) if diff.numel() else 0.0
                rstats["rollout/logp_diff_max"] = float(diff.max()) if diff.numel() else 0.0
            else:
                batch.logp_old = batch.logp_sampler
        if dist.world_size > 1:  # every rank now holds the whole step's batch (advantages already per group)
            with timer("gather"):
                batch = dist.gather_rollouts(batch, len(problems))
                rewards, lengths, rstats = batch.rewards, batch.response_mask.sum(-1), dist.mean_dict(rstats)
        with timer("update"):
            diagnose = cfg.diagnostics.exact_every > 0 and step % cfg.diagnostics.exact_every == 0
            metrics = learner_update(policy, optimizer, scheduler, regime, batch, cfg, coef_states, gen, dist,
                                     guard, step, diagnose)
        rollout.sync_weights()
        fault_point("during_step", step)
        metrics.update(rstats)
        metrics.update(batch.stats)  # the engine's own counters (weight version, speculative acceptance)
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward/solve_all_frac": float((rewards.view(-1, a.group_size).min(1).values > 0).float().mean()),
            "reward/solve_none_frac": float((rewards.view(-1, a.group_size).max(1).values <= 0).float().mean()),
            "rollout/response_len": float(lengths.float().mean()),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
            "rollout/tokens": int(batch.attention_mask.sum()),  # prompt + response tokens of the step
        })
        is_last = step == t.total_steps
        if is_last:  # the final evaluation, on larger held-out sets; also <run dir>/eval.json
            with timer("eval"):
                result = run_eval(final_sets)
                if dist.is_main:
                    write_eval({"label": cfg.run_name, "model": str(run_dir), "step": step, **result}, run_dir)
                metrics.update(eval_metrics(result))
                metrics["eval/final"] = 1
        elif t.eval_every and step % t.eval_every == 0:
            with timer("eval"):
                metrics.update(eval_metrics(run_eval(eval_sets)))
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics.update(timer.metrics())
        tracker.log(metrics, step=step)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", coef=f"{metrics['mtp/coef']:+.2e}",
                        accept=f"{metrics['mtp/acceptance']:.3f}")
        last = metrics
        stopping = stop.should_stop()
        if is_last or stopping or (t.save_every and step % t.save_every == 0):
            last_ckpt = checkpoint(step)
        fault_point("after_step", step)
        if stopping and not is_last:
            log(f"stopped after step {step} on request (SIGTERM); checkpoint {last_ckpt}. "
                "Run the same command with the same hydra.run.dir to resume.")
            stopped_at = step
            break

    # 4. summary
    summary = run_summary(last, stopped_at, last_ckpt, tracker.metrics_path, run_dir)
    tracker.summary(summary)
    tracker.close()
    evaluator.close()
    rollout.close()
    reward_fn.close()
    dist.close()
    return summary
