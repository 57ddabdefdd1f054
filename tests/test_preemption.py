"""SIGTERM becomes a flag (the run finishes its step, checkpoints and exits 0; the end-to-end test
with real signals is in test_resume.py), and the fault-injection hook is inert by default."""

import os
import signal

import pytest

from occ_exp import faults
from occ_exp.preemption import GracefulStop


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(log=lambda *_: None) as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one is harmless
        assert stop.should_stop() and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_fault_hook_is_inert_by_default(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("during_save", 1)  # nothing happens
    monkeypatch.setenv(faults.ENV, "kill_during_save:7")
    faults.fault_point("during_save", 1)  # another step: nothing happens
    faults.fault_point("after_step", 7)  # another place: nothing happens


@pytest.mark.parametrize("spec", ["kill_during_lunch:3", "explode_after_step:1", "kill_after_step", "kill_after_step:x"])
def test_malformed_fault_spec_is_refused(spec):
    with pytest.raises(ValueError, match="expected <action>_<place>:<step>"):
        faults.parse(spec)


def test_fault_spec_parses():
    assert faults.parse("kill_during_save:4, sigterm_group_during_step:2") == {
        ("kill", "during_save", 4), ("sigterm_group", "during_step", 2)}


def test_verifier_workers_survive_a_sigterm_to_the_job():
    """Slurm signals every process of the job: the verifier's workers must keep serving the step
    the trainer finishes, and still be stopped by close()."""
    import psutil

    from occ_exp.reward.verifier import Verifier

    v = Verifier(num_workers=2, timeout_s=5.0)
    try:
        assert v.score(["\\boxed{1/2}"], ["0.5"]).scores == [1.0]  # the fast path: workers may still start
        assert v.wait_ready(120.0)  # a worker ignores SIGTERM once it has started
        pids = v.worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        res = v.score(["\\boxed{\\frac{2}{4}}", "\\boxed{3}"], ["0.5", "0.5"])
        assert res.scores == [1.0, 0.0] and res.crashes == 0 and v.restarts == 0
        assert v.worker_pids() == pids
    finally:
        v.close()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_exit_without_close_does_not_hang(tmp_path):
    """An exception that leaves a Verifier open must not hang the interpreter's exit: the workers
    ignore SIGTERM, which multiprocessing's exit handler sends to daemonic children before joining
    them, so the Verifier closes itself at exit first. (Reproduces a hang seen when wandb.init
    failed in a run: wandb keeps the failing frames, and so the Verifier, alive through exit.)"""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "s.py"
    script.write_text("from occ_exp.reward.verifier import Verifier\n"
                      "def run():\n"
                      "    v = Verifier(num_workers=2)\n"
                      "    v.score(['\\\\boxed{1}'], ['1'])\n"
                      "    import wandb\n"
                      "    wandb.init(mode='not-a-mode')\n"
                      "if __name__ == '__main__':\n"
                      "    run()\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(root / "src"), WANDB_SILENT="true", WANDB_MODE="offline"))
    assert p.returncode == 1 and time.monotonic() - t0 < 60, p.stderr[-2000:]


# -- SIGTERM during set-up: exit within seconds, nothing half-written ---------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_while_waiting_on_the_warm_start_lock_and_during_the_warm_start(tmp_path, cache_dir):
    """A run whose warm start is being built by another process waits on the cache lock; SIGTERM
    there ends it at once (exit 0, nothing written). Then, with the lock free, a run that is
    training a (very long) warm start is stopped by SIGTERM too, and leaves no cache entry."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from occ_exp.locks import file_lock
    from occ_exp.warmstart import cache_key
    from tests.conftest import compose_cfg
    from tests.reliability_log import record

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache"
    over = ["experiment=smoke", "model.warmstart.steps=100000", "trainer.progress=false", "trainer.threads=1",
            f"paths.cache_dir={cache}"]
    cfg = compose_cfg(over)
    entry = cache / "warmstart" / cache_key(cfg.model, cfg.data)
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1", COLUMNS="400", WANDB_MODE="offline")

    def launch(run):
        return subprocess.Popen([sys.executable, "-m", "occ_exp.train", *over, f"hydra.run.dir={run}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)

    def wait_for(p, text):
        seen = []
        for line in p.stdout:
            seen.append(line)
            if text in line:
                return seen
        raise AssertionError(f"{text!r} never printed:\n{''.join(seen)[-3000:]}")

    outcomes = {}
    with file_lock(entry.with_name(entry.name + ".lock")):  # another process is building this warm start
        p = launch(tmp_path / "run1")
        wait_for(p, "waiting for the lock")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)  # without the fix: waits for the lock for ever
        outcomes["lock_wait"] = (p.returncode, out)
    p = launch(tmp_path / "run2")
    wait_for(p, "occ-exp run dir")
    time.sleep(5)  # now in the 100,000-step warm start (or still loading: either is set-up)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)  # without the fix: trains the whole warm start first
    outcomes["warm_start"] = (p.returncode, out)
    for where, (rc, out) in outcomes.items():
        assert rc == 0 and "Traceback" not in out, (where, out[-3000:])
        assert "during set-up: stopping now" in out and "stopped" in out, (where, out[-3000:])
    assert not entry.exists() or not (entry / "report.json").exists()  # no cache entry, complete or not
    for run in ("run1", "run2"):
        assert not (tmp_path / run / "checkpoints").exists() and not (tmp_path / run / "metrics.jsonl").exists()
    record("preemption", "sigterm_during_set_up", sigterm=2, places="warm-start lock wait, warm-start training",
           exit_code=0, cache_entries_written=0)
