"""The warm start shipped with the package (occ_exp/assets/warmstart/<key>/, `make warmstart`):
it is the default configuration's, its files are the ones its manifest lists, a run with an empty
cache loads it instead of training, and its weights give the held-out accuracies its report states.

Tolerance of the last check: the report's accuracies were measured with the same evaluation
(`evaluate_samples`: the same problems, seed and decoder) on the same weights; only float
rounding of another thread count or CPU can differ, which flips a sampled or greedy token only
where two choices tie to ~1e-6. The check allows 2 problems in 500 each way (0.004)."""

from __future__ import annotations

import json

import pytest
import torch

from occ_exp.builders import build_task
from occ_exp.models.loading import build_tiny_policy, load_policy_folder
from occ_exp.warmstart import MANIFEST, SHIPPED_DIR, cache_key, evaluate_samples, manifest, shipped_folder, warm_start
from occ_exp.reward.rewards import build_reward
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def default_cfg():
    return compose_cfg([])


def test_shipped_key_is_the_default_configs(default_cfg):
    key = cache_key(default_cfg.model, default_cfg.data)
    folder = shipped_folder(key)
    assert folder is not None, f"no shipped warm start for the default key {key}: run `make warmstart`"
    assert sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()) == [key]  # no stale copies
    assert json.loads((folder / "report.json").read_text())["key"] == key
    # another recipe has another key: nothing shipped, it trains as before
    assert shipped_folder(cache_key(compose_cfg(["model.warmstart.steps=7"]).model, default_cfg.data)) is None
    # the smoke preset keeps the default recipe, so its runs load the shipped copy too
    assert cache_key(compose_cfg(["experiment=smoke"]).model, default_cfg.data) == key


def test_shipped_files_match_their_manifest(default_cfg):
    folder = shipped_folder(cache_key(default_cfg.model, default_cfg.data))
    listed = (folder / MANIFEST).read_text().splitlines()
    assert listed == manifest(folder)
    assert any(line.endswith("model/model.safetensors") for line in listed)


def test_empty_cache_loads_the_shipped_weights(default_cfg, tmp_path):
    """The default run with its cache deleted: the shipped copy, no training, nothing written."""
    cfg = default_cfg
    policy, tok = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)
    logs: list[str] = []
    reward_fn = build_reward(cfg.data)
    try:
        report = warm_start(policy, tok, build_task(cfg.data), cfg.model, cfg.data, tmp_path, torch.device("cpu"),
                            reward_fn, log=logs.append)
    finally:
        reward_fn.close()
    folder = shipped_folder(cache_key(cfg.model, cfg.data))
    assert report == json.loads((folder / "report.json").read_text())
    assert "shipped with the package" in logs[-1]
    ref, _ = load_policy_folder(folder / "model")
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), ref.state_dict().values()))
    assert not (tmp_path / "warmstart" / report["key"]).exists()


@pytest.mark.slow
def test_shipped_weights_give_their_reported_accuracy(default_cfg):
    cfg = default_cfg
    folder = shipped_folder(cache_key(cfg.model, cfg.data))
    final = json.loads((folder / "report.json").read_text())["final"]
    policy, tok = load_policy_folder(folder / "model")
    ws = cfg.model.warmstart
    reward_fn = build_reward(cfg.data)
    try:
        ev = evaluate_samples(policy, tok, build_task(cfg.data), reward_fn, ws.eval_problems, torch.device("cpu"),
                              seed=ws.seed)
    finally:
        reward_fn.close()
    for k in ("acc_greedy", "acc_t1"):
        assert ev[k] == pytest.approx(final[k], abs=2 / ws.eval_problems + 1e-9), (k, ev[k], final[k])


def test_a_short_warm_start_evaluates_no_more_than_its_eval_problems(tmp_path, monkeypatch):
    """The learning-curve evaluations inside a warm start (at 1/4, 1/2, 3/4 of its steps) take at
    most `model.warmstart.eval_problems` problems: a 4-step warm start with eval_problems=4 used to
    run three 256-problem evaluations, most of its time (every toy-size preset test trains one)."""
    import occ_exp.warmstart as ws_mod

    sizes: list[int] = []

    def counted(policy, tok, task, reward_fn, n, *a, **k):  # the sizes are the point, not the accuracies
        sizes.append(n)
        return {"acc_greedy": 0.0, "acc_t1": 0.0}

    monkeypatch.setattr(ws_mod, "evaluate_samples", counted)
    cfg = compose_cfg(["model.warmstart.steps=4", "model.warmstart.batch_size=8", "model.warmstart.eval_problems=4"])
    policy, tok = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)
    reward_fn = build_reward(cfg.data)
    try:
        report = warm_start(policy, tok, build_task(cfg.data), cfg.model, cfg.data, tmp_path, torch.device("cpu"),
                            reward_fn, log=lambda *_: None, use_shipped=False)
    finally:
        reward_fn.close()
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]  # the curve's points are kept
    assert sizes == [4, 4, 4, 4]
