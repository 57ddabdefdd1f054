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
