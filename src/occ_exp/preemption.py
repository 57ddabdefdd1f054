"""Pre-emption: SIGTERM asks the run to stop after the current step.

Clusters announce pre-emption and time limits with SIGTERM (Slurm: to every process of the job,
then SIGKILL after KillWait, 30 s by default; `#SBATCH --signal=TERM@120` sends it earlier). The
trainer installs `GracefulStop`, checks `should_stop()` at the end of every step, and on True
writes a checkpoint and returns, so the process exits 0 and the next launch with the same run
directory resumes from that step.

Set-up (resume, data, model load, warm start, cache-lock waits, first evaluation) saves nothing,
so waiting for it to end would only delay the exit by up to its whole length: until `ready()`, a
SIGTERM raises `StopRequested` wherever the main thread is (also inside a blocking wait such as
a cache lock), the trainer returns at once, and nothing is half-written because everything set-up
writes is written under a temporary name and renamed.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopRequested(BaseException):
    """A stop signal arrived during set-up (nothing to save). A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class GracefulStop:
    """Turn SIGTERM into a flag for the duration of a `with` block (previous handler restored on
    exit). A second SIGTERM while the step is still running is ignored: the step finishes and
    checkpoints either way, and the cluster's SIGKILL is the hard limit.

    `setup=True`: until `ready()` is called, the signal raises StopRequested instead (see the
    module docstring); later signals only set the flag, so the unwinding is not interrupted."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), log=print, setup: bool = False):
        self.signals = signals
        self.log = log
        self.requested = False
        self.signum: int | None = None
        self.in_setup = setup
        self.step, self.checkpoint = 0, None  # where a stop during set-up leaves the run (set on resume)
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        self.signum = signum
        if self.in_setup:
            self.in_setup = False
            self.log(f"received {signal.Signals(signum).name} during set-up: stopping now (nothing to save)")
            raise StopRequested(signal.Signals(signum).name)
        if first:
            self.log(f"received {signal.Signals(signum).name}: finishing this step, writing a checkpoint, then exiting")

    def ready(self) -> None:
        """Set-up is over: from now on a signal only sets the flag that `should_stop` reads."""
        self.in_setup = False

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self) -> bool:
        """The flag, agreed by all ranks when torch.distributed is initialised (any rank's signal
        stops every rank after the same step, so none waits in a collective for the others)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
