"""Runtime helpers of one process (plumbing): the device, seeding and RNG states, CPU threads,
the per-phase timer with its peak-memory readings, and the commit of the code a result came from.

CPU threads (`trainer.threads=0`, the default, is a policy; a positive value is used as given).
Intra-op threads beyond the cores a process really gets make torch slower, not faster: threads
spin waiting for each other while the kernel runs someone else (two runs side by side on 2 cores
with a thread per core each were 3.5-9x slower than with 1 thread each). So the default is

    threads = max(1, cores available to this process // processes launched side by side)

- cores available: the CPU affinity mask (`taskset`, Slurm's `--cpus-per-task` binding, `cpuset`
  cgroups), further capped by a cgroup CPU quota (`docker --cpus`, Kubernetes limits), rounded up;
- processes side by side: `OCC_EXP_PARALLEL_JOBS`, set by the launchers that start several runs
  at once (`python -m occ_exp.train -m hydra/launcher=parallel` sets it from
  `hydra.launcher.n_jobs`; `scripts/reproduce.py --jobs N` passes N), times the ranks on this node
  under torchrun (`LOCAL_WORLD_SIZE`).

Runs started by hand in separate terminals cannot be seen from inside one run: export
OCC_EXP_PARALLEL_JOBS=<n> there, or set trainer.threads explicitly (which always wins).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch


# -- device, threads, seeds ---------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# -- CPU threads (see the module docstring) ------------------------------------------------------
JOBS_ENV = "OCC_EXP_PARALLEL_JOBS"


def cgroup_cpu_limit(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                     root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup and its ancestors (cores, e.g. 1.5), None if unlimited.
    cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>") and v1 (`cpu.cfs_quota_us`, -1 = none)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            folders, read = [Path(root)], _v2_quota
        elif "cpu" in controllers.split(","):
            folders, read = [Path(root) / c for c in (controllers, "cpu", "cpu,cpuacct")], _v1_quota
        else:
            continue
        for base in folders:
            d = base / rel
            while True:  # this cgroup and every ancestor up to the mount point
                q = read(d)
                if q is not None:
                    limits.append(q)
                if d == base:
                    break
                d = d.parent
    return min(limits) if limits else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def available_cores() -> tuple[int, str]:
    """(cores this process may run on, how that was found)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} of {affinity} cores in the affinity mask"
    return affinity, f"{affinity} cores in the affinity mask" + ("" if quota is None else f", cgroup quota {quota:g}")


def parallel_jobs(env=os.environ) -> tuple[int, str]:
    """(processes sharing these cores: launcher jobs x local ranks, where that came from)."""
    jobs, parts = 1, []
    for name, what in ((JOBS_ENV, "jobs launched side by side"), ("LOCAL_WORLD_SIZE", "ranks on this node")):
        raw = env.get(name, "")
        if raw.strip().isdigit() and int(raw) > 1:
            jobs *= int(raw)
            parts.append(f"{int(raw)} {what} ({name})")
    return jobs, " x ".join(parts) or "1 job"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str

    def __str__(self) -> str:
        return f"torch threads: {self.threads} ({self.why})"


def choose_threads(requested: int = 0, cores: tuple[int, str] | None = None,
                   jobs: tuple[int, str] | None = None) -> ThreadChoice:
    """`requested` > 0 is used as given; 0 applies the policy of the module docstring."""
    if requested > 0:
        return ThreadChoice(requested, "trainer.threads set explicitly")
    n_cores, cores_why = cores or available_cores()
    n_jobs, jobs_why = jobs or parallel_jobs()
    threads = max(1, n_cores // n_jobs)
    return ThreadChoice(threads, f"{cores_why} / {jobs_why}; set trainer.threads to override")


def set_threads(requested: int = 0) -> ThreadChoice:
    """Choose and set torch's intra-op thread count; the choice says which and why (log it)."""
    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice


# -- time and memory per phase ------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset (GiB; Linux VmHWM, else 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class PhaseTimer:
    """Wall time per phase, and each phase's peak memory: on a GPU the peak allocated memory
    (`mem/{phase}_peak_gib`, with the device synchronised at the phase's edges so that times are
    the phase's own), on the CPU the process's peak resident memory (`mem/{phase}_peak_rss_gib`,
    Linux only: the kernel's high-water mark, reset at the phase's start)."""

    def __init__(self, cuda: bool = False):
        self.times: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, float] = {}
        self.cuda = cuda
        self.rss = not cuda and reset_peak_rss()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.rss:
            reset_peak_rss()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            elif self.rss:
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_gib())
            self.times[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        mem = "mem/{}_peak_gib" if self.cuda else "mem/{}_peak_rss_gib"
        return {**{f"time/{k}_s": v for k, v in self.times.items()},
                **{mem.format(k): v for k, v in self.peaks.items()}}


# -- provenance ----------------------------------------------------------------------------------
def code_commit(root: str | os.PathLike, exclude: tuple[str, ...] = ("results",)) -> str:
    """The commit of the code in the git tree at `root`, as results files name it: `<short sha>`,
    `<short sha>-dirty` when tracked files outside `exclude` have uncommitted changes, or `unknown`
    outside a git tree (or without git). `exclude` is what the scripts write (results/): a report
    being written, or an earlier benchmark's output, is not a change to the code that made it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){e}" for e in exclude))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def package_commit() -> str:
    """`code_commit` of the source checkout occ_exp is imported from (src/occ_exp in a git tree);
    for an installed package, which has no checkout, `unknown (occ_exp <version> installed)`."""
    pkg = Path(__file__).resolve().parent
    root = pkg.parents[1]
    if pkg.parent.name == "src" and (root / "pyproject.toml").exists():
        return code_commit(root)
    try:
        return f"unknown (occ_exp {version('occ-exp')} installed)"
    except PackageNotFoundError:
        return "unknown"


# -- each start of a run: what made it, and whether a resume can be bit-exact ----------------------
NUMERICS_KEYS = ("threads", "torch", "device")  # what changes float rounding on the same code and data


def record_start(path: Path, step: int, commit: str, threads: int, device) -> str | None:
    """Append this start of a run ({step, commit, time, threads, torch, device}) to the run's
    provenance.jsonl; on a resume, return a one-line note when a setting that changes float rounding
    differs from the previous start's (the continuation is then not bit-exact), else None."""
    row = {"step": step, "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": int(threads),
           "torch": torch.__version__, "device": torch.device(device).type}
    previous = None
    if step > 0 and path.exists():
        lines = path.read_text().splitlines()
        previous = json.loads(lines[-1]) if lines else None
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    changed = [k for k in NUMERICS_KEYS if previous is not None and k in previous and previous[k] != row[k]]
    if not changed:
        return None
    was = ", ".join(f"{previous[k]} torch thread(s)" if k == "threads" else f"{k} {previous[k]}" for k in changed)
    now = ", ".join(str(row[k]) for k in changed)
    fix = f" (set trainer.threads={previous['threads']} to match)" if "threads" in changed else ""
    return (f"note: this run's previous start ran with {was}, this one with {now}: the steps from {step} on are "
            f"not bit-exact with an uninterrupted run{fix}")
