"""End to end: `scripts/reproduce.py all` at the smallest size (2 RL steps, 1 seed, a few held-out
problems) trains every cell through the Hydra multiruns, writes every results file, and a second
invocation resumes (finished runs are skipped, nothing is trained again)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--seeds", "1", "--jobs", "2", "--boot", "50",
         *[a for o in ("model.warmstart.steps=2", "model.warmstart.eval_problems=8", "trainer.final_eval_problems=8",
                       "trainer.eval_problems=8", "data.prompts_per_step=4", "algorithm.group_size=2",
                       "rollout.max_new_tokens=16", "diagnostics.exact_every=1") for a in ("--override", o)]]


@pytest.mark.slow  # minutes: ~15 tiny runs, each a process start, a model build and an evaluation
def test_reproduce_all_smallest_size_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/reproduce.py", "all", *SMALL, "--runs", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results"), "--out-suffix", "_smoke",
           "--override", f"paths.cache_dir={tmp_path / 'cache'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = tmp_path / "results"
    for name in ("table1_tiny_smoke.md", "table1_tiny_smoke.csv", "table2_tiny_smoke.md", "table2_tiny_smoke.png",
                 "proxy_tiny_smoke.md", "figure4_tiny_smoke.png", "FINDINGS_smoke.md"):
        assert (res / name).exists(), name
    t1 = json.loads((res / "table1_tiny_smoke.json").read_text())
    labels = {r["label"] for r in t1["rows"]}
    assert {"detach", "ce", "policy", "occ", "occ_exact"} <= labels
    evals = sorted((tmp_path / "runs").rglob("eval.json"))
    assert len(evals) >= 15
    # resuming: the second invocation trains nothing (every run is finished) and rebuilds the same tables
    before = {p: p.stat().st_mtime for p in evals}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in evals} == before
