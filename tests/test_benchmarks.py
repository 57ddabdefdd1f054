"""Benchmark and training-data loaders, the benchmark config group, prompt formatting, and the
trainer's PromptStream over a file-backed data set."""

from __future__ import annotations

import copy
import json
import random

import pytest

from occ_exp.data.benchmarks import (
    BENCHMARKS,
    PAPER_BENCHMARKS,
    DataError,
    MathDataset,
    load_benchmark,
    load_benchmarks,
    load_problems,
)
from occ_exp.data.prompts import format_prompts
from occ_exp.data.tasks import CountdownTask, Problem
from occ_exp.data.prompts import PromptStream
from tests.conftest import CONF, SHARED_BENCHMARKS, compose_cfg

COUNTS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva_math": 272, "olympiadbench": 674}
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} not present")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@needs_shared
@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_shared_benchmark_files_load_with_counts_and_fields(name):
    b = load_benchmark(name, SHARED_BENCHMARKS)
    assert b.name == name and b.reward == "math"
    assert len(b.problems) == COUNTS[name]
    for p in b.problems:
        assert p.prompt.strip() and p.answer.strip()
        assert p.prompt.endswith(INSTRUCTION)  # the instruction travels with the data
    assert len({p.prompt for p in b.problems}) == len(b.problems)


@needs_shared
def test_benchmark_all_is_the_six_in_table_order_and_limit_is_a_stable_subset():
    cfg = compose_cfg(["benchmark=all"], config_name="evaluate")
    assert list(cfg.benchmark.names) == list(PAPER_BENCHMARKS) == list(BENCHMARKS)[:6]
    full = load_benchmark("math500", SHARED_BENCHMARKS).problems
    sub = load_benchmark("math500", SHARED_BENCHMARKS, limit=50).problems
    assert len(sub) == 50 and sub == load_benchmark("math500", SHARED_BENCHMARKS, limit=50).problems
    idx = [full.index(p) for p in sub]
    assert idx == sorted(idx) and idx != list(range(50))  # seeded sample kept in file order, not a prefix
    assert load_benchmark("aime24", SHARED_BENCHMARKS, limit=100).problems == load_benchmark("aime24", SHARED_BENCHMARKS).problems


def test_every_benchmark_option_composes_and_names_known_benchmarks():
    options = sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml"))
    assert set(options) == set(BENCHMARKS) | {"all"}
    for opt in options:
        cfg = compose_cfg([f"benchmark={opt}"])
        assert cfg.benchmark.name == opt
        assert all(n in BENCHMARKS for n in cfg.benchmark.names)
    assert list(compose_cfg([]).benchmark.names) == ["tiny"]  # training default: the tiny held-out split


def test_missing_benchmark_file_names_path_and_fetch_command(tmp_path):
    with pytest.raises(DataError) as e:
        load_benchmarks(["aime24"], tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "aime24.jsonl") in msg
    assert f"python scripts/fetch_data.py --data-dir {tmp_path / 'nowhere'}" in msg
    with pytest.raises(DataError, match="unknown benchmark 'aime23'"):
        load_benchmark("aime23", tmp_path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"problem": "1+1", "answer": ', "not valid JSON"),
        ('["1+1", "2"]', "expected a JSON object"),
        ('{"problem": "1+1"}', "no answer"),
        ('{"problem": "1+1", "answer": ""}', "no answer"),
        ('{"question": "1+1", "answer": "2"}', "no problem text"),
        ('{"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "1+1"}], "label": "2"}',
         "one user message"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "2+2", "answer": "4"}, "", bad_line])
    with pytest.raises(DataError, match=message) as e:
        load_benchmark("aime24", tmp_path)
    assert f"{path}:3" in str(e.value)


def test_empty_file_is_an_error(tmp_path):
    write_jsonl(tmp_path / "amc23.jsonl", [""])
    with pytest.raises(DataError, match="no rows"):
        load_benchmark("amc23", tmp_path)


def test_dapo_layout_rows_and_deduplication(tmp_path):
    def dapo(text, answer, key="reward_model"):
        row = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": text}], "ability": "MATH"}
        row.update({"reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}} if key == "reward_model"
                   else {"label": answer})
        return row

    rows = [dapo("Solve 1. Answer: $Answer", "1"), dapo("Solve 2. Answer: $Answer", "2", key="label"),
            dapo("Solve 1. Answer: $Answer", "1"), {"problem": "Solve 3.", "answer": 3}]
    ds = MathDataset(write_jsonl(tmp_path / "dapo_math.jsonl", rows))
    assert len(ds) == 3 and ds.duplicates == 1
    assert [p.prompt for p in ds] == ["Solve 1. Answer: $Answer", "Solve 2. Answer: $Answer", "Solve 3."]
    assert [p.answer for p in ds] == ["1", "2", "3"]
    wrapped = load_problems(tmp_path / "dapo_math.jsonl", template="Q: {problem}\nA:")
    assert wrapped[1].prompt == "Q: Solve 2. Answer: $Answer\nA:"
    with pytest.raises(DataError, match="must contain"):
        load_problems(tmp_path / "dapo_math.jsonl", template="no placeholder")


def test_data_dapo_math_builds_a_file_backed_task(tmp_path):
    from occ_exp.builders import build_task
    from occ_exp.reward.rewards import MathReward, REWARDS, reward_kind

    write_jsonl(tmp_path / "dapo_math.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(5)])
    cfg = compose_cfg(["data=dapo_math", f"paths.data_dir={tmp_path}"])
    assert cfg.data.path == f"{tmp_path}/dapo_math.jsonl"
    task = build_task(cfg.data)
    assert isinstance(task, MathDataset) and len(task) == 5
    assert REWARDS[reward_kind(cfg.data)] is MathReward
    cfg = compose_cfg(["data=dapo_math", f"paths.data_dir={tmp_path / 'missing'}"])
    with pytest.raises(DataError, match="fetch_data.py"):
        build_task(cfg.data)


def test_tiny_benchmark_is_the_held_out_split():
    cfg = compose_cfg([])
    b = load_benchmark("tiny", "unused", cfg.data, limit=40)
    task = CountdownTask.from_config(cfg.data)
    assert b.reward == "countdown" and len(b.problems) == 40
    assert all(task.split_of(p.numbers, int(p.answer)) == "test" for p in b.problems)
    assert load_benchmark("tiny", "unused", cfg.data, limit=10).problems == b.problems[:10]  # in-loop set ⊂ final set


def test_prompt_formatting_raw_for_tiny_and_chat_template_when_present(tiny_policy):
    _, tok = tiny_policy
    problems = [Problem("Make 10 with 1 2 3 4.\n", "10")]
    assert format_prompts(problems, tok) == ["Make 10 with 1 2 3 4.\n"]  # the tiny tokenizer has no template
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert format_prompts(problems, chat_tok) == ["<|user|>Make 10 with 1 2 3 4.\n<|end|><|assistant|>"]
    assert format_prompts(problems, chat_tok, chat_template=False) == ["Make 10 with 1 2 3 4.\n"]


# -- PromptStream over a finite data set --------------------------------------------------------
def _dataset(tmp_path, n=7):
    return MathDataset(write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(n)]))


def test_prompt_stream_reads_each_epoch_once_in_a_new_seeded_order(tmp_path):
    ds = _dataset(tmp_path)
    s = PromptStream(ds, seed=3)
    drawn = [p.prompt for p in s.next(21)]  # three epochs
    epochs = [drawn[0:7], drawn[7:14], drawn[14:21]]
    assert all(sorted(e) == sorted(p.prompt for p in ds) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != [p.prompt for p in ds]
    assert [p.prompt for p in PromptStream(ds, seed=3).next(21)] == drawn  # seeded
    assert [p.prompt for p in PromptStream(ds, seed=4).next(7)] != epochs[0]


def test_prompt_stream_resumes_mid_epoch(tmp_path):
    ds = _dataset(tmp_path)
    a = PromptStream(ds, seed=0)
    a.next(5)
    state = a.state_dict()
    b = PromptStream(ds, seed=0)
    b.load_state_dict(state)
    assert [p.prompt for p in b.next(12)] == [p.prompt for p in a.next(12)]
    assert (b.epoch, b.pos) == (a.epoch, a.pos) == (2, 3)


def test_prompt_stream_procedural_task_unchanged():
    task = CountdownTask()
    global_state = random.getstate()
    a, b = PromptStream(task, seed=1), PromptStream(task, seed=1)
    assert a.next(3) == b.next(3)
    state = a.state_dict()
    c = PromptStream(task, seed=99)
    c.load_state_dict({"rng": state["rng"]})  # a checkpoint from before file-backed data
    assert c.next(4) == a.next(4)
    assert all(task.split_of(p.numbers, int(p.answer)) == "train" for p in c.next(20))
    assert random.getstate() == global_state  # the stream never touches the global RNG
