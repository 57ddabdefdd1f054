"""A two-step run of every regime on the tiny model writes finite metrics with the stable keys."""

import json
import math

import pytest

from occ_exp.trainer import train
from tests.conftest import compose_cfg

REQUIRED = ["step", "reward/mean", "mtp/coef", "mtp/corr_proxy", "mtp/penalty_proxy", "mtp/loss", "mtp/acceptance",
            "time/step_s", "time/rollout_s", "time/reward_s", "time/advantage_s", "time/logp_old_s", "time/update_s"]


@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_two_step_run(regime, smoke_overrides, tmp_path):
    cfg = compose_cfg(smoke_overrides + [f"regime={regime}"])
    summary = train(cfg, tmp_path, log=lambda *_: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for k in REQUIRED:
            assert k in r, f"metric {k} missing"
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), f"{k}={r[k]!r}"
    assert "eval/accuracy" in rows[0] and rows[0]["step"] == 0  # eval before training
    assert steps[-1]["eval/final"] == 1
    if regime in ("detach", "ce", "policy"):
        assert all(r["mtp/coef"] == pytest.approx(0.1) for r in steps)
    assert (tmp_path / "checkpoints" / "step_000002" / "model" / "model.safetensors").exists()
    assert summary["final/accuracy"] is not None
