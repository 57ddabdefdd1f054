"""Resume equals an uninterrupted run, and crashes lose nothing: real subprocesses of
`python -m occ_exp.train`, killed with SIGKILL or pre-empted with SIGTERM at chosen points
(OCC_EXP_FAULT, see occ_exp.faults), then resumed with the same hydra.run.dir. Every metric of
every step (rewards, lambda, losses, evaluations) and the final weights and optimiser state must
equal those of one uninterrupted run, bit for bit, on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from occ_exp.checkpoint import latest_complete, list_checkpoints
from tests.reliability_log import record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
N = 4
# Small but not trivial: the overlong penalty gives non-zero advantages (so every update moves the
# weights, depending on the sampled tokens), regime.ema makes the OCC estimator stateful, and
# evaluations run on steps 2 and 4.
# Bit-exact on the CPU means at one thread count: trainer.threads is pinned, so every launch runs the
# same kernels whatever cores the host has and however many pytest-xdist workers share them.
BASE = ["experiment=smoke", "trainer.progress=false", f"trainer.total_steps={N}", "trainer.save_every=2",
        "trainer.eval_every=2", "algorithm.overlong_buffer=32", "regime=occ", "regime.ema=0.5", "trainer.threads=1"]


def run_cli(run_dir: Path, cache_dir: Path, fault: str | None = None, extra=(), plots: bool = False) -> subprocess.CompletedProcess:
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "OCC_EXP_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), WANDB_MODE="offline", WANDB_SILENT="true", COLUMNS="400",
               OCC_EXP_TEST_MARK=marker, OCC_EXP_PLOTS=str(int(plots)))
    if fault:
        env["OCC_EXP_FAULT"] = fault
    cmd = [sys.executable, "-m", "occ_exp.train", *BASE, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
           *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, start_new_session=True)
    p.marker = marker
    if fault is None and p.returncode != 0:
        raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def leftover_processes(marker: str, wait_s: float = 30.0) -> list[str]:
    """Processes of a finished or killed run still alive after `wait_s` (verifier workers, forkserver, ...)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "name"]):
            try:
                if p.environ().get("OCC_EXP_TEST_MARK") == marker:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except (psutil.Error, OSError):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in out]  # wall time, peak memory


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_state(a: Path, b: Path) -> None:
    """Same weights (file hash) and the same optimiser / RNG / data / OCC state, bit for bit."""
    assert sha(a / "model" / "model.safetensors") == sha(b / "model" / "model.safetensors")
    sa = torch.load(a / "trainer_state.pt", weights_only=False)
    sb = torch.load(b / "trainer_state.pt", weights_only=False)

    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        if hasattr(x, "__array__"):
            return bool((x == y).all())
        return x == y

    for key in set(sa) | set(sb):
        if key == "wandb_id":  # the run's W&B identity: two runs have two ids (checked above for the resumed one)
            continue
        assert same(sa.get(key), sb.get(key)), f"trainer state {key!r} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> Path:
    """One uninterrupted run of N steps (it also trains the shared warm start if needed)."""
    run_dir = tmp_path_factory.mktemp("straight")
    p = run_cli(run_dir, cache_dir, plots=True)
    CLI_OUTPUT[run_dir] = p.stdout + p.stderr
    return run_dir


def thread_lines(outputs: list[str]) -> str:
    """What each launch printed about its torch threads (named when a comparison fails)."""
    return "; ".join(next((l.strip() for l in o.splitlines() if "torch threads:" in l), "?") for o in outputs)


CLI_OUTPUT: dict[Path, str] = {}  # what the straight run printed


def test_finished_run_prints_a_summary_and_writes_its_figures(straight):
    """The end of `python -m occ_exp.train`: accuracy before -> after, lambda_t, acceptance, and the
    figures of `python -m occ_exp.plot` in <run dir>/plots."""
    out = CLI_OUTPUT[straight]
    figures = {p.name for p in (straight / "plots").glob("*.png")}
    assert figures >= {"lambda.png", "reward.png", "accuracy.png", "acceptance.png"}
    for what in ("held-out accuracy", "(step 0, n=16) ->", "lambda_t mean", "MTP acceptance", f"{len(figures)} figures"):
        assert what in out, (what, out[-2000:])


def test_straight_run_is_not_trivial(straight):
    r = rows(straight)
    steps = [x for x in r if x["step"] > 0]
    assert [x["step"] for x in steps] == list(range(1, N + 1))
    assert all(x["train/grad_norm"] > 0 for x in steps)  # real updates
    assert len({x["mtp/coef"] for x in steps}) == N  # lambda changes every step
    ckpts = dict(list_checkpoints(straight))
    assert sha(ckpts[2] / "model" / "model.safetensors") != sha(ckpts[4] / "model" / "model.safetensors")
    record("resume", "straight_run", launches=1, steps=N, nonzero_grad_norm_steps=N, distinct_lambdas=N)


def test_fault_chain_equals_straight_run(straight, cache_dir, tmp_path):
    """SIGTERM mid-step 1, SIGKILL in the middle of saving step 2, SIGKILL after step 3 (its
    metrics row logged, no checkpoint for it), then a clean finish: four launches, three resumes."""
    run = tmp_path / "run"
    leftovers = []

    p = run_cli(run, cache_dir, fault="sigterm_during_step:1")
    outputs = [CLI_OUTPUT[straight], p.stderr]
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stopped after step 1" in p.stderr
    assert [s for s, _ in list_checkpoints(run)] == [1]
    leftovers += leftover_processes(p.marker)

    p = run_cli(run, cache_dir, fault="kill_during_save:2")
    outputs.append(p.stderr)
    assert p.returncode == -9
    assert "resumed from" in p.stderr and "step_000001 at step 1" in p.stderr
    assert list((run / "checkpoints").glob(".tmp_step_000002_*")), "the kill should leave a partial save"
    assert latest_complete(run).name == "step_000001"  # the previous checkpoint is the one to resume
    leftovers += leftover_processes(p.marker)

    p = run_cli(run, cache_dir, fault="kill_after_step:3")
    outputs.append(p.stderr)
    assert p.returncode == -9
    assert "step_000001 at step 1" in p.stderr
    assert [r["step"] for r in rows(run)][-1] == 3  # step 3 was logged, but only step 2 is saved
    assert latest_complete(run).name == "step_000002"
    assert not list((run / "checkpoints").glob(".tmp_*"))  # the partial save was cleared
    leftovers += leftover_processes(p.marker)

    p = run_cli(run, cache_dir)
    outputs.append(p.stderr)
    assert "step_000002 at step 2" in p.stderr and "done" in p.stderr
    leftovers += leftover_processes(p.marker)

    # the step-2 checkpoint (saved by the third launch) first: a difference there is in the resumed
    # run's step 2, one after it in the last launch's step 3
    threads = f"threads per launch (straight, then the chain): {thread_lines(outputs)}"
    ckpt2 = dict(list_checkpoints(run))[2], dict(list_checkpoints(straight))[2]
    assert sha(ckpt2[0] / "model" / "model.safetensors") == sha(ckpt2[1] / "model" / "model.safetensors"), threads
    assert rows(run) == rows(straight), threads  # every step once, every metric equal
    assert_same_state(latest_complete(run), latest_complete(straight))
    assert leftovers == []
    record("resume", "fault_chain", launches=4, resumes=3, sigterm=1, sigkill_during_save=1, sigkill_after_step=1,
           steps=N, identical_metrics=True, identical_weights_and_optimizer=True, leftover_processes=0)


@pytest.mark.heavy  # make test-all / make reliability only (CI budget; the fault chain above covers kills and resumes in CI)
def test_dynamic_sampling_resume_equals_straight_run(cache_dir, tmp_path):
    """With DAPO's dynamic sampling (generation batches of 6 prompts filtered to 4 groups a step), a
    run killed after step 3 and resumed from its step-2 checkpoint logs every metric and ends in the
    state of an uninterrupted run: the filter keeps nothing between steps, the prompt stream's
    position and the RNGs carry the rest."""
    # the overlong penalty from 40 tokens on (responses average ~32) makes some groups' scores vary
    ds = ["algorithm.dynamic_sampling=true", "data.gen_batch_size=6", "algorithm.max_num_gen_batches=6",
          "algorithm.filter_metric=score", "algorithm.overlong_buffer=24"]
    straight = tmp_path / "straight"
    run_cli(straight, cache_dir, extra=ds)
    steps = [x for x in rows(straight) if x["step"] > 0]
    assert [x["rollout/kept_groups"] for x in steps] == [4.0] * N
    assert any(x["rollout/filtered_share"] > 0 for x in steps) and any(x["rollout/gen_batches"] > 1 for x in steps)
    run = tmp_path / "run"
    p = run_cli(run, cache_dir, fault="kill_after_step:3", extra=ds)
    assert p.returncode == -9 and latest_complete(run).name == "step_000002"
    p = run_cli(run, cache_dir, extra=ds)
    assert "step_000002 at step 2" in p.stderr
    assert rows(run) == rows(straight)
    assert_same_state(latest_complete(run), latest_complete(straight))


@pytest.mark.heavy  # make test-all / make reliability only (CI budget; the fault chain above covers kills and resumes in CI)
def test_preemption_of_the_process_group_with_wandb(straight, cache_dir, tmp_path):
    """SIGTERM to every process of the run (as Slurm does) in step 2 (an evaluation step, so the
    verifier is needed after the signal): the step finishes, is saved,
    the run exits 0; the resumed run continues the same W&B run and equals the straight run."""
    run = tmp_path / "run"
    p = run_cli(run, cache_dir, fault="sigterm_group_during_step:2", extra=["logger=wandb"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stopped after step 2" in p.stderr
    assert latest_complete(run).name == "step_000002"
    run_id = (run / "wandb_run_id.txt").read_text()
    p2 = run_cli(run, cache_dir, extra=["logger=wandb"])
    assert "step_000002 at step 2" in p2.stderr
    assert (run / "wandb_run_id.txt").read_text() == run_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline)
    assert rows(run) == rows(straight)
    assert_same_state(latest_complete(run), latest_complete(straight))
    assert leftover_processes(p.marker) == [] and leftover_processes(p2.marker) == []
    record("resume", "sigterm_process_group_wandb", launches=2, resumes=1, sigterm_to_group=1, steps=N,
           same_wandb_run=True, identical_metrics=True, identical_weights_and_optimizer=True, leftover_processes=0)
