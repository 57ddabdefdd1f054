"""The reliability tests' facts go to results/ only when `make reliability` asks for them: a plain
`make test` (CI, a developer's checkout) leaves the tracked results alone, and two pytest-xdist
workers recording into one file at once lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from tests import reliability_log
from tests.reliability_log import ENV, record, results_root


def test_without_make_reliability_nothing_is_written_into_the_checkout(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    tracked = Path(reliability_log.__file__).resolve().parents[1] / "results"
    before = {p: p.stat().st_mtime_ns for p in tracked.rglob("*.json")}
    record("resume", "a_case_of_this_test", launches=1)
    assert results_root() is None
    assert {p: p.stat().st_mtime_ns for p in tracked.rglob("*.json")} == before


def _record_many(root: str, worker: int) -> None:
    import os

    os.environ[ENV] = root
    for i in range(40):
        record("race", f"w{worker}_{i}", i=i)


def test_two_workers_recording_at_once_keep_every_case(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = json.loads((tmp_path / "reliability" / "race.json").read_text())
    assert len(data) == 80 and data["w1_39"] == {"i": 39}
