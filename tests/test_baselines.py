"""The extra baseline regimes train end to end; `frozen` leaves the MTP heads exactly as warm-started."""

import json
from pathlib import Path
import math

import pytest
import torch

from occ_exp.models.loading import load_policy_folder
from occ_exp.warmstart import cache_key, shipped_folder
from occ_exp.trainer import train
from tests.conftest import compose_cfg


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["detach_ref", "frozen", "soft_ce"])
def test_baseline_regime_runs(regime, smoke_overrides, tmp_path):
    cfg = compose_cfg(smoke_overrides + [f"regime={regime}", "trainer.total_steps=1", "trainer.eval_every=0"])
    train(cfg, tmp_path, log=lambda *_: None)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for k in ("mtp/loss", "mtp/acceptance", "mtp/grad_norm", "train/trunk_grad_norm"):
        assert math.isfinite(last[k]), k
    trained, _ = load_policy_folder(tmp_path / "checkpoints" / "step_000001" / "model")
    key = cache_key(cfg.model, cfg.data)
    cached = Path(cfg.paths.cache_dir) / "warmstart" / key
    warm, _ = load_policy_folder((cached if cached.exists() else shipped_folder(key)) / "model")
    heads_same = all(torch.equal(a, b) for a, b in zip(trained.mtp_parameters(), warm.mtp_parameters()))
    if regime == "frozen":
        assert heads_same and last["mtp/grad_norm"] == 0.0 and last["mtp/coef"] == 0.0
    else:
        assert not heads_same and last["mtp/grad_norm"] > 0
