"""Results files name the commit of the code that made them: one helper, used by every script that
writes under results/, that ignores results/ itself (a report being written, or a benchmark's
earlier output, is not a change to the code) and marks any change to the code '-dirty'."""
from __future__ import annotations

import subprocess
from pathlib import Path

from occ_exp.runtime import code_commit

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_results_do_not_mark_the_commit_dirty_and_code_does(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    (tmp_path / "results" / "t.md").write_text("b\n")
    assert code_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == sha + "-dirty"


def test_a_tree_without_git_says_unknown(tmp_path):
    assert code_commit(tmp_path) == "unknown"


def test_no_script_asks_git_for_the_commit_itself():
    """Four scripts once had four copies of this (two without the results/ exception)."""
    own = [p.name for p in sorted((ROOT / "scripts").glob("*.py")) if '"rev-parse"' in p.read_text()]
    assert own == []


def load_bench():
    """scripts/bench.py as a module (a script, not part of the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_benchmark_report_names_its_commit(tmp_path):
    bench = load_bench()
    machine = {"cpu": "x", "cpus": 2, "threads": 1, "load_before": [0.1] * 3, "load_after": [0.2] * 3,
               "versions": {"torch": "t"}, "python": "3"}
    res = {"command": "python scripts/bench.py --only matmul", "commit": "abc1234", "date": "d", "wall_s": 1.0,
           "machine": machine, "settings": {}, "notes": []}
    bench.write_report(res, tmp_path)
    assert "Command: `python scripts/bench.py --only matmul` at commit `abc1234`" in (tmp_path / "bench.md").read_text()


def test_a_merged_benchmark_names_each_kept_section_by_the_run_that_made_it(tmp_path):
    """`bench.py --only X --merge` twice: the sections kept from two runs back are named by that
    run's command and commit, not by the run just before (which only carried them over)."""
    bench = load_bench()

    def run(command, commit, sections, earlier):
        res = {"command": command, "commit": commit, "date": commit + "-date", **{k: {"v": commit} for k in sections}}
        bench.stamp_sections(res)
        if earlier:
            bench.merge_earlier(res, earlier)
        return res

    first = run("bench --only default_step", "c1", ["default_step"], None)
    second = run("bench --only test_suite --merge", "c2", ["test_suite"], first)
    third = run("bench --only matmul --merge", "c3", ["matmul"], second)
    assert third["default_step"]["made_by"]["commit"] == "c1" and third["test_suite"]["made_by"]["commit"] == "c2"
    assert third["merged"]["kept_from"] == {"default_step": "`bench --only default_step` at commit `c1` (c1-date)",
                                            "test_suite": "`bench --only test_suite --merge` at commit `c2` (c2-date)"}
    # a report written before the stamps: its sections are its own run's
    legacy = {"command": "old", "commit": "c0", "date": "d0", "vllm": {"v": 0}}
    res = run("bench --only matmul --merge", "c4", ["matmul"], legacy)
    assert res["merged"]["kept_from"] == {"vllm": "`old` at commit `c0` (d0)"}


def test_a_run_records_the_commit_of_each_start_and_resume(smoke_overrides, tmp_path):
    """A run resumed across sessions may span commits: the run folder names each one with its step."""
    import json

    from occ_exp.trainer import train
    from tests.conftest import compose_cfg

    def short(steps):
        return compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", f"trainer.total_steps={steps}",
                                              "trainer.eval_every=0", "trainer.final_eval_problems=4"])

    train(short(1), tmp_path, log=lambda *_: None)
    train(short(2), tmp_path, log=lambda *_: None)  # resumes from step 1
    rows = [json.loads(line) for line in (tmp_path / "provenance.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["commit"] == code_commit(ROOT) for r in rows)


def test_a_resume_at_another_thread_count_says_it_is_not_bit_exact(smoke_overrides, tmp_path):
    """Bit-exact resume on the CPU holds at one thread count (and one torch build and device): a
    resume that differs says so, naming the setting that would match; one that matches says nothing."""
    import json

    import torch

    from occ_exp.trainer import train
    from tests.conftest import compose_cfg

    def short(steps, threads):
        return compose_cfg(smoke_overrides + ["model.warmstart.enabled=false", f"trainer.total_steps={steps}",
                                              "trainer.eval_every=0", "trainer.final_eval_problems=4",
                                              f"trainer.threads={threads}"])

    before = torch.get_num_threads()
    try:
        logs: list[str] = []
        train(short(1, 1), tmp_path, log=lambda *a: logs.append(" ".join(map(str, a))))
        train(short(2, 1), tmp_path, log=lambda *a: logs.append(" ".join(map(str, a))))
        assert not any("not bit-exact" in line for line in logs), logs
        train(short(3, 2), tmp_path, log=lambda *a: logs.append(" ".join(map(str, a))))
    finally:
        torch.set_num_threads(before)
    notes = [line for line in logs if "not bit-exact" in line]
    assert len(notes) == 1 and "1 torch thread(s)" in notes[0] and "trainer.threads=1" in notes[0], notes
    rows = [json.loads(line) for line in (tmp_path / "provenance.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in rows] == [1, 1, 2] and all(r["torch"] == torch.__version__ for r in rows)
