"""Checkpoints: atomic, verified by their manifest, pruned only after a new one is complete."""

import json
import os
from functools import partial

import pytest
import torch

from occ_exp.checkpoint import (TrainState, atomic_write_text, latest_complete, list_checkpoints, load_trainer_state,
                                manifest_entry, resolve_resume, save_checkpoint, set_aside_newer, verify_manifest)
from occ_exp.config import ConfigError
from occ_exp.models.loading import save_policy
from tests.reliability_log import record


def _save(run_dir, step, tiny_policy, keep_last=10):
    policy, tok = tiny_policy
    return save_checkpoint(run_dir, step, partial(save_policy, policy, tok), TrainState(step, generator=torch.arange(3)),
                           "a: 1\n", keep_last)


def test_save_is_complete_and_verified(tmp_path, tiny_policy):
    ckpt = _save(tmp_path, 3, tiny_policy)
    assert ckpt.name == "step_000003" and verify_manifest(ckpt)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"model/model.safetensors", "model/config.json", "trainer_state.pt", "config.yaml"} <= set(files)
    assert load_trainer_state(ckpt)["step"] == 3
    state = TrainState.load(ckpt)
    assert state.step == 3 and torch.equal(state.generator, torch.arange(3)) and state.optimizer is None
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "no_manifest", "bad_manifest"])
def test_damaged_checkpoint_is_skipped(tmp_path, tiny_policy, damage):
    good = _save(tmp_path, 1, tiny_policy)
    bad = _save(tmp_path, 2, tiny_policy)
    target = bad / "model" / "model.safetensors"
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "delete_file":
        (bad / "trainer_state.pt").unlink()
    elif damage == "no_manifest":
        (bad / "manifest.json").unlink()
    else:
        (bad / "manifest.json").write_text("{not json")
    seen = []
    assert latest_complete(tmp_path, log=seen.append) == good
    assert "step_000002" in seen[0]
    record("checkpoint_damage", damage, injected=1, detected=True, resumed_from="step_000001")


def test_files_written_beside_the_model_are_in_the_manifest(tmp_path, tiny_policy):
    """The sharded trainer state (written into the checkpoint by every rank, hashed by the rank
    that wrote it) is covered by the manifest like every other file: a damaged shard, or one
    whose hash the writer reported, is caught."""
    policy, tok = tiny_policy

    def write_shards(folder):
        (folder / "dcp").mkdir()
        (folder / "dcp" / ".metadata").write_bytes(b"m" * 10)  # hashed by rank 0 (not reported)
        shard = folder / "dcp" / "__1_0.distcp"
        shard.write_bytes(bytes(range(256)) * 4)
        return {"dcp/__1_0.distcp": manifest_entry(shard)}  # hashed by the rank that wrote it

    ckpt = save_checkpoint(tmp_path, 1, partial(save_policy, policy, tok), TrainState(1, sharded_state="dcp"), "a: 1\n",
                           write_shards=write_shards)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__1_0.distcp", "model/model.safetensors"} <= set(files)
    assert verify_manifest(ckpt) and TrainState.load(ckpt).sharded_state == "dcp"
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not verify_manifest(ckpt) and latest_complete(tmp_path) is None


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, tiny_policy):
    good = _save(tmp_path, 1, tiny_policy)
    # what a kill during a save leaves: a temporary folder without manifest
    tmp = tmp_path / "checkpoints" / ".tmp_step_000002_99999"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "model.safetensors").write_bytes(b"partial")
    assert latest_complete(tmp_path) == good
    _save(tmp_path, 3, tiny_policy)  # the next save clears the leftover
    assert not tmp.exists()


def test_keep_last_prunes_after_completion_and_counts_only_complete(tmp_path, tiny_policy):
    for s in (1, 2):
        _save(tmp_path, s, tiny_policy, keep_last=2)
    # step 2 gets damaged: it must not count among the two kept
    (tmp_path / "checkpoints" / "step_000002" / "trainer_state.pt").unlink()
    _save(tmp_path, 3, tiny_policy, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]
    _save(tmp_path, 4, tiny_policy, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    _save(tmp_path, 5, tiny_policy, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


def test_resaving_a_step_replaces_it(tmp_path, tiny_policy):
    _save(tmp_path, 2, tiny_policy)
    ckpt = _save(tmp_path, 2, tiny_policy)
    assert verify_manifest(ckpt) and [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not list((tmp_path / "checkpoints").glob(".old_*"))


def test_newer_checkpoints_are_set_aside_on_resume(tmp_path, tiny_policy):
    for s in (1, 2, 3):
        _save(tmp_path, s, tiny_policy)
    set_aside_newer(tmp_path, 1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_complete(tmp_path).name == "step_000001"
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "checkpoints" / "superseded").iterdir()) == ["000002", "000003"]


def test_resume_setting(tmp_path, tiny_policy):
    assert resolve_resume(tmp_path, "auto") is None  # a fresh run dir
    ckpt = _save(tmp_path, 1, tiny_policy)
    assert resolve_resume(tmp_path, "auto") == ckpt
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, str(ckpt)) == ckpt
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(ConfigError, match="trainer.resume: .* is not a complete checkpoint"):
            resolve_resume(tmp_path, str(bad))


def test_atomic_write_text(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def _short(smoke_overrides, steps):
    from tests.conftest import compose_cfg

    return compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", f"trainer.total_steps={steps}",
                                          "trainer.eval_every=0", "trainer.final_eval_problems=4"])


def test_resuming_a_finished_run_does_nothing(smoke_overrides, tmp_path):
    from occ_exp.trainer import train
    from occ_exp.tracking import read_metrics

    first = train(_short(smoke_overrides, 1), tmp_path, log=lambda *_: None)
    again = train(_short(smoke_overrides, 1), tmp_path, log=lambda *_: None)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    assert again["final/accuracy"] == first["final/accuracy"] and again["stopped_at_step"] is None


def test_sigterm_during_set_up_stops_before_the_first_step(smoke_overrides, tmp_path):
    import signal

    from occ_exp.trainer import train
    from occ_exp.tracking import read_metrics

    train(_short(smoke_overrides, 1), tmp_path, log=lambda *_: None)

    def log(msg):  # the signal arrives while the run is being set up (after the resume)
        if str(msg).startswith("resumed from"):
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(_short(smoke_overrides, 3), tmp_path, log=log)
    assert summary["stopped_at_step"] == 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


def test_train_state_reads_checkpoints_written_before_it(tmp_path):
    """trainer_state.pt written before TrainState existed (a plain dict, no rollout or W&B id) loads;
    a TrainState writes the same keys back (and none for fields it does not have)."""
    old = {"step": 7, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7},
           "rng": {"python": (3, (1,), None)}, "generator": torch.Generator().get_state(),
           "prompts": {"epoch": 0, "pos": 3}, "coef_states": [{"ema": 0.5}], "guard": {"streak": 0, "total": 1}}
    folder = tmp_path / "step_000007"
    folder.mkdir()
    torch.save(old, folder / "trainer_state.pt")
    state = TrainState.load(folder)
    assert state.step == 7 and state.guard == {"streak": 0, "total": 1} and state.prompts["pos"] == 3
    assert state.rollout is None and state.wandb_id is None and state.rng_per_rank is None
    assert set(state.to_dict()) == set(old)
