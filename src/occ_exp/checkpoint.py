"""Checkpoints: atomic, self-describing, enough to resume exactly.

    <run dir>/checkpoints/step_000050/
        model/               Hugging Face folder: config.json, model.safetensors (trunk + MTP
                             layers as model.mtp_layers.{i}.*), tokenizer files
        trainer_state.pt     `TrainState`: step, optimizer, scheduler, RNG states, data position,
                             OCC estimator and numerical-guard state, rollout engine state, W&B id
        dcp/                 runs under a process group (FSDP2) only: the optimizer state, float32
                             master weights (if the model folder rounds them) and every rank's RNGs,
                             sharded per rank by torch.distributed.checkpoint (__<rank>_0.distcp,
                             .metadata); trainer_state.pt then holds the rest (`sharded_state`: "dcp")
        config.yaml          the resolved run config
        manifest.json        file sizes and sha256 (of the dcp/ shards too), written last

A checkpoint is written under a temporary name (`.tmp_step_N_<pid>`), its files fsynced and
hashed into the manifest, and then renamed: a kill in the middle of saving leaves the previous
checkpoint as the newest complete one, and `latest_complete` skips any folder whose manifest does
not check out. `keep_last` prunes older checkpoints only after the new one is complete, and never
counts an incomplete one among those it keeps.

This module imports no model code: `save_checkpoint` takes a model-writer callable (the trainer
passes occ_exp.models.loading.save_policy bound to its policy), and the reader
(occ_exp.builders.resume_from) loads the model folder itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from occ_exp.errors import ConfigError
from occ_exp.faults import fault_point

CKPT_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Everything besides the weights that a run needs to resume exactly (trainer_state.pt). The
    field names are the file's keys, as written before this class existed, so older checkpoints
    load unchanged; fields they lack stay None."""

    step: int
    optimizer: dict | None = None  # the full optimizer state (occ_exp.distributed.optimizer_state_dict)
    scheduler: dict | None = None
    rng: dict | None = None  # this process's RNGs (occ_exp.runtime.rng_state)
    generator: torch.Tensor | None = None  # the mini-batch shuffler's torch.Generator state
    prompts: dict | None = None  # the data position (data.prompts.PromptStream)
    coef_states: list[dict] = field(default_factory=list)  # OCC estimator state, one per MTP depth
    guard: dict | None = None  # the learner's NonFiniteGuard counters
    rollout: dict | None = None  # the rollout engine's own state (Rollout.state_dict)
    rng_per_rank: list[dict] | None = None  # every rank's RNGs (sharded runs only)
    wandb_id: str | None = None  # the W&B run this run logs to
    # the trained weights (of policy.lm) when the model folder holds them rounded: a bf16 source
    # trained in float32 is saved in bf16 (what serving reads) and resumes from these
    master_weights: dict | None = None
    # the subfolder holding the optimizer, master weights and per-rank RNGs as a sharded
    # torch.distributed.checkpoint (runs under a process group); None: all of it is in this file
    sharded_state: str | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, state: dict) -> "TrainState":
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    @classmethod
    def load(cls, ckpt: Path) -> "TrainState":
        return cls.from_dict(load_trainer_state(ckpt))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_entry(path: Path) -> dict:
    """One file's manifest entry (size and sha256), after fsyncing it."""
    _fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """Hash every file (after fsyncing it) into manifest.json, written last. `known`: entries
    already computed (relative path -> `manifest_entry`), e.g. by the ranks that wrote the shards."""
    known = known or {}
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = str(p.relative_to(folder))
            files[rel] = known[rel] if rel in known else manifest_entry(p)
    atomic_write_text(folder / "manifest.json", json.dumps({"files": files}, indent=1))


def verify_manifest(folder: Path, hashes: bool = True) -> bool:
    """True if every file of the manifest is there with its size (and, with `hashes`, its sha256)."""
    mf = folder / "manifest.json"
    if not mf.exists():
        return False
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return False
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != info["bytes"] or (hashes and _sha256(p) != info["sha256"]):
            return False
    return True


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = checkpoint_dir(run_dir)
    if not d.exists():
        return []
    out = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_complete(run_dir: Path, log=None) -> Path | None:
    """The newest checkpoint whose manifest checks out (corrupt or partial ones are skipped)."""
    for _, p in reversed(list_checkpoints(run_dir)):
        if verify_manifest(p):
            return p
        if log is not None:
            log(f"checkpoint {p} is incomplete or corrupt (manifest does not check out); skipping it")
    return None


def resolve_resume(run_dir: Path, resume: str, log=None) -> Path | None:
    """`trainer.resume`: auto (the newest complete checkpoint in the run dir, if any), never, or
    the path of one checkpoint folder, which must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(run_dir, log)
    p = Path(resume)
    if not p.is_dir() or not verify_manifest(p):
        raise ConfigError(f"trainer.resume: {p} is not a complete checkpoint (no folder, or its manifest.json does "
                          "not check out); use auto, never, or a <run dir>/checkpoints/step_N folder")
    return p


def set_aside_newer(run_dir: Path, step: int, log=None) -> None:
    """Resuming at `step` abandons any later checkpoint (corrupt, or of a timeline resumed from an
    earlier one): move them to checkpoints/superseded/ so that `auto` can never pick them again."""
    newer = [p for s, p in list_checkpoints(run_dir) if s > step]
    if not newer:
        return
    dest = checkpoint_dir(run_dir) / "superseded"
    dest.mkdir(exist_ok=True)
    for p in newer:
        target = dest / f"{p.name}_{os.getpid()}"
        os.replace(p, target)
        if log is not None:
            log(f"checkpoint {p.name} is newer than the resumed step {step}; moved to {target}")


def save_checkpoint(run_dir: Path, step: int, write_model: Callable[[Path], None], state: TrainState,
                    config_yaml: str, keep_last: int = 2,
                    write_shards: Callable[[Path], dict] | None = None) -> Path:
    """Checkpoint `step`: `write_model(folder)` writes the model folder (e.g. save_policy bound to
    the policy, its tokenizer and, under FSDP2, the gathered full state dict). Call on one rank only.
    `write_shards(checkpoint folder)`, called first, writes files of its own into the folder (the
    sharded trainer state, with the other ranks) and returns their manifest entries."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    known = write_shards(tmp) if write_shards is not None else None
    write_model(tmp / "model")
    torch.save(state.to_dict(), tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    fault_point("during_save", step)
    write_manifest(tmp, known)
    old = None
    if final.exists():  # re-saving a step: move the old folder aside, never delete before the rename
        old = root / f".old_step_{step:06d}_{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(run_dir, step, keep_last)
    return final


def prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints up to `step`; delete older ones, incomplete
    older ones and leftovers of interrupted saves. Called only after checkpoint `step` is complete."""
    older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    complete = [p for _, p in older if verify_manifest(p, hashes=False)]
    keep = set(complete[-keep_last:])
    for _, p in older:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for stale in list(checkpoint_dir(run_dir).glob(".tmp_step_*")) + list(checkpoint_dir(run_dir).glob(".old_step_*")):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_trainer_state(ckpt: Path) -> dict:
    # mmap: tensors are read when touched, so ranks that do not restore the (rank-0) optimizer
    # state never page it in
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
