"""Distributed faults: a dead, hung or failing rank becomes an error on every rank that names it,
within a bounded time, instead of a job that hangs in a collective until someone notices.

What torch already does, and what this adds (measured in tests/test_distributed_faults.py):

| fault                          | torch alone                                           | with PeerWatchdog |
|--------------------------------|-------------------------------------------------------|-------------------|
| a rank is SIGKILLed, torchrun  | the agent sees the exit, SIGTERMs the others, exits 1 and names the rank as root cause | the same (the agent is faster) |
| a rank hangs (SIGSTOP, a wedged GPU), torchrun | the others wait in the collective for the process-group timeout (gloo 30 min, NCCL 10 min), and torchrun names a *healthy* rank as the root cause | the others exit after `timeout_s` naming the hung rank |
| a rank is SIGKILLed, no torchrun (srun / submitit per task) | gloo: "Connection reset by peer" naming an address, not a rank; NCCL: wait for the timeout | "rank 1 (pid, host) died" |
| a rank raises an exception     | the others wait in the next collective for the timeout (without torchrun) | the others exit at once naming the rank and its exception |

How: each rank runs a daemon thread that bumps a heartbeat counter in the job's c10d store (the
one torchrun or `init_process_group` already runs) every `interval_s`, watches the next rank
in a ring (a counter that has not moved for `timeout_s`, or, on the same host, a process that no
longer exists), and polls one shared `fault` key. The first rank that finds a fault writes it;
every rank that reads it prints it and exits with code 70 (`os._exit`: a thread stuck in a
collective cannot be unwound otherwise), writing it to torchrun's error file too, so the
agent's summary shows the real cause. No clock synchronisation is needed.

Usage (the distributed learner), right after the process group is set up:

    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    with PeerWatchdog(timeout_s=60):
        ... training ...

Leaving the block normally marks the rank as done (its silence is then not a fault); an
exception inside it is published as this rank's fault (unless it is itself the symptom of a
peer's fault, which is then waited for and reported instead).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_CODE = 70  # EX_SOFTWARE: "a peer rank failed"
_PREFIX = "occ_exp_watchdog"  # keys: <prefix>/hb/<rank>, info/<rank>, done/<rank>, fault


class PeerFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it."""


def _connect_store(timeout_s: float):
    """A client of the job's c10d store (torchrun's agent store, or rank 0's TCPStore for env://)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return dist.distributed_c10d._get_default_store()


def _pid_gone(pid: int) -> bool:
    """True if no live process has this pid on this host (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


def is_communication_error(exc: BaseException) -> bool:
    """Whether an exception looks like the symptom of a peer's fault (a failed collective)."""
    if isinstance(exc, (dist.DistError, PeerFailure)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection reset", "connection closed", "timed out", "broken pipe"))


class PeerWatchdog:
    """Heartbeat watchdog over the c10d store (see the module docstring).

    Args:
        timeout_s: a peer whose heartbeat has not moved for this long is reported as hung or dead.
        interval_s: heartbeat and polling period (default timeout_s / 10, at least 50 ms).
        rank, world_size: default from torch.distributed.
        store: a c10d Store (default: a client of MASTER_ADDR:MASTER_PORT, else the default store).
        on_fault: called with the message instead of exiting the process (tests).
        log: where messages go (default: stderr with a rank prefix).
    """

    def __init__(self, timeout_s: float = 60.0, interval_s: float | None = None, *, rank: int | None = None,
                 world_size: int | None = None, store=None, on_fault=None, log=None):
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else max(0.05, self.timeout_s / 10)
        self._base_store = store
        self.on_fault = on_fault
        self.log = log or (lambda m: print(f"[rank {self.rank}] {m}", file=sys.stderr, flush=True))
        self.fault: str | None = None
        self._stop = threading.Event()
        self._faulted = threading.Event()
        self._main_waiting = False  # the main thread caught a failed collective and will report
        self._thread: threading.Thread | None = None
        self.store = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "PeerWatchdog":
        if self.world_size < 2 or self._thread is not None:
            return self
        base = self._base_store if self._base_store is not None else _connect_store(max(self.timeout_s, 30.0))
        self.store = dist.PrefixStore(_PREFIX, base)
        self.store.set(f"info/{self.rank}", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self.store.set(f"hb/{self.rank}", "0")
        self._thread = threading.Thread(target=self._run, name="occ-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, failed: BaseException | None = None) -> None:
        """Leave: as done (peers stop watching this rank), or as failed with `failed` published."""
        if self._thread is None:
            return
        try:
            if failed is None:
                self.store.set(f"done/{self.rank}", "1")
            else:
                self._publish(f"rank {self.rank} ({self._where(self.rank)}) failed: {type(failed).__name__}: "
                              f"{str(failed).splitlines()[0][:300] if str(failed) else ''}")
        except Exception:  # the store may be gone with its host; nothing left to tell
            pass
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)
        self._thread = None

    def __enter__(self) -> "PeerWatchdog":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or self._thread is None:
            self.stop()
            return
        if is_communication_error(exc):
            # Probably a peer's fault seen from here (e.g. gloo's "connection reset"): wait for the
            # watchdogs to name it, then report that instead of the symptom.
            self._main_waiting = True
            self._faulted.wait(self.timeout_s + 3 * self.interval_s)
            if self.fault is not None:
                self._stop.set()
                if self.on_fault is None:
                    self._abort(self.fault)
                raise PeerFailure(self.fault) from exc
        self.stop(failed=exc)

    # -- the watching thread -------------------------------------------------------------------
    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _where(self, rank: int) -> str:
        try:
            info = json.loads(self._get(f"info/{rank}") or "{}")
            return f"pid {info['pid']} on {info['host']}"
        except Exception:  # noqa: BLE001 - a description only
            return "host unknown"

    def _publish(self, msg: str) -> None:
        if self.store.check(["fault"]):
            return
        self.store.set("fault", msg)

    def _run(self) -> None:
        peer = (self.rank + 1) % self.world_size
        seen, since = None, time.monotonic()
        beat = 0
        host = socket.gethostname()
        peer_info: dict | None = None
        while not self._stop.wait(self.interval_s):
            try:
                beat += 1
                self.store.set(f"hb/{self.rank}", str(beat))
                fault = self._get("fault")
                if fault is not None:
                    return self._fail(fault)
                if self._get(f"done/{peer}") is not None:
                    continue
                now = time.monotonic()
                value = self._get(f"hb/{peer}")
                if value != seen:
                    seen, since = value, now
                if peer_info is None and self.store.check([f"info/{peer}"]):
                    peer_info = json.loads(self._get(f"info/{peer}"))
                if peer_info and peer_info["host"] == host and _pid_gone(int(peer_info["pid"])):
                    msg = f"rank {peer} (pid {peer_info['pid']} on {host}) died"
                elif now - since > self.timeout_s:
                    msg = (f"rank {peer} ({self._where(peer)}) stopped responding: no heartbeat for "
                           f"{now - since:.1f} s (dead, hung or unreachable)")
                else:
                    continue
                self._publish(msg)
                return self._fail(self._get("fault") or msg)
            except Exception as e:  # noqa: BLE001 - the store itself is gone
                if self._stop.is_set():
                    return
                return self._fail(f"the job's rendezvous store is unreachable from rank {self.rank} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); its host (rank 0 when launched without torchrun, "
                                  "else the torchrun agent) died or the network failed")

    def _fail(self, msg: str) -> None:
        self.fault = msg
        self._faulted.set()
        if self.on_fault is not None:
            self.on_fault(msg)
        elif not self._main_waiting:
            self._abort(msg)

    def _abort(self, msg: str) -> None:
        self.log(f"peer failure: {msg}. Exiting rank {self.rank} with code {EXIT_CODE} so the job fails "
                 "instead of hanging; see that rank's log for the cause.")
        _record_for_torchrun(PeerFailure(msg))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def _record_for_torchrun(exc: BaseException) -> None:
    """Write torchrun's error file (TORCHELASTIC_ERROR_FILE, the format of its ErrorHandler), so
    the agent's failure summary shows the cause on this rank's `traceback` line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    text = f"{type(exc).__name__}: {exc}"
    data = {"message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass
