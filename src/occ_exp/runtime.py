"""Runtime helpers of one process (plumbing): the device, seeding and RNG states, CPU threads,
and the per-phase timer with its peak-memory readings."""

from __future__ import annotations

import contextlib
import random
import time
from collections import defaultdict

import numpy as np
import torch


# -- device, threads, seeds ---------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def set_threads(n: int) -> None:
    """`trainer.threads`: torch's intra-op CPU threads (0 = torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


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
