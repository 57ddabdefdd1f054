"""Every checkpoint is checked wherever it is read: resume, `model.path` in training and in
evaluation. A damaged one is a one-line error naming the file, never a silent load; a run whose
every checkpoint is damaged stops and moves nothing; unreadable folders fall back like damaged
ones; prune() deletes only temporary folders that are its own or provably abandoned."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from occ_exp.checkpoint import (TrainState, latest_complete, list_checkpoints, manifest_problems, resolve_resume,
                                save_checkpoint)
from occ_exp.errors import CheckpointError
from occ_exp.models.loading import load_pretrained, save_policy
from tests.conftest import ROOT, compose_cfg
from tests.reliability_log import record


def _save(run_dir, step, tiny_policy, keep_last=10):
    policy, tok = tiny_policy
    return save_checkpoint(run_dir, step, partial(save_policy, policy, tok), TrainState(step=step), "a: 1\n", keep_last)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- prune: only its own or provably abandoned temporary folders -------------------------------
def test_prune_leaves_temporary_folders_of_live_writers_alone(tmp_path, tiny_policy):
    root = tmp_path / "checkpoints"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"live": f".tmp_step_000002_{live.pid}@{host}", "other_host": f".tmp_step_000002_{live.pid}@not-{host}",
             "dead": f".tmp_step_000002_{dead.pid}@{host}", "dead_old_name": f".old_step_000002_{dead.pid}"}
    try:
        for name in names.values():
            (root / name / "model").mkdir(parents=True)
            (root / name / "config.yaml").write_text("x: 1\n")
        _save(tmp_path, 3, tiny_policy)  # prunes after saving
        left = {k for k, n in names.items() if (root / n).exists()}
    finally:
        live.kill()
        live.wait()
    assert left == {"live", "other_host"}, left
    record("checkpoint_damage", "prune_temporary_folders", live_writer_kept=True, other_host_kept=True,
           dead_writer_removed=True)


# -- a damaged or unreadable checkpoint --------------------------------------------------------
def test_unreadable_checkpoint_falls_back_like_a_damaged_one(tmp_path, tiny_policy, monkeypatch):
    """(Tests run as root, which reads any file: a folder in place of manifest.json, and a read that
    fails with PermissionError, stand for a checkpoint this user may not read.)"""
    import occ_exp.checkpoint as C

    good = _save(tmp_path, 1, tiny_policy)
    bad = _save(tmp_path, 2, tiny_policy)
    worse = _save(tmp_path, 3, tiny_policy)
    (worse / "manifest.json").unlink()
    (worse / "manifest.json").mkdir()
    real = C._sha256

    def sha(path):
        if bad in Path(path).parents:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(C, "_sha256", sha)
    seen = []
    assert latest_complete(tmp_path, log=seen.append) == good
    assert "manifest.json: cannot be read" in seen[0] and "cannot be read (Permission denied)" in seen[1]
    record("checkpoint_damage", "unreadable_folder", injected=2, fell_back_to="step_000001")


@pytest.mark.parametrize("where", ["model_folder", "checkpoint_folder"])
def test_model_path_of_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_policy, where):
    ckpt = _save(tmp_path, 1, tiny_policy)
    folder = ckpt / "model" if where == "model_folder" else ckpt
    assert load_pretrained(ckpt / "model", log=lambda *_: None).policy is not None  # clean: loads
    _flip(ckpt / "model" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        if where == "model_folder":
            load_pretrained(folder, log=lambda *_: None)
        else:
            from occ_exp.evaluate import resolve_model_path

            load_pretrained(resolve_model_path(str(folder)), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and f"{ckpt}: model/model.safetensors: contents differ from the manifest" in msg, msg
    record("checkpoint_damage", f"model_path_{where}_flipped_byte", injected=1, refused=True)


def test_plain_model_folder_loads_unverified_with_a_line(tmp_path, tiny_policy):
    policy, tok = tiny_policy
    save_policy(policy, tok, tmp_path / "plain")
    seen = []
    load_pretrained(tmp_path / "plain", log=seen.append)
    assert any("no manifest.json" in m and "unverified" in m for m in seen), seen


def test_cli_evaluate_refuses_a_damaged_checkpoint_in_one_line(tmp_path, tiny_policy):
    ckpt = _save(tmp_path / "run", 1, tiny_policy)
    _flip(ckpt / "model" / "model.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), COLUMNS="400")
    p = subprocess.run([sys.executable, "-m", "occ_exp.evaluate", f"model.path={ckpt}", "benchmark=tiny",
                        "eval.max_problems=4", "model.num_mtp_layers=2", f"hydra.run.dir={tmp_path / 'eval'}"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if l.strip() and "model.safetensors" in l]
    assert len(lines) == 1 and "contents differ from the manifest" in lines[0], p.stderr[-3000:]
    assert not (tmp_path / "eval" / "eval.json").exists()
    record("checkpoint_damage", "cli_evaluate_flipped_byte", injected=1, refused=True, exit_code=2)


# -- every checkpoint of a run damaged ---------------------------------------------------------
def test_every_checkpoint_damaged_stops_and_moves_nothing(smoke_overrides, tmp_path):
    from occ_exp.trainer import train

    def cfg(steps, *extra):
        return compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", f"trainer.total_steps={steps}",
                                              "trainer.eval_every=0", "trainer.eval_before_train=false",
                                              "trainer.final_eval_problems=4", "trainer.save_every=1", *extra])

    train(cfg(2), tmp_path, log=lambda *_: None)
    ckpts = [p for _, p in list_checkpoints(tmp_path)]
    assert [p.name for p in ckpts] == ["step_000001", "step_000002"]
    for p in ckpts:
        _flip(p / "model" / "model.safetensors")
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as e:
        train(cfg(4), tmp_path, log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and "every checkpoint" in msg and "step_000001 (model/model.safetensors" in msg
    assert "step_000002 (model/model.safetensors" in msg and "trainer.resume=never" in msg
    assert _tree(tmp_path) == before  # nothing moved, nothing written (the lock file aside)
    with pytest.raises(CheckpointError):
        resolve_resume(tmp_path, "auto")
    summary = train(cfg(1, "trainer.resume=never"), tmp_path, log=lambda *_: None)  # an explicit fresh start
    assert summary["stopped_at_step"] is None and [s for s, _ in list_checkpoints(tmp_path)] == [1]
    kept = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "checkpoints" / "superseded").iterdir())
    assert kept == ["step_000001", "step_000002"]  # the damaged ones, kept as evidence
    assert all(manifest_problems(p) for p in (tmp_path / "checkpoints" / "superseded").iterdir())
    record("checkpoint_damage", "every_checkpoint_damaged", injected=2, stopped=True, moved=0,
           fresh_start_needs="trainer.resume=never")
