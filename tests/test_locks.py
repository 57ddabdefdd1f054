"""One writer per run directory: real processes take the run lock; a second one is refused at
once naming the holder, a dead holder (SIGKILL, even with a forked child still alive) never
blocks, and a process waiting on a cache lock is stopped by a raising SIGTERM handler."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from occ_exp.locks import RUN_LOCK_NAME, RunDirLocked, file_lock, holder, run_lock
from tests.reliability_log import record

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _holder_process(run_dir: Path, fork_child: bool = False) -> subprocess.Popen:
    """A process that takes the run lock, says so (and its forked child's pid), then sleeps."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from occ_exp.locks import run_lock
        lock = run_lock({str(run_dir)!r})
        child = 0
        if {fork_child!r}:
            child = os.fork()
            if child == 0:
                time.sleep(600)
                os._exit(0)
        print("locked", child, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    line = p.stdout.readline().split()
    assert line[0] == "locked", line
    p.child = int(line[1])
    return p


def _try_lock(run_dir: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        from occ_exp.locks import RunDirLocked, run_lock
        try:
            run_lock({str(run_dir)!r})
        except RunDirLocked as e:
            print(e)
            sys.exit(3)
        print("acquired")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)


def test_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    p = _holder_process(tmp_path)
    try:
        second = _try_lock(tmp_path)
        assert second.returncode == 3, second.stdout + second.stderr
        msg = second.stdout.strip()
        assert "\n" not in msg and f"pid {p.pid} on host {socket.gethostname()}" in msg and "hydra.run.dir" in msg
        with pytest.raises(RunDirLocked):  # and in this process too
            run_lock(tmp_path)
    finally:
        p.kill()
        p.wait()
    record("run_lock", "second_process_refused", processes=2, refused_at_once=True, names_pid_and_host=True)


@pytest.mark.parametrize("fork_child", [False, True], ids=["alone", "with_forked_child"])
def test_lock_of_a_killed_process_never_blocks(tmp_path, fork_child):
    p = _holder_process(tmp_path, fork_child=fork_child)
    try:
        p.send_signal(signal.SIGKILL)
        p.wait()
        taken = _try_lock(tmp_path)
        assert taken.returncode == 0 and taken.stdout.strip() == "acquired", taken.stdout + taken.stderr
    finally:
        if p.child:
            os.kill(p.child, signal.SIGKILL)
    record("run_lock", f"holder_sigkilled_{'with_forked_child' if fork_child else 'alone'}", sigkill=1,
           next_process_acquired=True)


def test_released_lock_is_taken_again_and_names_nobody(tmp_path):
    with run_lock(tmp_path):
        assert f"pid {os.getpid()}" in holder(tmp_path / RUN_LOCK_NAME)
    with run_lock(tmp_path):  # released on exit: the same (or any) process takes it again
        pass
    assert "has not written its pid" in holder(tmp_path / RUN_LOCK_NAME)


def test_sigterm_ends_a_wait_on_a_cache_lock(tmp_path):
    """A process blocked on a cache lock held by another, under a handler that raises (as
    GracefulStop does during set-up), leaves the wait as soon as SIGTERM arrives."""
    lock = tmp_path / "cache" / "entry.lock"
    code = textwrap.dedent(f"""
        import signal, sys
        from occ_exp.locks import file_lock
        class Stop(BaseException):
            pass
        def handler(signum, frame):
            raise Stop()
        signal.signal(signal.SIGTERM, handler)
        try:
            with file_lock({str(lock)!r}, log=lambda m: print(m, flush=True)):
                print("got the lock", flush=True)
        except Stop:
            print("stopped while waiting", flush=True)
            sys.exit(0)
    """)
    with file_lock(lock):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
        first = p.stdout.readline()
        assert first.startswith("waiting for the lock") and f"pid {os.getpid()}" in first, first
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "stopped while waiting", out
    record("run_lock", "sigterm_while_waiting_on_cache_lock", sigterm=1, left_the_wait=True)


# -- end to end: two `python -m occ_exp.train` on one run directory ----------------------------
def _train_cmd(run_dir: Path, cache_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "occ_exp.train", "experiment=smoke", "model.warmstart.enabled=false",
            "trainer.progress=false", "trainer.threads=1", "trainer.eval_before_train=false", "trainer.eval_every=0",
            "trainer.final_eval_problems=4", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_second_trainer_on_a_run_dir_is_refused_and_the_first_is_intact(tmp_path):
    import json
    import time

    run = tmp_path / "run"
    env = dict(ENV, COLUMNS="400", WANDB_MODE="offline")
    first = subprocess.Popen(_train_cmd(run, tmp_path / "cache", "trainer.total_steps=1000", "trainer.save_every=1"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in ((run / RUN_LOCK_NAME).read_text() if (run / RUN_LOCK_NAME).exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(_train_cmd(run, tmp_path / "cache", "trainer.total_steps=3"), env=env,
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert first.poll() is None  # still running: the second one was refused while it ran
        first.send_signal(signal.SIGTERM)  # the first stops after its step, with a checkpoint
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    lines = [l for l in second.stderr.splitlines() if l.strip() and not l.startswith("occ-exp run dir")]
    assert len(lines) == 1 and f"run dir error {run} is in use by pid {first.pid} on host" in lines[0], lines
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), steps  # one writer: no duplicated rows
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s:06d}" for s in steps[-2:]]
    record("run_lock", "second_trainer_refused", launches=2, refused=1, exit_code=second.returncode,
           metrics_rows_duplicated=0)
