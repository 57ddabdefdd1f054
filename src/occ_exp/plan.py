"""`trainer.dry_run=true`: print the resolved plan of a run without loading any weights.

    python -m occ_exp.train experiment=mimo7b_dapo trainer.dry_run=true

The model is sized from its config.json (a local folder, or the Hugging Face cache; no network),
else from the public architecture table below, and instantiated on the meta device to count
parameters exactly. The memory estimate per GPU is a transparent sum of named parts (printed);
it is an estimate, not a measurement: scripts/gpu_check.sh measures the real peak on a GPU.
The plan also gives the fewest GPUs the estimate fits on and the GPU-hours of the whole run (from
the model FLOPs at assumed efficiencies, printed with it). `check_resources` is the one-line
refusal a real run gives before loading weights when the machine has too few GPUs for it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from occ_exp.builders import build_task
from occ_exp.config import ConfigError
from occ_exp.data.benchmarks import TINY_HELD_OUT
from occ_exp.distributed import world_size_from_env
from occ_exp.models.policy import MTPPolicy
from occ_exp.models.tiny import build_tokenizer, tiny_config
from occ_exp.validation import validate

GiB = 1024**3
CARD_GIB = 80.0  # an H100 / A100-80GB
PROMPT_TOKENS = 512  # assumed prompt length of file-backed data sets (a dry run reads no data)
# GPU-hours: a dense bf16 peak (H100 SXM) and the fractions of it the learner (forward + backward)
# and generation (memory-bound decoding) reach; assumptions, printed with the estimate
PEAK_FLOPS = 989e12
LEARNER_MFU = 0.30
ROLLOUT_MFU = 0.06
# problems per benchmark (a dry run reads no data); benchmark=tiny draws TINY_HELD_OUT problems
BENCHMARK_SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva_math": 272, "olympiadbench": 675}

# Public config.json values of the checkpoints the presets name (used when no config.json is local).
KNOWN_ARCHS = {
    "mimo-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=151680, tie_word_embeddings=False),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
_ALIASES = [(r"mimo[-_]?7b", "mimo-7b"), (r"qwen2?\.?5?[-_]?7b", "qwen2.5-7b"), (r"qwen2?\.?5?[-_]?0\.?5b|qwen05b", "qwen2.5-0.5b")]


# -- the model's size -------------------------------------------------------------------------------
def model_config(model_cfg):
    """(Qwen2Config, where it came from) without loading weights."""
    if model_cfg.path is None:
        return tiny_config(model_cfg.arch, build_tokenizer(), model_cfg.num_mtp_layers), "built in code (tiny)"
    path = str(model_cfg.path)
    local = Path(path) / "config.json"
    if not local.exists():
        try:
            cached = try_to_load_from_cache(path, "config.json")
            local = Path(cached) if isinstance(cached, str) else local
        except Exception:  # not a hub id, or not in the cache: fall through to the table
            pass
    if local.exists():
        d = json.loads(local.read_text())
        d.pop("model_type", None)
        return Qwen2Config(**d), f"{local}"
    key = f"{model_cfg.name} {path}".lower()
    for pattern, name in _ALIASES:
        if re.search(pattern, key):
            return Qwen2Config(**KNOWN_ARCHS[name]), f"known-size table ({name}; config.json not on this machine)"
    raise ConfigError(f"model.path: {model_cfg.name!r} ({path}) has no config.json locally and not in the known-size table "
                     f"{sorted(KNOWN_ARCHS)}; download the config (huggingface-cli download {path} config.json)")


@dataclass
class ModelSize:
    total: int  # all parameters (trunk + MTP layers)
    mtp: int  # MTP layers
    embed: int  # the token embedding table
    root: int  # what the FSDP2 root holds: embeddings, final norm, LM head
    largest_unit: int  # the largest FSDP2 unit (a decoder or MTP layer)
    matmul_per_token: int  # parameters a token multiplies through (trunk layers, K MTP layers, 1+K LM heads)
    layers: int  # decoder layers + MTP layers
    num_mtp_layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int


def model_size(config, num_mtp_layers: int) -> ModelSize:
    """Exact parameter counts from the architecture, on the meta device (no memory, no weights)."""
    config.num_nextn_predict_layers = num_mtp_layers
    with torch.device("meta"):  # the architecture's own class (Qwen2, MiMo, Llama for SmolLM2, ...)
        policy = MTPPolicy(AutoModelForCausalLM.from_config(config), num_mtp_layers)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    total = count(policy)  # shared (tied) tensors counted once
    lm = policy.lm
    layers = list(lm.model.layers) + list(policy.mtp_layers)
    H, V = config.hidden_size, config.vocab_size
    mtp = count(policy.mtp_layers)
    trunk_layers = count(lm.model.layers)
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    return ModelSize(
        total=total, mtp=mtp, embed=V * H, root=total - trunk_layers - mtp,
        largest_unit=max(count(m) for m in layers), layers=len(layers), num_mtp_layers=num_mtp_layers,
        matmul_per_token=trunk_layers + mtp + (1 + num_mtp_layers) * V * H,
        hidden=H, intermediate=config.intermediate_size, vocab=V, kv_dim=config.num_key_value_heads * head_dim,
    )


def train_flops_per_token(size: ModelSize, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward): 6 N + 12 L H S (PaLM, appendix B),
    N = parameters a token multiplies through, L = decoder + MTP layers, S = sequence length.
    Recomputation (activation checkpointing) and no-grad passes are not model FLOPs."""
    return 6.0 * size.matmul_per_token + 12.0 * size.layers * size.hidden * seq_len


# -- the plan ---------------------------------------------------------------------------------------
def prompt_tokens(cfg) -> int:
    """The longest prompt: measured on the procedural tiny task, assumed for file-backed data."""
    if cfg.data.name != "tiny" or cfg.model.path is not None:
        return PROMPT_TOKENS
    task, tok, rng = build_task(cfg.data), build_tokenizer(), random.Random(0)
    return max(len(tok(task.sample(rng, "train").prompt)["input_ids"]) for _ in range(64))


def rows_per_micro_batch(cfg, world: int, seq: int) -> int:
    """Full-length sequences per forward / backward (at least one; the whole per-rank share of a
    mini-batch without a token budget)."""
    a = cfg.algorithm
    rows = cfg.data.prompts_per_step * a.group_size // a.num_mini_batches // world
    return min(rows, max(1, a.max_tokens_per_micro_batch // seq)) if a.max_tokens_per_micro_batch else rows


def world_size(cfg) -> tuple[int, str]:
    env = world_size_from_env()
    if env is not None:
        return env, "environment (torchrun / Slurm)"
    d = cfg.distributed
    return d.nodes * d.gpus_per_node, f"distributed.nodes x gpus_per_node = {d.nodes} x {d.gpus_per_node}"


def memory_plan(cfg, size: ModelSize, world: int, sharded: bool) -> dict[str, float]:
    """Bytes per GPU, by part (see the module docstring: an estimate)."""
    a, r, d, m = cfg.algorithm, cfg.rollout, cfg.data, cfg.model
    K = m.num_mtp_layers
    H, I, V, L = size.hidden, size.intermediate, size.vocab, size.layers
    seq = prompt_tokens(cfg) + r.max_new_tokens
    rows = rows_per_micro_batch(cfg, world, seq)  # full-length rows in one forward / backward
    T, T_resp = rows * seq, rows * r.max_new_tokens
    parts: dict[str, float] = {}
    if sharded:
        parts["weights (fp32 master, sharded)"] = 4 * size.total / world
        parts["gradients (fp32, sharded)"] = 4 * size.total / world
        parts["AdamW moments (fp32, sharded)"] = 8 * size.total / world
        parts["FSDP2 gathered units (bf16: root + 2 layers)"] = 2 * (size.root + 2 * size.largest_unit)
    else:
        b = 2 if cfg.model.dtype in ("auto", "bf16", "bfloat16") else 4
        parts[f"weights ({'bf16' if b == 2 else 'fp32'})"] = b * size.total
        parts["gradients"] = b * size.total
        parts["AdamW moments"] = 2 * b * size.total
    per_layer = 2 * (6 * H + 4 * I)  # bf16 bytes per token stored by one decoder block
    if m.gradient_checkpointing:
        parts["activations (checkpointed: block inputs + one block)"] = T * (L * 2 * H + per_layer)
    else:
        parts["activations (every block)"] = T * L * per_layer
    parts["logits (1+K heads: bf16 + fp32 copy, + fp32 grad / softmax)"] = T_resp * V * ((1 + K) * 6 + 8)
    if r.name == "vllm":
        util = OmegaConf.select(cfg, "rollout.gpu_memory_utilization", default=None)
        if util is not None:
            parts[f"vLLM colocated (gpu_memory_utilization {util})"] = float(util) * CARD_GIB * GiB
    elif r.name == "hf":
        seqs = r.batch_size or d.prompts_per_step * a.group_size // world
        rollout = 2 * size.total + seqs * seq * L * 2 * size.kv_dim * 2
        learner_transient = sum(v for k, v in parts.items() if k.startswith(("activations", "logits")))
        # generation and the update do not overlap: count whichever is larger
        if rollout > learner_transient:
            parts["rollout=hf (full bf16 weights + KV cache), exceeds the learner's transients"] = rollout - learner_transient
    return parts


def fewest_gpus(cfg, size: ModelSize, card_bytes: float = CARD_GIB * GiB, most: int = 4096) -> int | None:
    """The smallest world size (1, 2, 4, 8, then multiples of 8) whose memory estimate fits a card;
    None if none up to `most` does."""
    worlds = [1, 2, 4] + list(range(8, most + 1, 8))
    for w in worlds:
        if sum(memory_plan(cfg, size, w, sharded=w > 1).values()) < card_bytes:
            return w
    return None


def _eval_problems(cfg, limit: int) -> int:
    sizes = [TINY_HELD_OUT if n == "tiny" else BENCHMARK_SIZES.get(n, 500) for n in cfg.benchmark.names]
    return sum(min(n, limit) if limit else n for n in sizes)


def gpu_hours(cfg, size: ModelSize, world: int) -> dict:
    """GPU-hours of the whole run (estimate): per step, the learner's model FLOPs (+ the logp_old
    forward) at LEARNER_MFU and generation at ROLLOUT_MFU of PEAK_FLOPS on every GPU; plus the
    evaluations (in-training every eval_every steps, and the final one), generation only."""
    a, d, r, t, e = cfg.algorithm, cfg.data, cfg.rollout, cfg.trainer, cfg.eval
    P = prompt_tokens(cfg)
    seq = P + r.max_new_tokens
    seqs = d.prompts_per_step * a.group_size
    trunk = size.matmul_per_token - size.mtp - size.num_mtp_layers * size.embed  # what generation multiplies through
    learner_s = (a.ppo_epochs * train_flops_per_token(size, seq) + 2 * size.matmul_per_token) * seqs * seq \
        / (world * PEAK_FLOPS * LEARNER_MFU)
    gen = lambda n_seqs, new: 2.0 * trunk * n_seqs * (P + new) / (world * PEAK_FLOPS * ROLLOUT_MFU)  # noqa: E731
    rollout_s = gen(seqs, r.max_new_tokens)
    eval_new = e.max_new_tokens or r.max_new_tokens
    n_evals = (t.total_steps // t.eval_every if t.eval_every else 0) - (1 if t.eval_every and t.total_steps % t.eval_every == 0 else 0)
    n_evals += 1 if t.eval_before_train else 0
    eval_s = n_evals * gen(_eval_problems(cfg, t.eval_problems) * e.k, eval_new) \
        + gen(_eval_problems(cfg, t.final_eval_problems) * e.k, eval_new)
    total_s = t.total_steps * (learner_s + rollout_s) + eval_s
    return {"gpu_hours": world * total_s / 3600, "hours": total_s / 3600, "learner_s": learner_s,
            "rollout_s": rollout_s, "eval_h": eval_s / 3600}


def check_resources(cfg, gpus: int | None = None, card_bytes: float | None = None) -> str | None:
    """One line saying why this machine cannot run `cfg` (None when it can), before any weights
    load: a CUDA run with no CUDA GPU, or a plan whose memory estimate exceeds this job's GPUs.
    `gpus` (this job's world size) and `card_bytes` default to what this process sees."""
    if cfg.trainer.device == "cpu" or cfg.model.path is None:
        return None
    visible = torch.cuda.device_count()
    if cfg.trainer.device == "cuda" and gpus is None and visible == 0:
        return (f"this run needs CUDA GPUs (trainer.device=cuda; the plan: {planned_gpus(cfg)}) and this machine has "
                "none; run it where GPUs are, or trainer.device=cpu for a CPU run")
    if gpus is None and visible == 0:  # trainer.device=auto on a CPU machine: a CPU run
        return None
    world = gpus if gpus is not None else (world_size_from_env() or 1)
    if card_bytes is None:
        card_bytes = torch.cuda.get_device_properties(0).total_memory if visible else CARD_GIB * GiB
    try:
        config = model_config(cfg.model)[0]
    except ConfigError:  # a model the plan cannot size without downloading it: loading will tell
        return None
    size = model_size(config, cfg.model.num_mtp_layers)
    need = sum(memory_plan(cfg, size, world, sharded=world > 1 or "WORLD_SIZE" in os.environ).values())
    if need < card_bytes:
        return None
    fewest = fewest_gpus(cfg, size, card_bytes)
    at_least = f"at least {fewest} GPUs" if fewest else "more GPUs than any plan up to 4096 (shorten the responses or batch)"
    return (f"this run needs about {need / GiB:.0f} GiB per GPU on {world} GPU(s) by the plan's estimate, more than "
            f"this GPU's {card_bytes / GiB:.0f} GiB: it needs {at_least} (the plan: {planned_gpus(cfg)}); launch it "
            "with torchrun / hydra/launcher=slurm on them (trainer.dry_run=true prints the plan)")


def planned_gpus(cfg) -> str:
    d = cfg.distributed
    return f"{d.nodes * d.gpus_per_node} GPUs = distributed.nodes x gpus_per_node = {d.nodes} x {d.gpus_per_node}"


def build_plan(cfg) -> dict:
    validate(cfg)
    a, d, r, m = cfg.algorithm, cfg.data, cfg.rollout, cfg.model
    world, world_src = world_size(cfg)
    on_gpu = cfg.trainer.device in ("cuda", "auto") and m.path is not None
    sharded = world > 1 or "WORLD_SIZE" in os.environ
    config, source = model_config(m)
    size = model_size(config, m.num_mtp_layers)
    P = prompt_tokens(cfg)
    seq = P + r.max_new_tokens
    seqs = d.prompts_per_step * a.group_size
    rows = seqs // a.num_mini_batches // world
    micro = math.ceil(rows / rows_per_micro_batch(cfg, world, seq))
    tokens = seqs * seq
    learner_flops = a.ppo_epochs * train_flops_per_token(size, seq) * tokens  # model FLOPs (MFU's numerator)
    mem = memory_plan(cfg, size, world, sharded)
    total_mem = sum(mem.values())
    fewest = fewest_gpus(cfg, size)
    cost = gpu_hours(cfg, size, world)
    return {
        "model": f"{m.name} ({m.path or 'built in code'})",
        "architecture from": source,
        "parameters": f"{size.total / 1e9:.3f} B (MTP layers {size.mtp / 1e6:.1f} M, K={m.num_mtp_layers})",
        "world size": f"{world} ({world_src})",
        "learner": (f"FSDP2 over {world} ranks, fp32 master weights, "
                    f"{'bf16' if on_gpu else 'fp32'} compute, reshard_after_forward={cfg.distributed.reshard_after_forward}")
                   if sharded else "one process (no process group)",
        "activation checkpointing": bool(m.gradient_checkpointing),
        "rollout": f"{r.name}, {seqs} sequences ({d.prompts_per_step} prompts x {a.group_size}), "
                   f"<= {r.max_new_tokens} new tokens, temperature {r.temperature}",
        "tokens per step (max)": f"{tokens:,} ({seqs:,} x ({P} prompt + {r.max_new_tokens}))",
        "response tokens per step (max)": f"{seqs * r.max_new_tokens:,}",
        "optimizer steps per rollout": a.num_mini_batches * a.ppo_epochs,
        "sequences per rank per mini-batch": rows,
        "micro-batches per rank per mini-batch (max)": f"{micro} (max_tokens_per_micro_batch={a.max_tokens_per_micro_batch})",
        "learner model FLOPs per step (max)": f"{learner_flops:.3e}",
        "memory per GPU (estimate)": {k: f"{v / GiB:.1f} GiB" for k, v in mem.items()},
        "memory per GPU, total (estimate)": f"{total_mem / GiB:.1f} GiB "
                                            f"({'fits' if total_mem < CARD_GIB * GiB else 'exceeds'} an {CARD_GIB:.0f} GB card)"
                                            + (f"; on {fewest} GPUs (FSDP2): {sum(memory_plan(cfg, size, fewest, True).values()) / GiB:.1f} GiB"
                                               if fewest and fewest > world else ""),
        "GPUs needed (fewest the estimate fits)": (f"{fewest} ({'within' if fewest <= world else 'MORE than'} the "
                                                  f"{world} planned)") if fewest else "none up to 4096: shorten the responses or batch",
        "total steps": cfg.trainer.total_steps,
        "GPU-hours, whole run (estimate)": (
            f"{cost['gpu_hours']:,.{0 if cost['gpu_hours'] >= 10 else 2}f} ({world} GPUs x {cost['hours']:.1f} h: {cfg.trainer.total_steps} steps x "
            f"(learner {cost['learner_s']:.0f} s + rollout {cost['rollout_s']:.0f} s) + evaluation {cost['eval_h']:.1f} h; "
            f"assumes {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 per GPU at {LEARNER_MFU:.0%} (learner) / "
            f"{ROLLOUT_MFU:.0%} (generation), every response at full length)"),
        "_bytes_per_gpu": total_mem,
        "_gpu_hours": cost["gpu_hours"],
        "_fewest_gpus": fewest,
    }


def print_plan(cfg, console) -> dict:
    plan = build_plan(cfg)
    console.print(OmegaConf.to_yaml(cfg), soft_wrap=True)
    console.print("[bold]plan[/] (no weights loaded)")
    for k, v in plan.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict):
            console.print(f"{k:>46}:", soft_wrap=True)
            for kk, vv in v.items():
                console.print(f"{'':>48}{kk}: {vv}", soft_wrap=True)
        else:
            console.print(f"{k:>46}: {v}", soft_wrap=True, markup=False)
    return plan
