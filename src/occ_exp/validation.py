"""Range and cross-field checks of a composed config, before any long work starts: each failure is
a ConfigError naming the key and the fix. Apart from the schemas (occ_exp.config) because the
checks read the registries of the paper's nouns (regimes, estimators, losses, benchmarks)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from occ_exp.algo.advantages import ADVANTAGES
from occ_exp.algo.coefficient import ESTIMATORS
from occ_exp.algo.policy_loss import LOSS_AGGREGATIONS, POLICY_LOSSES
from occ_exp.algo.regimes import REGIMES
from occ_exp.config import Config
from occ_exp.data.benchmarks import BENCHMARKS
from occ_exp.distributed import world_size_from_env
from occ_exp.errors import ConfigError


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: DictConfig | Config) -> None:
    """Range and cross-field checks, group by group; raises ConfigError with the key and the fix."""
    c = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    for check in (_check_regime, _check_algorithm, _check_optimizer, _check_data_and_rollout, _check_eval,
                  _check_model_and_engine, _check_run, _check_diagnostics, _check_across_groups, _check_fidelity):
        check(c)


def _check_regime(c) -> None:
    """regime.*"""
    r = c.regime
    _require(r.name in REGIMES, "regime.name", f"unknown regime {r.name!r}; choose one of {sorted(REGIMES)}")
    for key in ("coef", "lambda_plus"):
        v = r[key]
        _require(_finite(v), f"regime.{key}", f"must be a finite number, got {v!r}")
    _require(r.coef >= 0, "regime.coef", f"must be >= 0 (a fixed MTP coefficient), got {r.coef}")
    _require(_finite(r.eps) and r.eps > 0, "regime.eps", f"must be > 0 (OCC divides by v2_hat + eps), got {r.eps}")
    _require(r.estimator in ESTIMATORS, "regime.estimator", f"unknown {r.estimator!r}; choose one of {sorted(ESTIMATORS)}")
    _require(0.0 <= r.ema < 1.0, "regime.ema", f"must be in [0, 1), got {r.ema}")
    _require(r.clip is None or (_finite(r.clip) and r.clip > 0), "regime.clip", f"must be null or > 0, got {r.clip}")
    _require(_finite(r.head_ce) and r.head_ce >= 0, "regime.head_ce", f"must be >= 0, got {r.head_ce}")


def _check_algorithm(c) -> None:
    """algorithm.*"""
    a = c.algorithm
    _require(a.advantage in ADVANTAGES, "algorithm.advantage", f"unknown {a.advantage!r}; choose one of {sorted(ADVANTAGES)}")
    _require(a.policy_loss in POLICY_LOSSES, "algorithm.policy_loss", f"unknown {a.policy_loss!r}; choose one of {sorted(POLICY_LOSSES)}")
    _require(a.loss_agg in LOSS_AGGREGATIONS, "algorithm.loss_agg", f"unknown {a.loss_agg!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    _require(a.group_size >= 2, "algorithm.group_size", f"must be >= 2 (group-normalised advantages need a group), got {a.group_size}")
    # The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher). Both > 0 keeps the
    # upper bound above the lower one; clip_high < clip_low is allowed (a tighter upper clip).
    for key in ("clip_low", "clip_high"):
        _require(_finite(a[key]) and a[key] > 0, f"algorithm.{key}",
                 f"must be > 0 (the ratio is clipped to [1-clip_low, 1+clip_high]; a value <= 0 puts the upper bound "
                 f"at or below the lower one), got {a[key]}")
    _require(a.clip_low < 1, "algorithm.clip_low", f"must be < 1 (ratio floor 1-clip_low), got {a.clip_low}")
    _require(_finite(a.adv_eps) and a.adv_eps > 0, "algorithm.adv_eps",
             f"must be > 0 (advantages divide by the group's std + adv_eps; a group with equal rewards has std 0), got {a.adv_eps}")
    _require(a.num_mini_batches >= 1, "algorithm.num_mini_batches", f"must be >= 1, got {a.num_mini_batches}")
    _require(a.ppo_epochs >= 1, "algorithm.ppo_epochs", f"must be >= 1, got {a.ppo_epochs}")
    _require(a.overlong_buffer >= 0, "algorithm.overlong_buffer", f"must be >= 0, got {a.overlong_buffer}")
    _require(a.max_tokens_per_micro_batch >= 0, "algorithm.max_tokens_per_micro_batch",
             f"must be >= 0 (0 = one micro-batch per mini-batch), got {a.max_tokens_per_micro_batch}")


def _check_optimizer(c) -> None:
    """optimizer.*"""
    o = c.optimizer
    _require(_finite(o.lr) and o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(_finite(o.eps) and o.eps > 0, "optimizer.eps", f"must be > 0 (Adam divides by sqrt(v) + eps), got {o.eps}")


def _check_data_and_rollout(c) -> None:
    """data.* (whole groups per mini-batch) and the rollout's sampling settings."""
    a = c.algorithm
    d = c.data
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", f"must be >= 1, got {d.prompts_per_step}")
    _require(d.max_row_chars >= 1, "data.max_row_chars", f"must be >= 1 (the longest data row accepted), got {d.max_row_chars}")
    n_seq = d.prompts_per_step * a.group_size
    _require(
        n_seq % a.num_mini_batches == 0 and d.prompts_per_step % a.num_mini_batches == 0,
        "algorithm.num_mini_batches",
        f"data.prompts_per_step={d.prompts_per_step} must be divisible by num_mini_batches={a.num_mini_batches} "
        "(mini-batches hold whole groups)",
    )
    _require(c.rollout.temperature > 0, "rollout.temperature", f"must be > 0, got {c.rollout.temperature}")
    _require(0 < c.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {c.rollout.top_p}")
    _require(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {c.rollout.max_new_tokens}")
    _require(c.rollout.min_new_tokens >= 0, "rollout.min_new_tokens", f"must be >= 0, got {c.rollout.min_new_tokens}")


def _check_eval(c) -> None:
    """benchmark.names and eval.*"""
    e = c.eval
    unknown = [n for n in c.benchmark.names if n not in BENCHMARKS]
    _require(not unknown, "benchmark.names", f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    _require(e.k >= 1, "eval.k", f"must be >= 1, got {e.k}")
    _require(_finite(e.temperature) and e.temperature >= 0, "eval.temperature", f"must be >= 0 (0 = greedy), got {e.temperature}")
    _require(e.temperature > 0 or e.k == 1, "eval.k",
             f"greedy decoding (eval.temperature=0) gives {e.k} identical samples; set eval.temperature > 0 or eval.k=1")
    _require(0 < e.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {e.top_p}")
    _require(e.max_new_tokens >= 0 and e.max_problems >= 0, "eval.max_new_tokens/max_problems", "must be >= 0 (0 = default)")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")


def _check_model_and_engine(c) -> None:
    """model.* and the rollout engine's settings (vLLM, speculative decoding)."""
    m = c.model
    _require(m.num_mtp_layers >= 1, "model.num_mtp_layers", f"must be >= 1, got {m.num_mtp_layers}")
    _require(m.mtp_warmup_steps >= 0, "model.mtp_warmup_steps", f"must be >= 0 (0 = off), got {m.mtp_warmup_steps}")
    _require(_finite(m.mtp_warmup_lr) and m.mtp_warmup_lr > 0, "model.mtp_warmup_lr", f"must be > 0, got {m.mtp_warmup_lr}")
    _require(m.mtp_warmup_batch_size >= 1, "model.mtp_warmup_batch_size", f"must be >= 1, got {m.mtp_warmup_batch_size}")
    _require(m.mtp_warmup_source in ("auto", "reference", "rollouts"), "model.mtp_warmup_source",
             f"choose auto, reference or rollouts; got {m.mtp_warmup_source!r}")
    _require(m.gguf_file is None or m.path is not None, "model.gguf_file", "needs model.path (the folder holding the file)")
    ro = c.rollout
    _require(ro.speculative in (None, "mtp"), "rollout.speculative", f"choose null or mtp; got {ro.speculative!r}")
    _require(ro.speculative is None or ro.name == "vllm", "rollout.speculative", "speculative decoding needs rollout=vllm")
    _require(ro.num_speculative_tokens == 1, "rollout.num_speculative_tokens",
             f"vLLM's MiMo MTP drafter proposes one token per step; set 1, got {ro.num_speculative_tokens}")
    _require(0 < ro.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
             f"must be in (0, 1], got {ro.gpu_memory_utilization}")
    _require(ro.sleep_level in (1, 2), "rollout.sleep_level", f"choose 1 or 2, got {ro.sleep_level}")
    _require(ro.max_num_seqs >= 1, "rollout.max_num_seqs", f"must be >= 1, got {ro.max_num_seqs}")
    _require(ro.cpu_kv_cache_gb > 0, "rollout.cpu_kv_cache_gb", f"must be > 0, got {ro.cpu_kv_cache_gb}")
    _require(ro.logprobs_mode in ("raw_logprobs", "processed_logprobs"), "rollout.logprobs_mode",
             f"choose raw_logprobs or processed_logprobs; got {ro.logprobs_mode!r}")
    _require(not (ro.speculative and ro.logprobs_mode == "processed_logprobs"), "rollout.logprobs_mode",
             "processed_logprobs under speculative decoding returns zeros / NaN (vLLM 0.32); use raw_logprobs")
    _require(0.0 <= m.warmstart.flaw_rate < 1.0, "model.warmstart.flaw_rate", f"must be in [0, 1), got {m.warmstart.flaw_rate}")
    _require(m.arch.head_dim * m.arch.num_attention_heads > 0, "model.arch", "head_dim and heads must be > 0")


def _check_run(c) -> None:
    """trainer.*, logger.* and the distributed layout."""
    t = c.trainer
    _require(t.total_steps >= 0, "trainer.total_steps", f"must be >= 0, got {t.total_steps}")
    _require(t.eval_every >= 0 and t.save_every >= 0, "trainer.eval_every/save_every", "must be >= 0 (0 = off)")
    _require(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(t.max_consecutive_skips >= 1, "trainer.max_consecutive_skips", f"must be >= 1, got {t.max_consecutive_skips}")
    _require(bool(t.resume), "trainer.resume", "choose auto, never or the path of a checkpoint folder")
    _require(t.device in ("auto", "cpu", "cuda"), "trainer.device", f"choose auto, cpu or cuda; got {t.device!r}")
    _require(c.logger.name in ("jsonl", "wandb", "none"), "logger.name", f"choose jsonl, wandb or none; got {c.logger.name!r}")
    _validate_distributed(c)
    _require(c.logger.mode in ("online", "offline", "disabled", "shared"), "logger.mode",
             f"choose online, offline, disabled or shared (a wandb mode); got {c.logger.mode!r}")


def _check_diagnostics(c) -> None:
    """diagnostics.*"""
    dg = c.diagnostics
    _require(dg.exact_every >= 0, "diagnostics.exact_every", "must be >= 0 (0 = off)")
    _require(not dg.taylor_check or dg.exact_every >= 1, "diagnostics.taylor_check",
             "runs on diagnosed steps only; also set diagnostics.exact_every >= 1")
    _require(dg.taylor_eta is None or (_finite(dg.taylor_eta) and dg.taylor_eta > 0), "diagnostics.taylor_eta",
             f"must be null (= optimizer.lr) or > 0, got {dg.taylor_eta}")
    _require(not (dg.taylor_check and c.model.compile), "diagnostics.taylor_check",
             "needs second derivatives, which torch.compile'd graphs do not give; set model.compile=false")


def _check_across_groups(c) -> None:
    """Rules that tie several groups together."""
    r, a, dg = c.regime, c.algorithm, c.diagnostics
    exact = (r.name == "occ" and r.estimator == "exact") or dg.exact_every > 0
    _require(not exact or (a.max_tokens_per_micro_batch == 0 and (world_size_from_env() or 1) == 1),
             "diagnostics.exact_every / regime.estimator=exact",
             "exact gradients are taken on one whole mini-batch in one process: set "
             "algorithm.max_tokens_per_micro_batch=0 and run without torchrun (or use estimator=paper)")
    _require(r.head_ce == 0 or REGIMES[r.name].train_heads, "regime.head_ce",
             f"regime={r.name} does not train the MTP heads; set regime.head_ce=0 or pick another regime")


def _check_fidelity(c) -> None:
    """lambda's application, dual-clip, dynamic sampling, micro-batches, temperatures, reward scale."""
    r, a, d, t, ro = c.regime, c.algorithm, c.data, c.trainer, c.rollout
    world = world_size_from_env() or 1
    _require(r.lambda_apply in ("loss", "advantage"), "regime.lambda_apply",
             f"choose loss or advantage; got {r.lambda_apply!r}")
    if r.lambda_apply == "advantage":
        _require(REGIMES[r.name].policy_term, "regime.lambda_apply",
                 f"advantage scales the advantages of the MTP policy loss; regime={r.name} has none (use policy or occ, "
                 "or lambda_apply=loss)")
        _require(r.estimator != "exact" and c.diagnostics.exact_every == 0, "regime.lambda_apply",
                 "the exact gradients (estimator=exact, diagnostics.exact_every) need lambda_apply=loss")
    _require(a.clip_ratio_c is None or (_finite(a.clip_ratio_c) and a.clip_ratio_c > 1), "algorithm.clip_ratio_c",
             f"must be null (off) or > 1 (the dual-clip bound of the ratio for negative advantages), got {a.clip_ratio_c}")
    _require(a.max_num_gen_batches >= 1, "algorithm.max_num_gen_batches",
             f"must be >= 1 (generation batches per step under dynamic sampling), got {a.max_num_gen_batches}")
    _require(a.filter_metric in ("acc", "score"), "algorithm.filter_metric", f"choose acc or score; got {a.filter_metric!r}")
    if d.gen_batch_size is not None:
        _require(d.gen_batch_size >= d.prompts_per_step, "data.gen_batch_size",
                 f"must be >= data.prompts_per_step={d.prompts_per_step} (or null), got {d.gen_batch_size}")
        _require(d.gen_batch_size % world == 0, "data.gen_batch_size",
                 f"{d.gen_batch_size} prompts do not split over {world} ranks; use a multiple of {world}")
    _require(t.micro_batch_size >= 0, "trainer.micro_batch_size", f"must be >= 0 (0 = off), got {t.micro_batch_size}")
    if t.micro_batch_size:
        rows = d.prompts_per_step * a.group_size // a.num_mini_batches // world
        _require(rows % t.micro_batch_size == 0, "trainer.micro_batch_size",
                 f"{t.micro_batch_size} does not divide a mini-batch's {rows} sequences per rank; choose a divisor")
        _require(a.max_tokens_per_micro_batch == 0, "trainer.micro_batch_size",
                 "micro-batches by count and by tokens exclude each other; set algorithm.max_tokens_per_micro_batch=0")
    _require(_finite(a.temperature) and a.temperature == ro.temperature, "algorithm.temperature",
             f"the learner's temperature {a.temperature} differs from the sampler's rollout.temperature={ro.temperature}; "
             "every ratio would be off: leave algorithm.temperature unset (it follows rollout.temperature)")
    _require(not (ro.name == "vllm" and ro.temperature != 1 and ro.logprobs_mode == "raw_logprobs"),
             "rollout.logprobs_mode", f"raw_logprobs are at temperature 1, the learner's at rollout.temperature="
             f"{ro.temperature}; set rollout.logprobs_mode=processed_logprobs")
    _require(c.reward.scale in ("binary", "signed"), "reward.scale", f"choose binary or signed; got {c.reward.scale!r}")


def _validate_distributed(c) -> None:
    """The layout rules of the sharded learner: whole groups per rank, equal slices per mini-batch."""

    dc, a, d = c.distributed, c.algorithm, c.data
    _require(dc.backend in ("auto", "nccl", "gloo"), "distributed.backend", f"choose auto, nccl or gloo; got {dc.backend!r}")
    _require(dc.mixed_precision in ("auto", "bf16", "fp32"), "distributed.mixed_precision",
             f"choose auto, bf16 or fp32; got {dc.mixed_precision!r}")
    _require(dc.nodes >= 1 and dc.gpus_per_node >= 1, "distributed.nodes/gpus_per_node", "must be >= 1")
    _require(dc.timeout_min >= 1, "distributed.timeout_min", f"must be >= 1, got {dc.timeout_min}")
    world = world_size_from_env() or 1
    _require(d.prompts_per_step % world == 0, "data.prompts_per_step",
             f"{d.prompts_per_step} prompts do not split over {world} ranks (whole groups per rank); "
             f"use a multiple of {world}")
    mb_rows = d.prompts_per_step * a.group_size // a.num_mini_batches
    _require(mb_rows % world == 0, "algorithm.num_mini_batches",
             f"a mini-batch of {mb_rows} sequences does not split over {world} ranks; "
             "choose prompts_per_step, group_size and num_mini_batches so that it does")
