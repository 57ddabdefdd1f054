"""The default thread count: cores this process may use (affinity mask, cgroup quota) divided by
the runs launched side by side (OCC_EXP_PARALLEL_JOBS from the launchers, LOCAL_WORLD_SIZE); an
explicit trainer.threads wins; the choice is logged. Real processes check the affinity mask and
the Hydra joblib launcher's n_jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from occ_exp.runtime import JOBS_ENV, available_cores, cgroup_cpu_limit, choose_threads, parallel_jobs

ROOT = Path(__file__).resolve().parents[1]


def _cgroup(tmp_path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return tmp_path / "cgroup", root


@pytest.mark.parametrize("proc,files,expected", [
    ("0::/job\n", {"cpu.max": "max 100000\n", "job/cpu.max": "150000 100000\n"}, 1.5),  # v2, the job's quota
    ("0::/a/b\n", {"a/cpu.max": "200000 100000\n", "a/b/cpu.max": "max 100000\n"}, 2.0),  # v2, a parent's quota
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2, unlimited
    ("4:memory:/x\n1:cpu,cpuacct:/x\n", {"cpu,cpuacct/x/cpu.cfs_quota_us": "300000\n",
                                         "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, unlimited
])
def test_cgroup_cpu_quota(tmp_path, proc, files, expected):
    assert cgroup_cpu_limit(*_cgroup(tmp_path, proc, files)) == expected


def test_policy_divides_available_cores_among_jobs():
    assert choose_threads(0, cores=(16, "x"), jobs=(1, "y")).threads == 16
    assert choose_threads(0, cores=(16, "x"), jobs=(4, "y")).threads == 4
    assert choose_threads(0, cores=(2, "x"), jobs=(4, "y")).threads == 1  # never 0
    assert choose_threads(3, cores=(2, "x"), jobs=(4, "y")).threads == 3  # an explicit setting wins
    assert parallel_jobs({JOBS_ENV: "2", "LOCAL_WORLD_SIZE": "4"})[0] == 8
    assert parallel_jobs({JOBS_ENV: "", "LOCAL_WORLD_SIZE": "1"}) == (1, "1 job")


def _threads_in(env_extra: dict, preexec=None) -> str:
    code = "import torch\nfrom occ_exp.runtime import set_threads\nprint(set_threads(0))\nprint(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k not in (JOBS_ENV, "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT / "src"), **env_extra)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       preexec_fn=preexec)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_a_process_pinned_to_one_core_uses_one_thread():
    out = _threads_in({"OMP_NUM_THREADS": "8"}, preexec=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert out.splitlines() == ["torch threads: 1 (1 cores in the affinity mask / 1 job; set trainer.threads to override)",
                                "1"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_jobs_side_by_side_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    out = _threads_in({JOBS_ENV: "2"})
    assert out.splitlines()[-1] == str(cores // 2) and "2 jobs launched side by side" in out


def test_a_pytest_xdist_worker_keeps_its_share_of_the_cores():
    """`make test` runs two pytest-xdist workers: the runs a worker starts (train() in the worker, and
    the CLI it launches) must take that worker's share of the cores, not every core each (four threads
    on two cores made a two-step run ten times slower)."""
    code = "import tests.conftest, torch\nfrom occ_exp.runtime import set_threads\nprint(set_threads(0).threads)"
    env = {k: v for k, v in os.environ.items() if k not in (JOBS_ENV, "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), PYTEST_XDIST_WORKER_COUNT="2")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(max(1, available_cores()[0] // 2))]


@pytest.mark.slow
def test_joblib_multirun_passes_n_jobs_to_each_run(tmp_path):
    """`-m hydra/launcher=parallel hydra.launcher.n_jobs=2`: each run logs its share of the cores."""
    env = {k: v for k, v in os.environ.items() if k not in (JOBS_ENV, "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", COLUMNS="400", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "occ_exp.train", "-m", "experiment=smoke", "model.warmstart.enabled=false",
           "trainer.total_steps=0", "trainer.eval_before_train=false", "logger=none", "seed=0,1",
           "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("torch threads:")]
    cores = len(os.sched_getaffinity(0))
    assert len(lines) == 2 and all(l.startswith(f"torch threads: {max(1, cores // 2)} (") and
                                   "2 jobs launched side by side" in l for l in lines), lines
