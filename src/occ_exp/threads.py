"""How many CPU threads one run's torch ops use (`trainer.threads=0`, the default).

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

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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


def apply_threads(requested: int = 0) -> ThreadChoice:
    """Choose and set torch's intra-op thread count; the choice says which and why (log it)."""
    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice
