"""scripts/fetch_data.py without the network: its conversion of hub rows, the written format (byte
for byte the reference copies'), the checks, --verify, and the failure lines when offline."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_BENCHMARKS

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} not present")

_spec = importlib.util.spec_from_file_location("fetch_data", ROOT / "scripts" / "fetch_data.py")
fd = importlib.util.module_from_spec(_spec)
sys.modules["fetch_data"] = fd  # dataclasses look their module up there
_spec.loader.exec_module(fd)

INSTR = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize(
    "name, hub_row, expected",
    [
        ("aime24", {"id": 60, "problem": "Find $x$. ", "solution": "long", "answer": "204", "year": "2024"},
         {"problem": "Find $x$. " + INSTR, "answer": "204"}),
        ("amc23", {"id": 0, "question": "How many miles?", "answer": 27.0, "url": "u"},
         {"problem": "How many miles?" + INSTR, "answer": "27"}),
        ("math500", {"problem": "Convert $(0,3)$.", "solution": "... \\boxed{(3, \\frac{\\pi}{2})}",
                     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2},
         {"problem": "Convert $(0,3)$." + INSTR, "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"}),
        ("minerva_math", {"question": "Find the luminosity.", "answer": "4.5e33"},
         {"problem": "Find the luminosity." + INSTR, "answer": "4.5e33"}),
        ("olympiadbench", {"id": 1606, "question": "Find all triples.", "solution": ["s"],
                           "final_answer": ["$(1,8,19)$", "$(2,7,13)$"], "is_multiple_answer": True},
         {"problem": "Find all triples." + INSTR, "answer": "$(1,8,19)$, $(2,7,13)$"}),
    ],
)
def test_benchmark_rows_convert_to_problem_and_answer(name, hub_row, expected):
    assert fd.convert(name, [hub_row]) == [expected]


def test_a_changed_schema_is_a_clear_error():
    with pytest.raises(fd.FetchError, match=r"no answer \(looked for answer, final_answer; columns are \['problem'\]\)"):
        fd.convert("aime24", [{"problem": "x"}])
    with pytest.raises(fd.FetchError, match="one user message"):
        fd.convert("dapo_math", [{"prompt": [], "reward_model": {"ground_truth": "1"}}])


def test_dapo_rows_are_the_user_message_and_ground_truth_deduplicated():
    def row(i):
        return {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": str(i)},
                "prompt": [{"role": "user", "content": f"Solve {i % 3}.\n\nRemember to put your answer on its own line "
                                                       "after \"Answer:\"."}],
                "reward_model": {"ground_truth": str(i % 3), "style": "rule-lighteval/MATH_v2"}}

    out = fd.convert("dapo_math", [row(i) for i in range(10)])
    assert [r["answer"] for r in out] == ["0", "1", "2"]
    assert out[1]["problem"].startswith("Solve 1.") and set(out[0]) == {"problem", "answer"}


@needs_shared
@pytest.mark.parametrize("name", ["aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"])
def test_converted_files_are_byte_identical_to_the_reference_format(name, tmp_path):
    """Hub rows with the reference copy's text convert to exactly the reference file (and its
    manifest checksum): the writer's format, the instruction and the answer spelling all match."""
    ref = (SHARED_BENCHMARKS / f"{name}.jsonl").read_bytes()
    rows = [json.loads(x) for x in ref.decode().splitlines()]
    hub = [{"question": r["problem"][: -len(INSTR)], "final_answer": [r["answer"]]} if name == "olympiadbench"
           else {"problem": r["problem"][: -len(INSTR)], "answer": r["answer"]} for r in rows]
    sha = fd.write_jsonl(fd.convert(name, hub), tmp_path / f"{name}.jsonl")
    assert (tmp_path / f"{name}.jsonl").read_bytes() == ref
    assert sha == hashlib.sha256(ref).hexdigest() == fd.MANIFEST[name].sha256
    assert fd.check(name, len(rows), sha, strict=True).endswith("matches the reference copy")


def test_checks_row_counts_strictly_and_checksums_by_policy():
    with pytest.raises(fd.FetchError, match="aime24: 29 rows, expected 30"):
        fd.check("aime24", 29, fd.MANIFEST["aime24"].sha256, strict=False)
    assert fd.check("aime24", 30, "0" * 64, strict=False).startswith("warning: aime24: 30 rows, but sha256")
    with pytest.raises(fd.FetchError, match="differs from the reference copy"):
        fd.check("aime24", 30, "0" * 64, strict=True)
    assert "no reference checksum" in fd.check("dapo_math", 17398, "ab" * 32, strict=True)


@needs_shared
def test_verify_mode_on_the_shared_files_and_on_a_damaged_copy(tmp_path, capsys):
    assert fd.main(["--verify", "--data-dir", str(SHARED_BENCHMARKS), "--only", "benchmarks"]) == 0
    out = capsys.readouterr().out
    assert out.count("matches the reference copy") == 6
    lines = (SHARED_BENCHMARKS / "amc23.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "amc23.jsonl").write_text("".join(lines[:-1]))
    assert fd.main(["--verify", "--data-dir", str(tmp_path), "--only", "amc23,aime24"]) == 1
    err = capsys.readouterr().err
    assert "amc23: 39 rows, expected 40" in err
    assert f"{tmp_path / 'aime24.jsonl'} not found" in err
    assert fd.main(["--verify", "--only", "aime2024"]) == 2


def test_offline_fetch_fails_with_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "scripts/fetch_data.py", "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub at http://127.0.0.1:9")
    assert not (tmp_path / "data").exists()


def test_missing_pyarrow_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(fd.FetchError, match=r"pip install 'occ-exp\[data\]'"):
        fd.require_pyarrow()


def test_download_reads_the_parquet_export(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import huggingface_hub
    import pyarrow.parquet as pq

    folder = tmp_path / "snap"
    (folder / "default" / "test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "q1", "answer": 1.0}]), folder / "default/test/0000.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q2", "answer": 2.5}]), folder / "default/test/0001.parquet")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(folder))
    rows = fd.download_rows(fd.MANIFEST["amc23"])
    assert fd.convert("amc23", rows) == [{"problem": "q1" + INSTR, "answer": "1"}, {"problem": "q2" + INSTR, "answer": "2.5"}]
