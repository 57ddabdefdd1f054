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

A checkpoint is written under a temporary name (`.tmp_step_N_<pid>@<host>`), its files fsynced and
hashed into the manifest, and then renamed: a kill in the middle of saving leaves the previous
checkpoint as the newest complete one, and `latest_complete` skips any folder whose manifest does
not check out. `keep_last` prunes older checkpoints only after the new one is complete, and never
counts an incomplete one among those it keeps; temporary folders of other processes are removed only
when their writer is provably dead (`abandoned`).

Every reader checks the manifest: resume (`resolve_resume`; a run whose every checkpoint is damaged
stops instead of starting over), and `model.path` in training and evaluation
(`verify_model_folder`, called by occ_exp.models.loading.load_pretrained). A problem is named by
file (`manifest_problems`); unreadable files and folders count as damaged.

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
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from occ_exp.errors import CheckpointError, ConfigError
from occ_exp.faults import fault_point

CKPT_RE = re.compile(r"^step_(\d+)$")
HOST = socket.gethostname()


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


def manifest_problems(folder: Path, hashes: bool = True, under: str = "") -> list[str]:
    """What is wrong with `folder` against its manifest.json, one line per problem naming the file
    (e.g. 'model/model.safetensors: contents differ from the manifest (sha256)'); [] if every file
    it lists (only those under the subfolder `under`, if given) is there with its size and, with
    `hashes`, its sha256. A folder or file that cannot be read is a problem like a damaged one."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
        items = [(rel, int(info["bytes"]), info["sha256"]) for rel, info in files.items()]
    except FileNotFoundError:
        return ["manifest.json: missing (an interrupted save, or not written by occ-exp)"]
    except OSError as e:
        return [f"manifest.json: cannot be read ({e.strerror or e})"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return ["manifest.json: not a valid manifest"]
    out = []
    for rel, size, sha in items:
        if under and not rel.startswith(under.rstrip("/") + "/"):
            continue
        p = folder / rel
        try:
            if not p.is_file():
                out.append(f"{rel}: missing")
            elif p.stat().st_size != size:
                out.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {size}")
            elif hashes and _sha256(p) != sha:
                out.append(f"{rel}: contents differ from the manifest (sha256)")
        except OSError as e:
            out.append(f"{rel}: cannot be read ({e.strerror or e})")
    return out


def verify_manifest(folder: Path, hashes: bool = True) -> bool:
    """True if every file of the manifest is there with its size (and, with `hashes`, its sha256)."""
    return not manifest_problems(folder, hashes)


def model_folder_problems(model_dir: str | os.PathLike) -> tuple[Path, list[str]] | None:
    """The checkpoint reader's check of a model folder (`model.path`, evaluation, resume): (the
    folder whose manifest covers it, the problems found) -- its own manifest.json, or that of the
    checkpoint it is the `model/` folder of; no problems if it checks out. None if no manifest
    covers it (a plain Hugging Face folder: loadable, but unverified)."""
    model_dir = Path(model_dir)
    if (model_dir / "manifest.json").exists():
        return model_dir, manifest_problems(model_dir)
    parent = model_dir.parent
    if (parent / "manifest.json").exists():
        problems = manifest_problems(parent, under=model_dir.name)
        try:
            listed = any(r.startswith(f"{model_dir.name}/") for r in json.loads((parent / "manifest.json").read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            listed = True  # a damaged manifest: its problems say so
        if listed:
            return parent, problems
    return None


def verify_model_folder(model_dir: str | os.PathLike, log=None) -> None:
    """Refuse a model folder its manifest does not vouch for (CheckpointError naming the file);
    a folder without a manifest (a plain Hugging Face folder) loads, with a line saying so."""
    found = model_folder_problems(model_dir)
    if found is None:
        if log is not None:
            log(f"model: {model_dir} has no manifest.json (not an occ-exp checkpoint); loading it unverified")
        return
    folder, problems = found
    if problems:
        raise CheckpointError(f"checkpoint {describe_problems(folder, problems)}; refusing to load it: point at another "
                              "checkpoint (e.g. an earlier step_N) or restore this one")


def describe_problems(folder: Path, problems: list[str]) -> str:
    """'<folder>: <first problem>' (+ how many more), for one-line messages."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{folder}: {problems[0]}{more}"


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


def latest_complete(run_dir: Path, log=None, damaged: list | None = None) -> Path | None:
    """The newest checkpoint whose manifest checks out (damaged, partial or unreadable ones are
    skipped, and appended to `damaged` as (folder, problems))."""
    for _, p in reversed(list_checkpoints(run_dir)):
        problems = manifest_problems(p)
        if not problems:
            return p
        if damaged is not None:
            damaged.append((p, problems))
        if log is not None:
            log(f"checkpoint {describe_problems(p, problems)}; skipping it")
    return None


def resolve_resume(run_dir: Path, resume: str, log=None) -> Path | None:
    """`trainer.resume`: auto (the newest complete checkpoint in the run dir, if any), never, or
    the path of one checkpoint folder, which must be complete. Under auto, a run dir whose every
    checkpoint is damaged is a CheckpointError listing them (nothing is moved: starting over from
    step 0 takes an explicit trainer.resume=never)."""
    if resume == "never":
        return None
    if resume == "auto":
        damaged: list = []
        found = latest_complete(run_dir, log, damaged)
        if found is None and damaged:
            raise CheckpointError(
                f"every checkpoint in {checkpoint_dir(run_dir)} is damaged: "
                + "; ".join(f"{p.name} ({probs[0]})" for p, probs in damaged)
                + ". Nothing was moved or deleted; repair one, or start over from step 0 with trainer.resume=never "
                "(the damaged folders are then moved to checkpoints/superseded/)")
        return found
    p = Path(resume)
    if not p.is_dir() or manifest_problems(p):
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
    tmp = root / f".tmp_step_{step:06d}_{_owner()}"
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
        old = root / f".old_step_{step:06d}_{_owner()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(run_dir, step, keep_last)
    return final


def _owner() -> str:
    """`<pid>@<host>`: the suffix of this process's temporary folders."""
    return f"{os.getpid()}@{HOST}"


def abandoned(folder: Path) -> bool:
    """A temporary folder (`.tmp_step_N_<pid>@<host>`, `.old_step_...`) this process may delete:
    its own, or one whose writer is provably dead (same host, no such process). A folder of a
    live process, or of another host (a shared file system), is left alone."""
    pid, _, host = folder.name.rsplit("_", 1)[-1].partition("@")
    if not pid.isdigit() or (host or HOST) != HOST:
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists (another user's): alive
        return False
    return False


def prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints up to `step`; delete older ones, incomplete
    older ones and leftovers of interrupted saves that are provably abandoned (`abandoned`). Called
    only after checkpoint `step` is complete, by the run-directory lock's holder."""
    older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    complete = [p for _, p in older if verify_manifest(p, hashes=False)]
    keep = set(complete[-keep_last:])
    for _, p in older:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for stale in list(checkpoint_dir(run_dir).glob(".tmp_step_*")) + list(checkpoint_dir(run_dir).glob(".old_step_*")):
        if abandoned(stale):
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
