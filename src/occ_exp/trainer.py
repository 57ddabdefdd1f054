"""The RL loop with MTP heads, one step at a time, each phase timed.

    for step in 1..T:
        prompts                  <- data
        samples, logp_sampler    <- rollout(prompts, G)                      [rollout]
        rewards                  <- verifier(samples)                        [reward]
          (algorithm.dynamic_sampling: more prompts until enough groups whose rewards vary)
        advantages               <- group-normalised rewards at reward.scale [advantage]
        logp_old                 <- learner forward (or the sampler's)       [logp_old]
        for each mini-batch:                                                 [update]
            logp_main, logp_mtp  <- one forward through trunk and MTP heads
            loss = L_RL(logp_main) + mean_k lambda_k * L_MTP(logp_mtp[k])    (regime, coefficient)
            backward, clip, optimiser step
        learning-rate schedule: one step per RL step
        metrics -> metrics.jsonl / W&B; evaluation; checkpoint

`set_up` builds the run (`Run`), `rl_step` is one pass of the box above (the learner phase,
advantage to optimiser steps, is occ_exp.learner), and `train` loops, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from occ_exp import builders
from occ_exp import distributed as D
from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.regimes import Regime, get_regime
from occ_exp.checkpoint import resolve_resume, set_aside_newer
from occ_exp.data.benchmarks import load_benchmarks
from occ_exp.data.prompts import PromptStream, format_prompts
from occ_exp.evaluation import Evaluator, Scorers, eval_metrics, write_eval
from occ_exp.faults import fault_point
from occ_exp.learner import (NonFiniteGuard, build_optimizer, compute_advantages, learner_update, mean_dict,
                             rollout_metrics, set_logp_old, shaped_reward)
from occ_exp.locks import run_lock
from occ_exp.preemption import GracefulStop, StopRequested
from occ_exp.reward.rewards import reward_kind
from occ_exp.rollout import build_rollout
from occ_exp.rollout.base import Rollout, recompute_logp_old_needed
from occ_exp.rollout.dynamic_sampling import GroupFilter, group_multiple
from occ_exp.runtime import PhaseTimer, package_commit, record_start, seed_everything, set_threads
from occ_exp.tracking import Tracker
from occ_exp.validation import validate
from occ_exp.warmstart import mtp_warmup


@dataclass
class Run:
    """The objects of one run, built by `set_up`."""

    cfg: DictConfig
    run_dir: Path
    log: object
    dist: D.Dist
    policy: object
    tokenizer: object
    reward_fn: object
    regime: Regime
    rollout: Rollout
    optimizer: torch.optim.Optimizer
    scheduler: object
    coef_states: list[CoefficientState]
    prompts: PromptStream
    gen: torch.Generator
    guard: NonFiniteGuard
    evaluator: Evaluator
    eval_sets: list
    final_sets: list
    tracker: Tracker | None = None
    start: int = 0  # the step resumed from (0: a fresh run)
    resumed_from: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def generating(self):
        """Around sampling: rollout=hf generates with the learner's own (sharded) module, gathered first."""
        return D.full_params(self.policy, self.dist) if self.rollout.shares_learner_weights else contextlib.nullcontext()

    def evaluate(self, benchmarks: list) -> dict:
        with self.generating():
            return self.evaluator.run(benchmarks)

    def checkpoint(self, step: int) -> Path | None:
        """Save step `step` (collective: under a process group every rank writes its shards); returns
        the folder on rank 0."""
        return builders.save_run_checkpoint(self.run_dir, step, self.policy, self.tokenizer, self.optimizer,
                                            self.scheduler, self.coef_states, self.prompts, self.gen, self.dist,
                                            self.guard, self.rollout, self.tracker.run_id, OmegaConf.to_yaml(self.cfg),
                                            self.cfg.trainer.keep_last)

    def close(self) -> None:
        self.tracker.close()
        self.evaluator.close()
        self.rollout.close()
        self.reward_fn.close()
        self.dist.close()


# -- set-up -----------------------------------------------------------------------------------------
def set_up(cfg: DictConfig, run_dir: Path, log, stop: GracefulStop | None = None) -> Run:
    """Evaluation sets (files checked first), model, tokenizer, data, reward, rollout engine,
    optimiser; then the checkpoint's state (or, for fresh MTP heads, their warm-up); then the tracker.
    `stop` learns the step resumed from (where a SIGTERM during the rest of set-up leaves the run)."""
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    t, a = cfg.trainer, cfg.algorithm
    if cfg.regime.name == "occ" and a.num_mini_batches * a.ppo_epochs == 1:
        warnings.warn("regime=occ with a single update per rollout batch: logp_main == logp_old on it, so c_hat "
                      "and lambda_t are always 0. Use algorithm.num_mini_batches >= 2 (the paper uses 4).")
    dist = D.init_distributed(cfg.distributed, t.device)  # no process group outside torchrun / Slurm
    device = dist.device
    log = log if dist.is_main else (lambda *_: None)
    threads = set_threads(t.threads)  # 0: the cores available / the runs launched side by side
    seed_everything(cfg.seed)
    ckpt = resolve_resume(run_dir, t.resume, log)  # every checkpoint damaged: CheckpointError, nothing moved
    if t.resume == "never" and dist.is_main:  # starting over: earlier checkpoints are kept, set aside
        set_aside_newer(run_dir, 0, log)

    eval_sets = load_benchmarks(cfg.benchmark.names, cfg.paths.data_dir, cfg.data, limit=t.eval_problems)
    final_sets = load_benchmarks(cfg.benchmark.names, cfg.paths.data_dir, cfg.data, limit=t.final_eval_problems)
    with dist.main_first():  # rank 0 fills the warm-start cache, the others read it (none when resuming)
        env = builders.build(cfg, device, log=log, with_warm_start=ckpt is None)
    seed_everything(cfg.seed)  # the RL phase's randomness must not depend on whether the warm start was cached
    policy = prepare_policy(env.policy, cfg, dist, log)
    if dist.multi_rank:
        torch.manual_seed(cfg.seed + dist.rank)  # independent samples on each rank
    regime = get_regime(cfg.regime.name)
    rollout = build_rollout(cfg.rollout, policy, env.tokenizer, device)
    optimizer, scheduler = build_optimizer(cfg.optimizer, policy, regime)
    run = Run(
        cfg=cfg, run_dir=run_dir, log=log, dist=dist, policy=policy, tokenizer=env.tokenizer, reward_fn=env.reward_fn,
        regime=regime, rollout=rollout, optimizer=optimizer, scheduler=scheduler,
        coef_states=[CoefficientState(cfg.regime.ema, cfg.regime.clip) for _ in range(policy.num_mtp_layers)],
        prompts=PromptStream(env.task, cfg.seed), gen=torch.Generator().manual_seed(cfg.seed),
        guard=NonFiniteGuard(t.max_consecutive_skips),
        evaluator=Evaluator(rollout, env.tokenizer, cfg.eval, cfg.model.chat_template,
                            Scorers({reward_kind(cfg.data): env.reward_fn}), dist=dist),
        eval_sets=eval_sets, final_sets=final_sets, resumed_from=ckpt,
    )
    wandb_id = None
    if ckpt is not None:  # weights, optimiser, scheduler, RNGs, data position, OCC and guard state
        state = builders.resume_from(ckpt, policy, optimizer, scheduler, run.coef_states, run.prompts, run.gen,
                                     device, dist=dist, guard=run.guard, rollout=rollout)
        run.start, wandb_id = state.step, state.wandb_id
        if dist.is_main:
            set_aside_newer(run_dir, run.start, log)
        if stop is not None:
            stop.step, stop.checkpoint = run.start, ckpt
        log(f"resumed from {ckpt} at step {run.start}")
        rollout.sync_weights()
    elif env.fresh_mtp_layers and cfg.model.mtp_warmup_steps > 0:  # fresh heads on a real checkpoint
        mtp_warmup(policy, env.tokenizer, env.task, cfg.model, env.fresh_mtp_layers, device, rollout, seed=cfg.seed,
                   log=log)
        rollout.sync_weights()
    policy.temperature = cfg.algorithm.temperature  # the learner's log-probs at the sampler's (warm-ups ran at 1)
    commit = "unknown"  # only the main rank's tracker logs it
    if dist.is_main:  # the code of each start (a run resumed across sessions may span commits), its threads
        commit = package_commit()
        note = record_start(run_dir / "provenance.jsonl", run.start, commit, threads.threads, device)
        if note:
            log(note)
    run.tracker = Tracker(cfg.logger if dist.is_main else OmegaConf.create({"name": "none"}), run_dir,
                          {**OmegaConf.to_container(cfg, resolve=True), "code_commit": commit}, resume_step=run.start,
                          run_id=wandb_id)
    log(str(threads))
    return run


def prepare_policy(policy, cfg: DictConfig, dist: D.Dist, log):
    """Activation checkpointing, FSDP2 under a process group, prompt sharing, torch.compile."""
    D.apply_activation_checkpointing(policy, cfg.model.gradient_checkpointing)
    policy = D.shard_policy(policy, dist, cfg.distributed)  # FSDP2 under a process group
    # Prompt sharing runs the decoder stack once or twice per forward depending on the rows (shared
    # prompts or not), so under FSDP2 on several ranks the ranks' layer all-gathers would stop
    # matching (a gloo "collective mismatch"); it would also gather every layer twice. Off there.
    sharded = dist.multi_rank
    policy.share_prompts = cfg.model.share_prompts and not sharded
    if cfg.model.share_prompts and sharded:
        log("learner: model.share_prompts is off under FSDP2 on several ranks (each row runs its own prompt; "
            "same log-probs)")
    if cfg.model.compile:  # the learner's forward/backward; shapes vary by step, so symbolic from the start
        policy.compile_forward(dynamic=True)
    if dist.enabled:
        log(f"learner: FSDP2 over {dist.world_size} rank(s) on {dist.device.type}, compute dtype "
            f"{D.compute_dtype(cfg.distributed, dist.device)}, activation checkpointing {cfg.model.gradient_checkpointing}")
    return policy


# -- one step ---------------------------------------------------------------------------------------
def sample_groups(run: Run, timer) -> tuple:
    """This rank's rollout batch of the step, the verifier's scores in `batch.rewards`: its share of
    data.prompts_per_step prompts, or under algorithm.dynamic_sampling its share of the informative
    groups of up to max_num_gen_batches generation batches (each gathered over ranks before the
    filter, so every rank keeps the same groups). Returns (batch, prompts on this rank, stats)."""
    cfg, dist, a = run.cfg, run.dist, run.cfg.algorithm
    G = a.group_size

    def generate(n: int):
        with timer("rollout"):
            problems = dist.shard(run.prompts.next(n))  # this rank's share (all of them)
            with run.generating():
                b = run.rollout.generate(format_prompts(problems, run.tokenizer, cfg.model.chat_template), G)
        with timer("reward"):
            scores, stats = run.reward_fn(b.texts, [problems[i] for i in b.prompt_index.tolist()])
            b.set_rewards(scores)
        return b, len(problems), stats

    if not a.dynamic_sampling:
        return generate(cfg.data.prompts_per_step)
    groups = GroupFilter(cfg.data.prompts_per_step, G, a.max_num_gen_batches,
                         multiple=group_multiple(a.num_mini_batches, G, dist.world_size))
    stats = []
    while groups.wants_more():
        b, n, st = generate(cfg.data.gen_batch_size or cfg.data.prompts_per_step)
        stats.append(st)
        b = dist.gather_rollouts(b, n)
        groups.add(b, b.rewards if a.filter_metric == "acc" else shaped_reward(b, cfg))
    batch = groups.result()
    share = batch.input_ids.shape[0] // G // dist.world_size
    batch = batch.select(torch.arange(dist.rank * share * G, (dist.rank + 1) * share * G, device=batch.input_ids.device))
    batch.prompt_index = torch.arange(share, device=batch.prompt_index.device).repeat_interleave(G)
    return batch, share, {**mean_dict(stats), **groups.metrics()}


def rl_step(run: Run, step: int) -> dict:
    """One RL step, phase by phase (the module docstring's box); returns the step's metrics."""
    cfg, dist, a = run.cfg, run.dist, run.cfg.algorithm
    timer = PhaseTimer(cuda=run.device.type == "cuda")
    t_step = time.perf_counter()
    batch, n_prompts, stats = sample_groups(run, timer)
    with timer("advantage"):
        compute_advantages(batch, batch.rewards, cfg)
    with timer("logp_old"):
        stats.update(set_logp_old(run.policy, batch, cfg, dist,
                                  recompute=recompute_logp_old_needed(a.recompute_logp_old, run.rollout)))
    if dist.multi_rank:  # every rank now holds the whole step's batch (advantages already per group)
        with timer("gather"):
            batch, stats = dist.gather_rollouts(batch, n_prompts), dist.mean_dict(stats)
    with timer("update"):
        diagnose = cfg.diagnostics.exact_every > 0 and step % cfg.diagnostics.exact_every == 0
        metrics = learner_update(run.policy, run.optimizer, run.scheduler, run.regime, batch, cfg, run.coef_states,
                                 run.gen, dist, run.guard, step, diagnose)
    run.rollout.sync_weights()
    fault_point("during_step", step)
    metrics.update(stats)
    metrics.update(batch.stats)  # the engine's own counters (weight version, speculative acceptance)
    metrics.update(rollout_metrics(batch, a.group_size))
    if step == cfg.trainer.total_steps:  # the final evaluation, on larger held-out sets; also <run dir>/eval.json
        with timer("eval"):
            result = run.evaluate(run.final_sets)
            if dist.is_main:
                write_eval({"label": cfg.run_name, "model": str(run.run_dir), "step": step, **result}, run.run_dir)
            metrics.update(eval_metrics(result))
            metrics["eval/final"] = 1
    elif cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
        with timer("eval"):
            metrics.update(eval_metrics(run.evaluate(run.eval_sets)))
    metrics["time/step_s"] = time.perf_counter() - t_step
    metrics.update(timer.metrics())
    return metrics


# -- the run ----------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path, log=print) -> dict:
    """Run one experiment; returns the final metrics. The run holds its directory's lock for its
    whole life (occ_exp.locks: a second process on it is refused). SIGTERM during set-up stops it at
    once; later, after the current step, with a checkpoint (see occ_exp.preemption)."""
    with GracefulStop(log=log, setup=True) as stop:
        try:
            # one writer per run dir (rank 0 writes; torchrun ends the other ranks if it is refused)
            with run_lock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
                return _train(cfg, Path(run_dir), log, stop)
        except StopRequested:
            return run_summary({}, stop.step, stop.checkpoint, None, run_dir)


def run_summary(last: dict, stopped_at: int | None, checkpoint, metrics_path, run_dir) -> dict:
    """What `train` returns: the final accuracy (None unless the final evaluation ran), where it stopped."""
    return {"final/accuracy": last.get("eval/accuracy") if last.get("eval/final") else None,
            "stopped_at_step": stopped_at, "final/n": last.get("eval/n"),
            "final/acceptance": last.get("mtp/acceptance"), "final/reward": last.get("reward/mean"),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "metrics": str(metrics_path) if metrics_path else None, "run_dir": str(run_dir)}


def _train(cfg: DictConfig, run_dir: Path, log, stop: GracefulStop) -> dict:
    """The run inside the lock: set-up, the evaluation before training, the steps, the summary."""
    run = set_up(cfg, run_dir, log, stop)
    t = cfg.trainer
    if t.eval_before_train and run.start == 0:
        run.tracker.log(eval_metrics(run.evaluate(run.eval_sets)), step=0)
    stop.ready()  # set-up is over: SIGTERM now finishes the step and checkpoints
    bar = tqdm(range(run.start + 1, t.total_steps + 1), desc=f"{cfg.regime.name}", initial=run.start,
               total=t.total_steps, disable=not (t.progress and run.dist.is_main), mininterval=1.0)
    last: dict = run.tracker.last_row if run.start >= t.total_steps else {}  # a finished run: nothing to do
    last_ckpt, stopped_at = run.resumed_from, None
    for step in bar:
        if step == run.start + 1 and stop.should_stop():  # SIGTERM during set-up: nothing new to save
            stopped_at = run.start
            break
        last = rl_step(run, step)
        run.tracker.log(last, step=step)
        bar.set_postfix(reward=f"{last['reward/mean']:.3f}", coef=f"{last['mtp/coef']:+.2e}",
                        accept=f"{last['mtp/acceptance']:.3f}")
        is_last, stopping = step == t.total_steps, stop.should_stop()
        if is_last or stopping or (t.save_every and step % t.save_every == 0):
            last_ckpt = run.checkpoint(step)
        fault_point("after_step", step)
        if stopping and not is_last:
            run.log(f"stopped after step {step} on request (SIGTERM); checkpoint {last_ckpt}. "
                    "Run the same command with the same hydra.run.dir to resume.")
            stopped_at = step
            break
    summary = run_summary(last, stopped_at, last_ckpt, run.tracker.metrics_path, run.run_dir)
    run.tracker.summary(summary)
    run.close()
    return summary
