"""scripts/gpu_check: the random model it builds, its report's arithmetic, and (GPU only) the
whole script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_full_size_model_is_qwen05b_shaped():
    from transformers import Qwen2Config

    from occ_exp.plan import model_size

    size = model_size(Qwen2Config(**gpu_check.QWEN05B), 1)
    assert size.total - size.mtp == 494_032_768  # Qwen2.5-0.5B's published parameter count


def test_report_computes_mfu_from_the_runs(tmp_path, monkeypatch):
    gpu_check.make_model(tmp_path / "model", toy=True)
    runs = []
    for regime, update_s in (("detach", 2.0), ("occ", 4.0)):
        run = tmp_path / regime
        (run / ".hydra").mkdir(parents=True)
        cfg = compose_cfg([f"regime={regime}", f"model.path={tmp_path / 'model'}", "data.prompts_per_step=4",
                           "algorithm.group_size=4"])
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        rows = [{"step": s, "time/step_s": 9.0, "time/rollout_s": 3.0, "time/logp_old_s": 1.0,
                 "time/update_s": (100.0 if s == 1 else update_s), "rollout/tokens": 1600, "mtp/coef": 0.5,
                 "mem/update_peak_gib": 7.5, "mem/rollout_peak_gib": 3.0} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    monkeypatch.setattr(gpu_check, "_peak_flops", lambda: ("NVIDIA H100 80GB HBM3", 1e12))
    out = tmp_path / "gpu_check.md"
    gpu_check.report(out, runs, toy=False)
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "vLLM is not installed" in text
    assert "No GPU run happened" not in text

    from occ_exp.plan import model_config, model_size, train_flops_per_token

    size = model_size(model_config(compose_cfg([f"model.path={tmp_path / 'model'}"]).model)[0], 1)
    flops = 1600 * train_flops_per_token(size, 1600 / 16)
    mfu_detach = f"{100 * flops / 2.0 / 1e12:.1f} %"  # step 1 (warm-up, 100 s) is left out of the median
    mfu_occ = f"{100 * flops / 4.0 / 1e12:.1f} %"
    rows = [l for l in text.splitlines() if l.startswith(("| detach", "| occ"))]
    assert mfu_detach in rows[0] and mfu_occ in rows[1] and "7.50" in rows[0]

    gpu_check.report(out, runs, toy=True)
    assert "No GPU run happened" in out.read_text()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_script_runs_on_a_gpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path / "work"), "GPU_CHECK_OUT": str(tmp_path / "gpu_check.md")}
    subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, check=True, timeout=600)
    text = (tmp_path / "gpu_check.md").read_text()
    assert torch.cuda.get_device_name(0) in text and "| occ |" in text
