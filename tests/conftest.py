"""Shared fixtures: Hydra composition of the real config tree, a tiny model, one cached warm start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from occ_exp.config import register_configs
from occ_exp.runtime import JOBS_ENV, choose_threads

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# the six benchmarks beside the checkout; OCC_SHARED_BENCHMARKS names them from elsewhere (a worktree)
SHARED_BENCHMARKS = Path(os.environ.get("OCC_SHARED_BENCHMARKS") or ROOT.parent / "shared" / "data" / "benchmarks")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("OCC_EXP_PLOTS", "0")  # no figures after every CLI run (test_resume checks them once)
# pytest-xdist (make test: -n 2) is a launcher of processes side by side, as Hydra's joblib launcher
# is: the workers split the cores through the runtime's thread policy (OCC_EXP_PARALLEL_JOBS), which
# the runs a test starts (train() here, the CLI and torchrun in subprocesses) apply; OMP_NUM_THREADS
# gives the same share to the work tests do outside a run
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault(JOBS_ENV, str(_workers))
os.environ.setdefault("OMP_NUM_THREADS", str(choose_threads().threads))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
register_configs()


def compose_cfg(overrides: list[str] | None = None, config_name: str = "config", return_hydra_config: bool = False):
    """The composed config; with return_hydra_config, also `hydra.runtime.choices` (group -> option)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=return_hydra_config)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One warm-start cache for the whole test session, shared by pytest-xdist's workers (each
    worker's base temp is a folder of the run's own): the warm start's file lock lets one worker
    train an entry while the others wait and reuse it. The default configuration's warm start is
    the one shipped with the package (occ_exp/assets/warmstart), loaded on a cache miss."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / "occ_cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def smoke_overrides(cache_dir) -> list[str]:
    return ["experiment=smoke", f"paths.cache_dir={cache_dir}", "trainer.progress=false"]


@pytest.fixture
def tiny_policy():
    """A small random tiny policy with two MTP layers (fast; no warm start)."""
    from occ_exp.models.loading import build_tiny_policy

    cfg = compose_cfg(["model.num_mtp_layers=2", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
                       "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
                       "model.arch.num_key_value_heads=2"])
    policy, tok = build_tiny_policy(cfg.model, seed=0)
    return policy, tok
