"""Checkpoints: atomic, self-describing, enough to resume exactly.

    <run dir>/checkpoints/step_000050/
        model/               Hugging Face folder: config.json, model.safetensors (trunk + MTP
                             layers as model.mtp_layers.{i}.*), tokenizer files
        trainer_state.pt     optimizer, scheduler, step, RNG states, data position, OCC state
        config.yaml          the resolved run config
        manifest.json        file sizes and sha256, written last

A checkpoint is written under a temporary name (`.tmp_step_N_<pid>`), its files fsynced and
hashed into the manifest, and then renamed: a kill in the middle of saving leaves the previous
checkpoint as the newest complete one, and `latest_complete` skips any folder whose manifest does
not check out. `keep_last` prunes older checkpoints only after the new one is complete, and never
counts an incomplete one among those it keeps.
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

from occ_exp.faults import fault_point

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


def write_manifest(folder: Path) -> None:
    """Hash every file (after fsyncing it) into manifest.json, written last."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            _fsync_file(p)
            files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
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
    from occ_exp.config import ConfigError

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
    fault_point("during_save", step)
    write_manifest(tmp)
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
