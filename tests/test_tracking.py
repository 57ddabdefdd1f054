"""metrics.jsonl and W&B across a kill and a resume: no duplicated step, no step going backwards,
the same W&B run."""

import sys
import types

from omegaconf import OmegaConf

from occ_exp.tracking import Tracker, read_metrics
from tests.reliability_log import record


def _cfg(name):
    return OmegaConf.create({"name": name, "project": "p", "entity": None, "mode": "offline", "tags": []})


def test_resume_truncates_metrics_atomically(tmp_path):
    t = Tracker(_cfg("jsonl"), tmp_path, resume_step=0)
    for s in range(0, 6):
        t.log({"x": float(s)}, step=s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x": ')  # a line cut by a kill
    t2 = Tracker(_cfg("jsonl"), tmp_path, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert t2.last_row["step"] == 3
    for s in (4, 5):
        t2.log({"x": float(s)}, step=s)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    # no checkpoint yet (start again from scratch): the old rows go, step 0 is logged again
    Tracker(_cfg("jsonl"), tmp_path, resume_step=0)
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


class _FakeRun:
    def __init__(self, log, kw):
        self.kw, self.logged, self.summary = kw, log, {}

    def log(self, metrics, step):
        self.logged.append((self.kw["id"], step))

    def finish(self):
        pass


def _fake_wandb(calls, logged):
    def init(**kw):
        calls.append(kw)
        return _FakeRun(logged, kw)

    return types.SimpleNamespace(init=init)


def test_wandb_resume_same_run_steps_never_go_back(tmp_path, monkeypatch):
    calls, logged = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls, logged))
    t = Tracker(_cfg("wandb"), tmp_path, resume_step=0)
    for s in range(0, 5):  # steps 0..4 logged, then a kill; the last checkpoint is step 2
        t.log({"x": s}, step=s)
    t2 = Tracker(_cfg("wandb"), tmp_path, resume_step=2)
    for s in range(3, 7):
        t2.log({"x": s}, step=s)
    run_ids = {kw["id"] for kw in calls}
    assert len(run_ids) == 1 and calls[1]["resume"] == "allow"
    assert (tmp_path / "wandb_run_id.txt").read_text() == run_ids.pop()
    steps = [s for _, s in logged]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # steps 3 and 4 re-run, not re-sent
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(7))
    record("resume", "wandb_tracker_unit", kills_simulated=1, resumes_simulated=1, same_run_id=True, steps_backwards=0,
           duplicated_rows=0)
