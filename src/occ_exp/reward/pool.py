"""The verifier's worker pool: math-verify in processes, per-item deadlines in CPU time.

Why processes: math-verify protects itself with ``signal.alarm`` and refuses to run in
threads, and sympy can run for hours on inputs like ``9^{9^{9^{9}}}``, possibly inside C code
that no signal interrupts.  Workers are started with the ``forkserver`` method (``spawn``
where forkserver is unavailable): the parent may have torch and CUDA loaded, which must never
be forked.  The forkserver preloads ``math_verify`` and the worker code and warms them
(:mod:`occ_exp.reward.warm`), so a replacement forks ready in a fraction of a second; each
worker still runs :meth:`Engine.warm_up` (nearly free then) before it reports ready.
As with any spawn/forkserver child, multiprocessing re-runs the parent's main module (as
``__mp_main__``) in each worker: entry points keep their work under
``if __name__ == "__main__":``.

**Chunks, streamed results.**  Work is cut into chunks (items sharing a gold answer together,
so the worker parses that gold once); a chunk is one message to a worker, which streams back
one small message per item carrying its score, flag and the worker's CPU clock.  Those
messages are also progress reports: the parent knows which item is running, since when, and
from which CPU reading.

**Deadlines in CPU time, so that rewards do not depend on machine load.**  Each item may use
``timeout_s`` seconds of the worker's CPU.  Inside the worker a ``SIGPROF`` timer
(``ITIMER_PROF``, CPU time) aborts Python-level work at 80 % of it.  If the worker is stuck in
C code, the parent kills it: at ``timeout_s`` wall seconds after the item started (CPU time
cannot run faster than the wall clock) it reads the worker's CPU time from ``/proc`` and
kills only once the item has really used ``timeout_s`` CPU seconds, or once ``max_wall_factor
* timeout_s`` wall seconds have passed (a backstop for a worker that makes no progress at
all).  A kill is SIGTERM, SIGKILL after ``kill_grace_s``, and a replacement.

**One retry.**  An item that timed out (soft or hard) is put back once at the head of the
queue with a fresh budget, for the next free worker (after a kill, the replacement or another
worker); only a second timeout reports ``TIMEOUT``.  A worker that dies while verifying is not
retried: its item reports ``CRASH`` (e.g. the address-space limit).  Every wait in the parent
has a deadline, worker start-up included; workers run under an address-space limit (their
start-up size plus ``max_memory_mb``), so a runaway computation fails with MemoryError.

**Why this pool and not a maintained one.**  Measured against ``pebble.ProcessPool`` (per-task
``timeout`` with worker replacement; one task per item, the same engine, warm forkserver,
soft CPU-time abort and one retry), ``python scripts/bench_verifier.py --pools --n 200 --reps 1``
(command, numbers and load average in ``results/verifier_bench.md``), on a machine at load ~20:
math-verify path (fast path off) 12.3 items/s here vs 6.6 with pebble; kill-only hang cases
(``timeout_s=2``, two tries) 25-29 s here vs 5-19 s with pebble, whose wall-clock kill is
what lets the load cut items; the fuzz corpus and its checks pass here in 818 s at that load,
where pebble had not finished them after ~12 min.  Kept: this pool.
Beyond the numbers, pebble's per-task ``timeout`` is wall-clock time counted by its manager
thread, so the kill itself would again depend on load: keeping rewards independent of load
needs the CPU-time accounting above, which pebble does not offer, on top of it.  Per-item tasks
also cost a shared channel round trip and two thread hand-offs each, where this pool streams a
chunk's results over one pipe per worker.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from occ_exp.reward.engine import TIMEOUT, Engine, SoftTimeout

try:
    import resource
except ImportError:  # not on Windows: no address-space limit there
    resource = None  # type: ignore[assignment]

__all__ = ["CRASH", "WorkerPool", "Item"]

logger = logging.getLogger(__name__)

#: Flag for an item whose worker died while verifying it (parent side only).
CRASH = 4
#: Fraction of ``timeout_s`` (CPU seconds) after which the in-worker SIGPROF aborts an item.
SOFT_FRACTION = 0.8

#: One unit of work: (index, predicted answer, gold answer).
Item = tuple[int, str, str]

_STARTING, _IDLE, _BUSY, _DEAD = "starting", "idle", "busy", "dead"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``; None where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _current_address_space() -> int:
    """This process's virtual memory size in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_address_space(headroom_mb: int) -> None:
    """Cap the worker's address space at its current size plus ``headroom_mb``.

    Relative to the current size because multiprocessing re-imports the parent's
    main module in the worker, which may already have mapped gigabytes (torch/CUDA
    libraries); an absolute cap below that would make every allocation fail.
    """
    if resource is None:
        return
    try:
        limit = _current_address_space() + headroom_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))
    except (ValueError, OSError):
        pass


def _worker_main(conn: Connection, soft_s: float, max_memory_mb: int | None, cache_size: int) -> None:
    """Worker loop: receive ``(chunk_id, [(idx, pred, gold), ...])``, stream back
    ``(chunk_id, idx, score, flag, cpu_seconds)`` per item; ``None`` or EOF ends the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    # ... and so is SIGTERM: a cluster pre-empting the job signals every process, and the parent
    # still needs its verifier to finish the step (the parent kills stuck workers with SIGKILL
    # after kill_grace_s; an orphaned worker exits on EOF).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if max_memory_mb:
        _limit_address_space(int(max_memory_mb))
    engine = Engine(cache_size=cache_size)
    engine.warm_up()  # before "ready": lazy imports never count against an item's deadline
    try:
        conn.send(("ready", os.getpid(), time.process_time()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            chunk_id, items = msg
            for idx, pred, gold in items:
                try:
                    score_, flag = engine.run(pred, gold, soft_s)
                except SoftTimeout:  # fired in the gap around the guarded region
                    score_, flag = 0.0, TIMEOUT
                conn.send((chunk_id, idx, score_, flag, time.process_time()))
    except (BrokenPipeError, EOFError, OSError):
        return


@dataclass
class _Worker:
    slot: int
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    state: str = _STARTING
    deadline: float = math.inf  # next wall-clock check (start-up or current item)
    chunk_id: int = -1
    items: list[Item] = field(default_factory=list)
    pos: int = 0
    pid: int | None = None
    cpu: float = 0.0  # the worker's CPU clock at its last message
    item_wall0: float = 0.0  # wall clock when the current item started
    item_cpu0: float = 0.0  # worker CPU clock when the current item started


@dataclass
class _Run:
    """Bookkeeping for one :meth:`WorkerPool.run` call."""

    results: dict[int, tuple[float, int]]
    remaining: int
    retried: set[int] = field(default_factory=set)


def default_start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class WorkerPool:
    """Worker processes that score ``(idx, pred, gold)`` items with per-item CPU deadlines.

    See the module docstring.  :meth:`run` returns ``{idx: (score, flag)}`` with flags from
    :mod:`occ_exp.reward.engine` plus :data:`CRASH`.  Not thread-safe (the Verifier serialises).
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        chunk_size: int | None = None,
        max_chunk_size: int = 64,
        soft_timeout: bool = True,
        max_memory_mb: int | None = 2048,
        start_method: str | None = None,
        startup_timeout_s: float = 60.0,
        kill_grace_s: float = 0.2,
        worker_cache_size: int = 4096,
        max_wall_factor: float = 10.0,
        start: bool = True,
    ) -> None:
        """`start`: spawn the workers now (False: on the first :meth:`run` or :meth:`wait_ready`,
        so a caller whose items never reach the pool never starts a process)."""
        if int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not max_wall_factor >= 1:
            raise ValueError(f"max_wall_factor must be >= 1, got {max_wall_factor}")
        method = start_method or default_start_method()
        if method == "fork":
            raise ValueError("start_method='fork' is unsafe here (torch/CUDA in the parent); use forkserver or spawn")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self.max_chunk_size = max(1, int(max_chunk_size))
        self.soft_timeout = bool(soft_timeout)
        self.max_memory_mb = max_memory_mb
        self.start_method = method
        self.startup_timeout_s = float(startup_timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.worker_cache_size = int(worker_cache_size)
        self.max_wall_s = float(max_wall_factor) * self.timeout_s
        if mp.get_start_method(allow_none=True) not in (None, *mp.get_all_start_methods()):
            # Inside a joblib / loky worker (e.g. hydra/launcher=parallel) the process-wide start
            # method is "loky", which multiprocessing's own children cannot re-create when they
            # unpickle their preparation data: reset it (our workers use their own context anyway).
            mp.set_start_method(None, force=True)
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            # Only takes effect if this process has not started its forkserver yet (the
            # forkserver is per process and shared); a replacement worker then forks with
            # math_verify imported and warmed (occ_exp.reward.warm) and the worker code loaded.
            self._ctx.set_forkserver_preload(["math_verify", "occ_exp.reward.warm", __name__])
        self._closed = False
        self._chunk_counter = 0
        self._start_failures = 0
        #: Lifetime counters (kills = stuck workers replaced, restarts = all replacements,
        #: retries = timed-out items tried a second time).
        self.kills = 0
        self.restarts = 0
        self.retries = 0
        #: PIDs of every worker this pool started (for monitoring and tests).
        self.spawned_pids: list[int] = []
        self._workers: list[_Worker] = []
        if start:
            self._start()

    def _start(self) -> None:
        """Spawn the workers unless they were (idempotent)."""
        if self._workers:
            return
        try:
            for slot in range(self.num_workers):
                self._workers.append(self._spawn(slot))
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------- #

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def close(self) -> None:
        """Stop all workers: idle ones are asked to exit, the rest (and any that do not
        exit within a second) get SIGTERM, then SIGKILL.  Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        workers = [w for w in self._workers if w.state != _DEAD]
        self._workers = []
        polite = []
        for w in workers:
            if w.state == _IDLE:
                try:
                    w.conn.send(None)
                    polite.append(w)
                    continue
                except (OSError, ValueError):
                    pass
            self._kill(w)
        deadline = time.monotonic() + 1.0
        for w in polite:
            try:
                w.proc.join(max(0.0, deadline - time.monotonic()))
            except ValueError:  # process object already closed
                pass
            self._kill(w)

    # -- process helpers ------------------------------------------------------ #

    def _spawn(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        soft_s = self.timeout_s * SOFT_FRACTION if self.soft_timeout else 0.0
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, soft_s, self.max_memory_mb, self.worker_cache_size),
            name=f"occ-verifier-{slot}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_conn.close()
        if proc.pid is not None:
            self.spawned_pids.append(proc.pid)
        return _Worker(slot=slot, proc=proc, conn=parent_conn, state=_STARTING,
                       deadline=time.monotonic() + self.startup_timeout_s, pid=proc.pid)

    def _kill(self, w: _Worker) -> None:
        """SIGTERM, wait ``kill_grace_s``, SIGKILL, wait (bounded) and release."""
        w.state = _DEAD
        proc = w.proc
        try:
            if proc.is_alive():
                proc.terminate()
                proc.join(self.kill_grace_s)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2.0)
            if not proc.is_alive():
                proc.close()
        except (OSError, ValueError):
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    def _replace(self, w: _Worker, *, startup_failure: bool = False) -> None:
        self._kill(w)
        self.restarts += 1
        if startup_failure:
            self._start_failures += 1
            if self._start_failures > 3 * self.num_workers:
                raise RuntimeError(
                    f"verifier workers failed to start {self._start_failures} times in a row "
                    f"(start_method={self.start_method!r}, startup_timeout_s={self.startup_timeout_s})"
                )
        if not self._closed:
            self._workers[w.slot] = self._spawn(w.slot)

    # -- running ------------------------------------------------------------- #

    def _chunks(self, work: list[Item]) -> deque[list[Item]]:
        # Items sharing a gold answer (the samples of one prompt) go to the same chunk,
        # so the worker parses that gold once.  Order is restored through the indices.
        work = sorted(work, key=lambda item: item[2])
        size = self.chunk_size or min(self.max_chunk_size, max(1, math.ceil(len(work) / (4 * self.num_workers))))
        return deque(work[k : k + size] for k in range(0, len(work), size))

    def run(self, work: list[Item]) -> tuple[dict[int, tuple[float, int]], int]:
        """Score every item; returns ``({idx: (score, flag)}, number of items retried)``."""
        if self._closed:
            raise RuntimeError("verifier pool is closed")
        self._start()
        pending = self._chunks(work)
        run = _Run(results={}, remaining=len(work))
        try:
            for w in list(self._workers):
                if w.state == _DEAD:  # left behind by an earlier start-up failure
                    self._workers[w.slot] = self._spawn(w.slot)
                elif w.state != _STARTING and not w.proc.is_alive():
                    self._replace(w)
            while run.remaining > 0:
                now = time.monotonic()
                for w in list(self._workers):
                    if w.state == _IDLE and pending:
                        self._dispatch(w, pending.popleft(), pending, now)
                active = [w for w in self._workers if w.state in (_STARTING, _BUSY)]
                if not active:  # pragma: no cover - defensive: nothing can make progress
                    raise RuntimeError("verifier has no live workers")
                wait_s = max(0.0, min(w.deadline for w in active) - time.monotonic())
                by_handle: dict[Any, _Worker] = {}
                for w in active:
                    by_handle[w.conn] = w
                    by_handle[w.proc.sentinel] = w
                ready = _mp_wait(list(by_handle), timeout=min(wait_s, 5.0))
                seen: set[int] = set()
                for handle in ready:
                    w = by_handle[handle]
                    if id(w) in seen:
                        continue
                    seen.add(id(w))
                    self._drain(w, run, pending)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.state in (_STARTING, _BUSY) and now >= w.deadline:
                        self._on_deadline(w, run, pending, now)
        finally:
            # Interrupted (exception / KeyboardInterrupt): workers still holding work
            # from this call would send stale results later; replace them.
            if not self._closed:
                for w in list(self._workers):
                    if w.state == _BUSY:
                        self._replace(w)
        return run.results, len(run.retried)

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until every worker has warmed up and reported ready (True) or `timeout_s` passed
        (False). A worker past its warm-up ignores SIGTERM; one still starting does not yet."""
        if self._closed:
            raise RuntimeError("verifier pool is closed")
        self._start()
        end = time.monotonic() + timeout_s
        run, pending = _Run(results={}, remaining=0), deque()
        while (starting := [w for w in self._workers if w.state == _STARTING]) and time.monotonic() < end:
            by_conn = {w.conn: w for w in starting}
            for handle in _mp_wait(list(by_conn), timeout=max(0.0, min(1.0, end - time.monotonic()))):
                self._drain(by_conn[handle], run, pending)
        return all(w.state != _STARTING for w in self._workers)

    def _start_item(self, w: _Worker, now: float) -> None:
        w.item_wall0, w.item_cpu0 = now, w.cpu
        w.deadline = now + self.timeout_s  # CPU time cannot outrun the wall clock

    def _dispatch(self, w: _Worker, chunk: list[Item], pending: deque[list[Item]], now: float) -> None:
        self._chunk_counter += 1
        try:
            w.conn.send((self._chunk_counter, chunk))
        except (OSError, ValueError):
            pending.appendleft(chunk)  # worker vanished before starting: nothing to blame
            self._replace(w)
            return
        w.state = _BUSY
        w.chunk_id = self._chunk_counter
        w.items = chunk
        w.pos = 0
        self._start_item(w, now)

    def _record(self, run: _Run, item: Item, value: float, flag: int, pending: deque[list[Item]]) -> None:
        idx = item[0]
        if flag == TIMEOUT and idx not in run.retried:
            run.retried.add(idx)  # once more with a fresh budget, on the next free worker
            self.retries += 1
            pending.appendleft([item])
            return
        run.results[idx] = (value, flag)
        run.remaining -= 1

    def _drain(self, w: _Worker, run: _Run, pending: deque[list[Item]]) -> None:
        """Read every message available from ``w``; handle its death if it died."""
        while w.state in (_STARTING, _BUSY):
            try:
                if not w.conn.poll():
                    if not w.proc.is_alive():
                        raise EOFError
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._on_crash(w, run, pending)
                return
            if w.state == _STARTING:
                if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "ready":
                    w.state = _IDLE
                    w.deadline = math.inf
                    w.cpu = float(msg[2])
                    self._start_failures = 0
                continue
            chunk_id, idx, value, flag, cpu = msg
            if chunk_id != w.chunk_id or w.pos >= len(w.items) or w.items[w.pos][0] != idx:
                continue  # stale or unexpected message: ignore
            w.cpu = float(cpu)
            self._record(run, w.items[w.pos], float(value), int(flag), pending)
            w.pos += 1
            if w.pos >= len(w.items):
                w.state = _IDLE
                w.deadline = math.inf
                w.items = []
            else:
                self._start_item(w, time.monotonic())

    def _fail_current(self, w: _Worker, run: _Run, pending: deque[list[Item]], flag: int) -> None:
        """Report the item ``w`` is stuck on and re-queue the rest of its chunk."""
        item, rest = w.items[w.pos], w.items[w.pos + 1 :]
        if rest:
            pending.appendleft(rest)
        self._record(run, item, 0.0, flag, pending)  # a retry goes ahead of the rest
        w.items = []

    def _on_deadline(self, w: _Worker, run: _Run, pending: deque[list[Item]], now: float) -> None:
        if w.state == _STARTING:
            logger.warning("verifier worker %s did not start within %.1fs; restarting", w.pid, self.startup_timeout_s)
            self._replace(w, startup_failure=True)
            return
        wall = now - w.item_wall0
        cpu_now = process_cpu_seconds(w.pid) if w.pid is not None else None
        used = wall if cpu_now is None else cpu_now - w.item_cpu0
        if used < self.timeout_s and wall < self.max_wall_s:
            # The machine is busy: the item has had less CPU than its budget. Check again when
            # it could have used the rest (but by the wall-clock backstop at the latest).
            w.deadline = min(now + max(self.timeout_s - used, 0.05), w.item_wall0 + self.max_wall_s)
            return
        self.kills += 1
        self._fail_current(w, run, pending, TIMEOUT)
        self._replace(w)

    def _on_crash(self, w: _Worker, run: _Run, pending: deque[list[Item]]) -> None:
        if w.state == _STARTING:
            logger.warning("verifier worker %s died during start-up; restarting", w.pid)
            self._replace(w, startup_failure=True)
            return
        if w.state == _BUSY and w.pos < len(w.items):
            logger.warning("verifier worker %s died while verifying an item; restarting", w.pid)
            self._fail_current(w, run, pending, CRASH)
        self._replace(w)
