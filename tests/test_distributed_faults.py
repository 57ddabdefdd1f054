"""Distributed faults: a rank that dies, hangs or raises makes every rank exit with an error that
names it, within a bounded time (occ_exp.distributed_faults). Real processes on CPU with gloo, two
ranks, under torchrun and launched by hand (as srun / submitit do), plus fast in-process tests of
the watchdog's logic over a HashStore."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from occ_exp.distributed_faults import _PREFIX, EXIT_CODE, PeerFailure, PeerWatchdog
from tests.reliability_log import record

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_fault_worker.py"
BOUND_S = 60.0  # generous for 2 shared CPU cores: start-up is most of it


# -- the watchdog's logic, in one process -----------------------------------------------------
def _pair(timeout_s=0.6):
    store = dist.HashStore()
    faults = {0: [], 1: []}
    wds = [PeerWatchdog(timeout_s, 0.05, rank=r, world_size=2, store=store, on_fault=faults[r].append)
           for r in (0, 1)]
    for w in wds:
        w.start()
    return store, wds, faults


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_silent_peer_is_named_after_timeout():
    _, (w0, w1), faults = _pair()
    t0 = time.monotonic()
    w1._stop.set()  # rank 1 stops heartbeating without saying goodbye (hung or dead)
    assert _wait(lambda: faults[0], 5.0)
    assert "rank 1" in faults[0][0] and "no heartbeat" in faults[0][0]
    assert 0.5 < time.monotonic() - t0 < 5.0
    w0.stop()


def test_clean_exit_is_not_a_fault():
    _, (w0, w1), faults = _pair()
    w1.stop()
    time.sleep(1.0)
    w0.stop()
    assert faults == {0: [], 1: []}


def test_exception_on_a_rank_is_published_at_once():
    _, (w0, w1), faults = _pair(timeout_s=30.0)
    t0 = time.monotonic()
    w1.stop(failed=ValueError("bad batch"))
    assert _wait(lambda: faults[0], 2.0), "the peer's exception must arrive long before the timeout"
    assert faults[0][0].startswith("rank 1 (pid") and "ValueError: bad batch" in faults[0][0]
    assert time.monotonic() - t0 < 2.0
    w0.stop()


def test_failed_collective_reports_the_peer_not_the_symptom():
    _, (w0, w1), _ = _pair()
    w1._stop.set()
    with pytest.raises(PeerFailure, match="rank 1"):
        with w0:  # __enter__ is idempotent here (already started)
            raise RuntimeError("[gloo] Connection reset by peer")


def test_dead_process_on_same_host_is_found_without_waiting_for_timeout():
    store, faults = dist.HashStore(), []
    w1 = PeerWatchdog(60.0, 0.05, rank=1, world_size=2, store=store, on_fault=lambda m: None).start()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # rank 1's process "is" this one, which no longer exists
    dist.PrefixStore(_PREFIX, store).set("info/1", f'{{"host": "{socket.gethostname()}", "pid": {gone.pid}}}')
    w0 = PeerWatchdog(60.0, 0.05, rank=0, world_size=2, store=store, on_fault=faults.append).start()
    assert _wait(lambda: faults, 5.0)
    assert faults[0] == f"rank 1 (pid {gone.pid} on {socket.gethostname()}) died"
    w0.stop()
    w1.stop()


# -- real processes ---------------------------------------------------------------------------
def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", PG_TIMEOUT_S="120")
    return env


def _torchrun(fault: str, watchdog_s: float):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           fault, "1", str(watchdog_s)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    return p, time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(fault: str, watchdog_s: float):
    """Two ranks started without torchrun (env://, rank 0 hosts the store). Returns rank 0's
    result and the seconds from the fault to rank 0's exit."""
    port = _free_port()
    procs = []
    for r in (0, 1):
        env = _env() | {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), fault, "1", str(watchdog_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    lines: list[str] = []
    injected = threading.Event()
    times = {}

    def read():
        for line in procs[1].stdout:
            lines.append(line)
            if "injecting" in line:
                times["fault"] = time.monotonic()
                injected.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        out0, _ = procs[0].communicate(timeout=300)
        times["exit"] = time.monotonic()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert injected.is_set(), "".join(lines)
    return procs[0].returncode, out0, times["exit"] - times["fault"]


@pytest.mark.slow
def test_torchrun_alone_names_a_killed_rank():
    """What torchrun's elastic agent does by itself: it sees the SIGKILLed worker, tears the
    others down and names the killed rank as the root cause."""
    p, secs = _torchrun("kill", 0)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and secs < BOUND_S
    root_cause = out.split("Root Cause")[1]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause
    record("distributed_faults", "torchrun_sigkill_no_watchdog", ranks=2, faults_injected=1, exit_code=p.returncode,
           seconds_total=round(secs, 1), names_dead_rank=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_torchrun_with_watchdog_names_the_failed_rank(fault):
    p, secs = _torchrun(fault, 3.0)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and secs < BOUND_S, out[-3000:]
    # whichever noticed first: the watchdog (rank 0 exits naming rank 1) or the agent (rank 1's own exit)
    root_cause = out.split("Root Cause")[1]
    assert re.search(r"rank\s*:\s*1 ", root_cause) or "PeerFailure: rank 1" in root_cause, root_cause
    if fault == "raise":
        assert "ValueError: injected failure" in out
    record("distributed_faults", f"torchrun_{fault}_watchdog", ranks=2, faults_injected=1, exit_code=p.returncode,
           seconds_total=round(secs, 1), names_failed_rank=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_without_torchrun_the_survivor_names_the_dead_or_hung_rank(fault):
    """Launched by hand, a SIGKILLed peer gives gloo's 'connection reset' (no rank named) and a
    hung one (SIGSTOP) blocks the survivor for the whole process-group timeout; with the watchdog
    the survivor exits with code 70 naming rank 1, within the watchdog timeout."""
    rc, out, secs = _by_hand(fault, 3.0)
    assert rc == EXIT_CODE, out[-3000:]
    assert "peer failure: rank 1 (pid" in out, out[-3000:]
    assert ("died" if fault == "kill" else "stopped responding") in out
    assert secs < 3.0 + 10.0, secs
    record("distributed_faults", f"by_hand_{fault}_watchdog", ranks=2, faults_injected=1, exit_code=rc,
           seconds_fault_to_exit=round(secs, 1), names_failed_rank=True)
