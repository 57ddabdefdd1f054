"""Build, save and load policies (trunk + MTP layers) as Hugging Face folders.

A saved folder is an ordinary transformers checkpoint (config.json, model.safetensors,
tokenizer files) whose state dict also holds `model.mtp_layers.{i}.*` and whose config carries
`num_nextn_predict_layers`, as MiMo checkpoints do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from occ_exp.models.policy import MTPPolicy


class CheckpointError(ValueError):
    """A checkpoint does not fit the configured model."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype: unknown {name!r}; choose auto or one of {sorted(table)}")
    return table[name]


def build_tiny_policy(model_cfg, seed: int = 0) -> tuple[MTPPolicy, object]:
    """The tiny model with random weights (the warm start trains it)."""
    from occ_exp.models.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(model_cfg.arch, tokenizer, model_cfg.num_mtp_layers)
    config._attn_implementation = model_cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = Qwen2ForCausalLM(config)
        policy = MTPPolicy(lm, model_cfg.num_mtp_layers)
        policy.lm.model.mtp_layers.apply(lm._init_weights)
    return policy, tokenizer


def save_policy(policy: MTPPolicy, tokenizer, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write a Hugging Face folder with the MTP weights under MiMo's names. `state_dict` (of
    `policy.lm`) replaces the module's own tensors, e.g. the full weights of an FSDP2-sharded policy."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    policy.lm.config.num_nextn_predict_layers = policy.num_mtp_layers
    policy.lm.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _state_dict_from_folder(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; is this a saved model folder?")


def check_tokenizer(tokenizer, path) -> None:
    """The special tokens the pipeline needs: eos (ends a response; the response mask is cut at it)
    and pad (prompts are batched with left padding). Missing ones are a CheckpointError."""
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer_config.json); save the tokenizer into the model folder")
    missing = [name for name in ("eos", "pad") if getattr(tokenizer, f"{name}_token_id", None) is None]
    if missing:
        raise CheckpointError(
            f"{path}: the tokenizer has no {' and no '.join(missing)} token; occ-exp needs eos (ends a response) and "
            "pad (batches prompts). Set them and save the tokenizer into the folder, e.g. "
            "tok.pad_token = tok.eos_token; tok.save_pretrained(path)"
        )


def load_policy_folder(path: str | os.PathLike, expected_config=None, device="cpu", dtype=torch.float32,
                       num_mtp_layers: int | None = None):
    """Load a folder written by `save_policy` (trunk and MTP layers, bit for bit).

    `expected_config` (a Qwen2Config) makes a size mismatch a clear error instead of a crash;
    `num_mtp_layers` does the same for the number of MTP layers alone (model.path runs)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json; expected a folder written by occ_exp (save_policy)")
    config = Qwen2Config.from_pretrained(path)
    k_saved = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if num_mtp_layers is not None and k_saved and k_saved != num_mtp_layers:
        raise CheckpointError(
            f"checkpoint {path} has {k_saved} MTP layer(s) but model.num_mtp_layers={num_mtp_layers}; "
            f"set model.num_mtp_layers={k_saved} or point model.path at a matching checkpoint"
        )
    if expected_config is not None:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_nextn_predict_layers")
        diff = {k: (getattr(config, k, None), getattr(expected_config, k, None)) for k in keys
                if getattr(config, k, None) != getattr(expected_config, k, None)}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"checkpoint {path} was written for another model size ({detail}); "
                "point at a checkpoint of this model, or change model.* to match it"
            )
    k = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    lm = Qwen2ForCausalLM(config)
    policy = MTPPolicy(lm, max(k, 1))
    sd = _state_dict_from_folder(path)
    missing, unexpected = policy.lm.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        policy.lm.tie_weights()
    policy.to(device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return policy, tokenizer
