"""Checkpoints: atomic, self-describing, enough to resume exactly.

    <run dir>/checkpoints/step_000050/
        model/               Hugging Face folder: config.json, model.safetensors (trunk + MTP
                             layers as model.mtp_layers.{i}.*), tokenizer files
        trainer_state.pt     optimizer, scheduler, step, RNG states, data position, OCC state
        config.yaml          the resolved run config
        manifest.json        file sizes and sha256, written last

A checkpoint is written under a temporary name and renamed when complete, so a kill in the
middle of saving leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(folder: Path) -> bool:
    mf = folder / "manifest.json"
    if not mf.exists():
        return False
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    for rel, info in files.items():
        p = folder / rel
        if not p.exists() or p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
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


def latest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest checks out (corrupt or partial ones are skipped)."""
    for _, p in reversed(list_checkpoints(run_dir)):
        if verify_manifest(p):
            return p
    return None


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, trainer_state: dict, config_yaml: str,
                    keep_last: int = 2, model_state_dict: dict | None = None) -> Path:
    """`model_state_dict`: the full state dict of `policy.lm` when the policy itself is sharded
    (FSDP2; see occ_exp.distributed.full_model_state_dict). Call on one rank only."""
    from occ_exp.models.loading import save_policy

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_policy(policy, tokenizer, tmp / "model", state_dict=model_state_dict)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    # prune only after the new one is complete
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


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
