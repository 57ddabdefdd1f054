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
import random
import time
import warnings
from collections import defaultdict
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
from occ_exp.diagnostics import GradientProbe, exact_diagnostics, mtp_health
from occ_exp.rollout.base import RolloutBatch, build_rollout


# -- small pieces -------------------------------------------------------------------------------
class PhaseTimer:
    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.times.items()}


@dataclass
class PromptStream:
    """Training prompts of the tiny task, drawn from a seeded RNG (its state is the data-loader
    position a checkpoint stores)."""

    task: object
    seed: int
    rng: random.Random = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(f"prompts-{self.seed}")

    def next(self, n: int) -> list:
        return [self.task.sample(self.rng, "train") for _ in range(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


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
                   diagnose: bool = False) -> dict:
    """Several clipped-policy-gradient updates on one rollout batch, with the regime's MTP term.
    `diagnose`: exact diagnostics on the last mini-batch (see occ_exp.diagnostics)."""
    a, o = cfg.algorithm, cfg.optimizer
    params = [p for p in policy.parameters() if p.requires_grad]
    trunk_params = [p for p in policy.trunk_parameters() if p.requires_grad]
    mtp_params = [p for p in policy.mtp_parameters() if p.requires_grad]
    policy_loss = POLICY_LOSSES[a.policy_loss]
    n_groups = batch.input_ids.shape[0] // a.group_size

    def rl_objective(out, mb):
        return policy_loss(out.logp_main, mb.logp_old, mb.advantages, mb.response_mask,
                           clip_low=a.clip_low, clip_high=a.clip_high, agg=a.loss_agg)

    rows = []
    policy.train()
    for epoch in range(a.ppo_epochs):
        mbs = minibatch_indices(n_groups, a.group_size, a.num_mini_batches, gen)
        for i, idx in enumerate(mbs):
            mb = batch.select(idx).compact()
            out = policy(mb.input_ids, mb.attention_mask, mb.response_len,
                         detach_trunk=regime.detach_trunk, detach_head=regime.detach_head)
            mask = mb.response_mask
            rl_loss, pm = rl_objective(out, mb)
            probe = GradientProbe(rl_loss, trunk_params, mtp_params)  # per-loss gradients, only if asked for
            ctx = MTPContext(out, mb.logp_old, mb.advantages, mask, cfg.regime, a, coef_states, policy=policy, probe=probe)
            term = mtp_term(regime, ctx)
            loss = rl_loss + term.loss
            optimizer.zero_grad(set_to_none=True)
            diag = {}
            if diagnose and epoch == a.ppo_epochs - 1 and i == len(mbs) - 1:  # the last mini-batch: see diagnostics.py
                objective = lambda: rl_objective(policy(mb.input_ids, mb.attention_mask, mb.response_len,  # noqa: E731
                                                        with_mtp=False), mb)[0]  # (re-evaluated by the Taylor check)
                diag = exact_diagnostics(probe, term, ctx, cfg.diagnostics, objective, lr=scheduler.get_last_lr()[0])
            if probe.used:  # same gradient as loss.backward(), from the per-loss gradients already taken
                probe.backward(term)
            else:
                loss.backward()
            mtp_gnorm = _grad_norm(mtp_params)
            trunk_gnorm = _grad_norm(trunk_params)
            gnorm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
            loss_v = loss.item()
            skipped = not (math.isfinite(loss_v) and math.isfinite(float(gnorm)) and all(map(math.isfinite, term.coefs)))
            if skipped:
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
                scheduler.step()
            row = {
                "train/loss": loss_v, "train/rl_loss": rl_loss.item(), "train/grad_norm": float(gnorm),
                "train/trunk_grad_norm": trunk_gnorm, "mtp/grad_norm": mtp_gnorm, "mtp/term": term.loss.item(),
                "train/skipped_updates": float(skipped), "train/lr": scheduler.get_last_lr()[0],
                **{f"train/{k}": v for k, v in pm.items()},
                "mtp/coef": term.coefs[0] if term.coefs else 0.0,
                **{f"mtp/coef_d{k + 1}": c for k, c in enumerate(term.coefs)},
                **mtp_health(out, mb.logp_old, mask),
                **diag,
            }
            rows.append(row)
    metrics = mean_dict(rows)
    metrics["train/skipped_updates"] = sum(r["train/skipped_updates"] for r in rows)
    coefs = [r["mtp/coef"] for r in rows]
    metrics["mtp/coef_first"], metrics["mtp/coef_last"] = coefs[0], coefs[-1]
    return metrics


def _grad_norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@torch.no_grad()
def recompute_logp_old(policy, batch: RolloutBatch, chunk: int) -> torch.Tensor:
    policy.eval()
    parts = []
    for s in range(0, batch.input_ids.shape[0], chunk):
        idx = torch.arange(s, min(s + chunk, batch.input_ids.shape[0]))
        mb = batch.select(idx)
        out = policy(mb.input_ids, mb.attention_mask, mb.response_len, with_mtp=False)
        parts.append(out.logp_main)
    return torch.cat(parts).masked_fill(~batch.response_mask, 0.0)


@torch.no_grad()
def evaluate(rollout, problems: list, reward_fn, batch_size: int = 512) -> dict:
    """Greedy accuracy on held-out problems."""
    scores, lengths = [], []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        b = rollout.generate([p.prompt for p in chunk], 1, greedy=True)
        r, _ = reward_fn(b.texts, chunk)
        scores.append(r)
        lengths.append(b.response_mask.sum(-1).float())
    return {"eval/accuracy": float(torch.cat(scores).mean()), "eval/response_len": float(torch.cat(lengths).mean()),
            "eval/n": len(problems)}


# -- the run ------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path, log=print) -> dict:
    """Run one experiment; returns the final metrics."""
    from occ_exp import builders
    from occ_exp.checkpoint import latest_complete, load_trainer_state, rng_state, save_checkpoint, set_rng_state
    from occ_exp.tracking import Tracker

    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t, a = cfg.trainer, cfg.algorithm
    if cfg.regime.name == "occ" and a.num_mini_batches * a.ppo_epochs == 1:
        warnings.warn("regime=occ with a single update per rollout batch: logp_main == logp_old on it, so c_hat "
                      "and lambda_t are always 0. Use algorithm.num_mini_batches >= 2 (the paper uses 4).")
    device = pick_device(t.device)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    seed_everything(cfg.seed)

    # 1. model, tokenizer, data, reward, rollout engine
    env = builders.build(cfg, device, log=log)
    policy, tokenizer, task, reward_fn = env.policy, env.tokenizer, env.task, env.reward_fn
    regime = get_regime(cfg.regime.name)
    rollout = build_rollout(cfg.rollout, policy, tokenizer, device)
    optimizer, scheduler = build_optimizer(cfg.optimizer, policy, regime)
    coef_states = [CoefficientState(cfg.regime.ema, cfg.regime.clip) for _ in range(policy.num_mtp_layers)]
    prompts = PromptStream(task, cfg.seed)
    eval_problems = task.problems(t.eval_problems, seed=10_000, split="test")
    gen = torch.Generator().manual_seed(cfg.seed)

    # 2. resume
    start = 0
    ckpt = latest_complete(run_dir) if t.resume == "auto" else (Path(t.resume) if t.resume != "never" else None)
    if ckpt is not None:
        start = builders.resume_from(ckpt, policy, optimizer, scheduler, coef_states, prompts, gen, device)
        log(f"resumed from {ckpt} at step {start}")
    tracker = Tracker(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), resume_step=start if ckpt else None)

    def checkpoint(step: int) -> Path:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "generator": gen.get_state(), "prompts": prompts.state_dict(),
                 "coef_states": [c.state_dict() for c in coef_states]}
        return save_checkpoint(run_dir, step, policy, tokenizer, state, OmegaConf.to_yaml(cfg), t.keep_last)

    if t.eval_before_train and start == 0:
        tracker.log(evaluate(rollout, eval_problems, reward_fn), step=0)

    # 3. the loop
    from tqdm import tqdm

    bar = tqdm(range(start + 1, t.total_steps + 1), desc=f"{cfg.regime.name}", disable=not t.progress,
               initial=start, total=t.total_steps, mininterval=1.0)
    final_problems = task.problems(t.final_eval_problems, seed=20_000, split="test")
    last: dict = {}
    last_ckpt = ckpt
    for step in bar:
        timer = PhaseTimer()
        t_step = time.perf_counter()
        with timer("rollout"):
            problems = prompts.next(cfg.data.prompts_per_step)
            batch = rollout.generate([p.prompt for p in problems], a.group_size)
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
                batch.logp_old = recompute_logp_old(policy, batch, chunk=max(1, batch.input_ids.shape[0] // a.num_mini_batches))
                diff = (batch.logp_old - batch.logp_sampler).abs()[batch.response_mask]
                rstats["rollout/logp_diff_mean"] = float(diff.mean()) if diff.numel() else 0.0
                rstats["rollout/logp_diff_max"] = float(diff.max()) if diff.numel() else 0.0
            else:
                batch.logp_old = batch.logp_sampler
        with timer("update"):
            diagnose = cfg.diagnostics.exact_every > 0 and step % cfg.diagnostics.exact_every == 0
            metrics = learner_update(policy, optimizer, scheduler, regime, batch, cfg, coef_states, gen, diagnose)
        rollout.sync_weights()
        metrics.update(rstats)
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "reward/solve_all_frac": float((rewards.view(-1, a.group_size).min(1).values > 0).float().mean()),
            "reward/solve_none_frac": float((rewards.view(-1, a.group_size).max(1).values <= 0).float().mean()),
            "rollout/response_len": float(lengths.float().mean()),
            "rollout/truncated_frac": float(batch.truncated.float().mean()),
        })
        is_last = step == t.total_steps
        if is_last:  # the final evaluation, on a larger held-out set
            with timer("eval"):
                metrics.update(evaluate(rollout, final_problems, reward_fn))
                metrics["eval/final"] = 1
        elif t.eval_every and step % t.eval_every == 0:
            with timer("eval"):
                metrics.update(evaluate(rollout, eval_problems, reward_fn))
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics.update(timer.metrics())
        tracker.log(metrics, step=step)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", coef=f"{metrics['mtp/coef']:+.2e}",
                        accept=f"{metrics['mtp/acceptance']:.3f}")
        last = metrics
        if is_last or (t.save_every and step % t.save_every == 0):
            last_ckpt = checkpoint(step)

    # 4. summary
    summary = {"final/accuracy": last.get("eval/accuracy"), "final/n": last.get("eval/n"),
               "final/acceptance": last.get("mtp/acceptance"), "final/reward": last.get("reward/mean"),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "metrics": str(tracker.metrics_path),
               "run_dir": str(run_dir)}
    tracker.summary(summary)
    tracker.close()
    rollout.close()
    reward_fn.close()
    return summary
