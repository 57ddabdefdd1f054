"""Presets compose, `trainer.dry_run=true` prints the plan without loading weights, the launcher
configs compose, and submitit's Slurm variables become torchrun's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from rich.console import Console

from occ_exp import plan as P
from occ_exp.validation import validate
from tests.conftest import CONF, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["mimo7b_dapo", "mimo7b_gspo", "qwen05b_1gpu"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test."""
    import transformers

    from occ_exp.models import loading

    def refuse(*a, **k):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(loading, "load_policy_folder", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_prints_its_plan_without_weights(preset, no_weights):
    cfg = compose_cfg([f"experiment={preset}"])
    validate(cfg)
    console = Console(record=True, width=200)
    plan = P.print_plan(cfg, console)
    text = console.export_text()
    for key in ("world size", "memory per GPU", "tokens per step", "optimizer steps per rollout", "parameters"):
        assert key in text
    assert 0 < plan["_bytes_per_gpu"] < P.CARD_GIB * P.GiB, "the preset should fit its card by the estimate"
    assert plan["optimizer steps per rollout"] == 4


def test_paper_settings_in_the_mimo_presets():
    dapo, gspo = compose_cfg(["experiment=mimo7b_dapo"]), compose_cfg(["experiment=mimo7b_gspo"])
    for c in (dapo, gspo):
        o, a = c.optimizer, c.algorithm
        assert (o.lr, o.warmup_steps, o.weight_decay, o.grad_clip) == (1e-6, 10, 0.1, 1.0)
        assert c.data.prompts_per_step == 128 and a.group_size == 16
        assert c.data.prompts_per_step // a.num_mini_batches == 32  # mini-batch of 32 prompts
        assert c.rollout.max_new_tokens == 8192 and a.overlong_buffer == 4096 and c.rollout.temperature == 1.0
        assert c.model.name == "mimo7b" and c.data.name == "dapo_math"
    assert (dapo.algorithm.clip_low, dapo.algorithm.clip_high, dapo.algorithm.policy_loss) == (0.2, 0.28, "clipped")
    assert (gspo.algorithm.clip_low, gspo.algorithm.clip_high, gspo.algorithm.policy_loss) == (3e-4, 4e-4, "gspo")


def test_parameter_count_matches_the_published_size():
    """Qwen2.5-0.5B has 494,032,768 parameters; MiMo-7B's trunk about 7.6 B plus one MTP layer."""
    cfg = compose_cfg(["experiment=qwen05b_1gpu"])
    config, source = P.model_config(cfg.model)
    size = P.model_size(config, 1)
    assert size.total - size.mtp == 494_032_768, source
    mimo = P.model_size(P.model_config(compose_cfg(["experiment=mimo7b_dapo"]).model)[0], 1)
    assert 7.5e9 < mimo.total - mimo.mtp < 7.7e9 and mimo.mtp > 0


def test_memory_shards_with_the_world_size(monkeypatch, no_weights):
    cfg = compose_cfg(["experiment=mimo7b_dapo"])
    size = P.model_size(P.model_config(cfg.model)[0], 1)
    key = "AdamW moments (fp32, sharded)"
    m8, m16 = P.memory_plan(cfg, size, 8, True), P.memory_plan(cfg, size, 16, True)
    assert m8[key] == pytest.approx(2 * m16[key]) and m8[key] == pytest.approx(8 * size.total / 8)
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert P.world_size(cfg)[0] == 16
    monkeypatch.delenv("WORLD_SIZE")
    assert P.world_size(cfg)[0] == 128  # distributed.nodes x gpus_per_node (the paper's 128 GPUs)
    no_ckpt = compose_cfg(["experiment=mimo7b_dapo", "model.gradient_checkpointing=false"])
    act = lambda m: sum(v for k, v in m.items() if k.startswith("activations"))  # noqa: E731
    assert act(P.memory_plan(no_ckpt, size, 32, True)) > 5 * act(P.memory_plan(cfg, size, 32, True))


def test_dry_run_command_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "occ_exp.train", "experiment=mimo7b_gspo", "trainer.dry_run=true",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "memory per GPU" in out and "world size: 128" in out and "GPU-hours" in out


def _compose_with_hydra(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_one_task_per_gpu():
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "experiment=mimo7b_dapo"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (16, 8, 8)  # 128 GPUs
    assert launcher["max_num_timeout"] > 0 and launcher["setup"]


def test_joblib_launcher_composes():
    cfg = _compose_with_hydra(["hydra/launcher=parallel"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2


def test_submitit_slurm_task_becomes_a_torchrun_rank(monkeypatch):
    from occ_exp.distributed import _export_slurm_env, world_size_from_env

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "9",
                 "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(k, v)
    assert world_size_from_env() == 16
    try:
        _export_slurm_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
        assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0
    finally:
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)


def test_a_rank_split_that_does_not_divide_is_refused(monkeypatch):
    from occ_exp.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="data.prompts_per_step"):
        validate(compose_cfg([]))
