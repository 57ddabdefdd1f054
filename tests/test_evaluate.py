"""Evaluation: avg@k / pass@k formulas, the Evaluator's bookkeeping (with a scripted rollout and the
real verifier), Table-1 tables, the command on the warm-started tiny model and on a checkpoint,
and the trainer's in-loop evaluation on file-backed data."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from occ_exp.data.benchmarks import Benchmark, DataError, load_benchmark
from occ_exp.data.tasks import CountdownTask, Problem
from occ_exp.evaluate import resolve_model_path, run_evaluation
from occ_exp.evaluation import (
    Evaluator,
    Scorers,
    avg_at_k,
    eval_metrics,
    pass_at_k,
    pass_ks,
    results_table,
    table_from_files,
    write_eval,
)
from occ_exp.rollout.base import RolloutBatch
from tests.conftest import ROOT, SHARED_BENCHMARKS, compose_cfg

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} not present")


# -- formulas -----------------------------------------------------------------------------------
HAND = np.array([[1, 0, 0, 0],
                 [1, 1, 1, 1],
                 [0, 0, 0, 0],
                 [0, 1, 0, 1]], dtype=float)


def test_avg_and_pass_at_k_on_a_hand_made_matrix():
    assert avg_at_k(HAND) == pytest.approx((1 / 4 + 1 + 0 + 2 / 4) / 4)
    assert pass_at_k(HAND, 1) == pytest.approx(avg_at_k(HAND))  # unbiased pass@1 is avg@k
    # 1 - C(4-c, 2) / C(4, 2) per problem, c = 1, 4, 0, 2
    assert pass_at_k(HAND, 2) == pytest.approx((1 - 3 / 6 + 1 + 0 + 1 - 1 / 6) / 4)
    assert pass_at_k(HAND, 4) == pytest.approx(3 / 4)  # any correct sample
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(HAND, 5)


def test_pass_at_k_equals_the_binomial_formula_for_many_samples():
    rng = np.random.default_rng(0)
    k = 32
    scores = (rng.random((50, k)) < rng.random((50, 1))).astype(float)
    for m in (1, 2, 5, 16, 32):
        expected = np.mean([1 - math.comb(k - int(c), m) / math.comb(k, m) for c in scores.sum(1)])
        assert pass_at_k(scores, m) == pytest.approx(expected, abs=1e-12)
    assert avg_at_k(scores) == pytest.approx(scores.sum() / scores.size)
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32] and pass_ks(1) == [1] and pass_ks(12) == [1, 2, 4, 8, 12]


# -- the Evaluator, with a scripted rollout -----------------------------------------------------
class ScriptedRollout:
    """Answers prompt i, sample j with script(i, j); returns rows in a shuffled order (the
    Evaluator must follow prompt_index) and consumes torch's RNG (evaluation must not leak it)."""

    def __init__(self, problems, script):
        self.cfg = OmegaConf.create({"name": "scripted", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8})
        self.index = {p.prompt: i for i, p in enumerate(problems)}
        self.script = script
        self.calls = []

    def generate(self, prompts, n, *, greedy=False):
        self.calls.append({"n": len(prompts), "greedy": greedy, "temperature": self.cfg.temperature,
                           "top_p": self.cfg.top_p, "max_new_tokens": self.cfg.max_new_tokens})
        torch.rand(3)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        random.Random(len(self.calls)).shuffle(rows)
        texts = [self.script(self.index[prompts[i]], j) for i, j in rows]
        B = len(rows)
        return RolloutBatch(
            input_ids=torch.zeros(B, 4, dtype=torch.long), attention_mask=torch.ones(B, 4, dtype=torch.long),
            response_mask=torch.ones(B, 3, dtype=torch.bool), logp_sampler=torch.zeros(B, 3), prompt_len=1,
            texts=texts, prompt_index=torch.tensor([i for i, _ in rows]), truncated=torch.tensor([j == 2 for _, j in rows]))

    def close(self):
        pass


def eval_cfg(**kw):
    base = {"k": 3, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5, "max_problems": 0, "batch_size": 2,
            "seed": 0, "label": None, "save_samples": False}
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def scorers():
    s = Scorers()
    yield s
    s.close()


def test_evaluator_scores_each_sample_of_each_problem(scorers, tiny_policy, tmp_path):
    problems = [Problem(f"What is {i} + {i}?", str(2 * i)) for i in range(5)]

    def script(i, j):  # sample 0 right, sample 1 wrong, sample 2 no answer; problem 3 also right at j=1
        if j == 0 or (i == 3 and j == 1):
            return f"so the sum is \\boxed{{{2 * i}}}"
        return f"\\boxed{{{2 * i + 1}}}" if j == 1 else "I am not sure."

    ro = ScriptedRollout(problems, script)
    torch_state = torch.get_rng_state()
    ev = Evaluator(ro, tiny_policy[1], eval_cfg(), scorers=scorers)
    res = ev.run([Benchmark("aime24", problems, "math")], samples_path=tmp_path / "samples.jsonl")
    b = res["benchmarks"]["aime24"]
    assert b["correct"] == [1, 1, 1, 2, 1]
    assert b["avg@k"] == pytest.approx(6 / 15)
    assert b["pass@k"]["1"] == pytest.approx(6 / 15)
    assert b["pass@k"]["3"] == pytest.approx(1.0)
    assert b["pass@k"]["2"] == pytest.approx((4 * (1 - 1 / 3) + 1) / 5)
    assert b["unparsed"] == 5 and b["timeouts"] == 0 and b["n"] == 5
    assert b["truncated"] == pytest.approx(1 / 3) and b["response_len"] == 3
    # batches of eval.batch_size prompts, sampled at the evaluation's settings, restored afterwards
    assert [c["n"] for c in ro.calls] == [2, 2, 1]
    assert all(c == {"n": c["n"], "greedy": False, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5}
               for c in ro.calls)
    assert ro.cfg.temperature == 1.0 and ro.cfg.max_new_tokens == 8
    assert torch.equal(torch.get_rng_state(), torch_state)  # evaluation never moves the training RNG
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 15
    assert {(x["problem"], x["sample"]) for x in lines} == {(i, j) for i in range(5) for j in range(3)}
    assert all(x["score"] == (1.0 if x["extracted"] == x["answer"] else 0.0) for x in lines)
    m = eval_metrics(res)
    assert m["eval/accuracy"] == pytest.approx(6 / 15) and m["eval/aime24/accuracy"] == pytest.approx(6 / 15)
    assert m["eval/aime24/pass@3"] == pytest.approx(1.0) and m["eval/n"] == 5 and m["eval/unparsed"] == 5


def test_greedy_evaluation_is_one_greedy_sample(scorers, tiny_policy):
    problems = [Problem("1+1?", "2"), Problem("2+2?", "4")]
    ro = ScriptedRollout(problems, lambda i, j: f"\\boxed{{{2 * (i + 1)}}}" if i == 0 else "\\boxed{5}")
    res = Evaluator(ro, tiny_policy[1], eval_cfg(k=1, temperature=0.0), scorers=scorers).run(
        [Benchmark("math500", problems, "math")])
    assert [c["greedy"] for c in ro.calls] == [True]
    assert res["benchmarks"]["math500"]["avg@k"] == 0.5 and eval_metrics(res)["eval/accuracy"] == 0.5
    assert "eval/pass@1" not in eval_metrics(res)


def test_tiny_benchmark_is_scored_with_the_number_usage_check(scorers, tiny_policy):
    task = CountdownTask()
    bench = load_benchmark("tiny", "unused", limit=6)
    rng = random.Random(0)
    solutions = [task.solution(p, rng) for p in bench.problems]
    # sample 0: a real solution; sample 1: the target itself boxed (right value, numbers unused)
    ro = ScriptedRollout(bench.problems, lambda i, j: solutions[i] if j == 0 else f"\\boxed{{{bench.problems[i].answer}}}")
    res = Evaluator(ro, tiny_policy[1], eval_cfg(k=2, temperature=1.0), scorers=scorers).run([bench])
    assert res["benchmarks"]["tiny"]["correct"] == [1] * 6
    assert res["benchmarks"]["tiny"]["avg@k"] == 0.5
    assert scorers["countdown"].verifier is scorers["math"].verifier  # one verifier pool for both kinds


def test_scorers_close_only_what_they_built():
    from occ_exp.reward.rewards import CountdownReward

    own = CountdownReward()
    s = Scorers({"countdown": own})
    math_fn = s["math"]
    assert math_fn.verifier is own.verifier
    s.close()
    assert not own.verifier.closed  # the borrowed pool stays with its owner
    own.close()
    assert own.verifier.closed


# -- tables -------------------------------------------------------------------------------------
def _result(label, accs: dict, k=32, t=0.6):
    benches = {n: {"avg@k": a, "n": 10, "k": k, "pass@k": {str(k): a}, "unparsed": 0, "timeouts": 0,
                   "response_len": 1.0} for n, a in accs.items()}
    from occ_exp.evaluation import average

    return {"label": label, "k": k, "temperature": t, "top_p": 0.95, "benchmarks": benches, "average": average(benches)}


def test_results_table_has_the_paper_layout(tmp_path):
    a = _result("MiMo-7B-RL + occ", {"olympiadbench": 0.5, "aime24": 0.25, "amc23": 0.875, "aime25": 0.125,
                                     "math500": 0.9, "minerva_math": 0.375})
    b = _result("detach", {"aime24": 0.2, "tiny": 0.4})
    table = results_table([a, b])
    lines = table.splitlines()
    assert lines[0] == "| Model | AIME24 | AIME25 | AMC23 | MATH500 | Minerva | Olympiad | Tiny | Avg |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| MiMo-7B-RL + occ | 25.0 | 12.5 | 87.5 | 90.0 | 37.5 | 50.0 | – | 50.4 |"
    assert lines[3] == "| detach | 20.0 | – | – | – | – | – | 40.0 | 30.0 |"
    assert "k=32, temperature 0.6, top-p 0.95" in table
    for i, r in enumerate((a, b)):
        write_eval(r, tmp_path / f"run{i}")
    assert (tmp_path / "run0" / "eval.md").read_text() == results_table([a])
    from_files = table_from_files([tmp_path / "run0" / "eval.json", tmp_path / "run1" / "eval.json"])
    assert from_files == table
    relabelled = table_from_files([tmp_path / "run1" / "eval.json"], labels=["ce"])
    assert relabelled.splitlines()[2].startswith("| ce | 20.0 |")
    with pytest.raises(DataError, match="eval.json"):
        table_from_files([tmp_path / "missing.json"])


# -- the command --------------------------------------------------------------------------------
@needs_shared
@pytest.mark.slow
def test_evaluate_warm_started_tiny_model_on_two_benchmarks(smoke_overrides, tmp_path):
    cfg = compose_cfg(smoke_overrides + [f"paths.data_dir={SHARED_BENCHMARKS}", "benchmark.names=[aime24,amc23]",
                                         "eval.k=2", "eval.temperature=1.0", "eval.max_new_tokens=12",
                                         "eval.max_problems=4", "eval.save_samples=true"], config_name="evaluate")
    res = run_evaluation(cfg, tmp_path, log=lambda *_: None)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["label"] == res["label"] == "tiny (warm start)"
    assert list(saved["benchmarks"]) == ["aime24", "amc23"]
    for b in saved["benchmarks"].values():
        assert b["n"] == 4 and b["k"] == 2 and 0.0 <= b["avg@k"] <= 1.0 and set(b["pass@k"]) == {"1", "2"}
        assert b["unparsed"] + sum(b["correct"]) <= 8 and b["response_len"] <= 12
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert table[0] == "| Model | AIME24 | AMC23 | Avg |"
    assert table[2].startswith("| tiny (warm start) | ")
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 16


def test_evaluate_a_trainer_checkpoint_by_its_run_dir(tiny_policy, tmp_path):
    from occ_exp.checkpoint import TrainState, save_checkpoint
    from occ_exp.models.loading import save_policy

    policy, tok = tiny_policy
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 3, partial(save_policy, policy, tok), TrainState(3), OmegaConf.to_yaml(compose_cfg(["regime=ce", "seed=2"])))
    assert resolve_model_path(str(run)) == str(ckpt / "model")
    assert resolve_model_path(str(ckpt)) == str(ckpt / "model") == resolve_model_path(str(ckpt / "model"))
    assert resolve_model_path("org/hub-model") == "org/hub-model"
    cfg = compose_cfg([f"model.path={run}", "benchmark=tiny", "eval.max_problems=6", "rollout.max_new_tokens=8",
                       "trainer.device=cpu"], config_name="evaluate")
    res = run_evaluation(cfg, tmp_path / "eval", log=lambda *_: None)
    assert res["label"] == "ce-tiny-s2 step_000003"
    assert res["model"] == str(ckpt / "model")
    assert res["benchmarks"]["tiny"]["n"] == 6 and res["benchmarks"]["tiny"]["avg@k"] == 0.0  # random weights


def test_cli_missing_data_is_one_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "400"}
    missing = tmp_path / "no-data"
    proc = subprocess.run([sys.executable, "-m", "occ_exp.evaluate", "benchmark=aime24", f"paths.data_dir={missing}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert str(missing / "aime24.jsonl") in proc.stderr
    assert f"python scripts/fetch_data.py --data-dir {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the trainer uses the same evaluation, on file-backed training data -------------------------
@needs_shared
def test_train_on_file_data_evaluates_benchmarks_in_loop(tmp_path):
    from occ_exp.checkpoint import load_trainer_state
    from occ_exp.trainer import train

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}? Answer: $Answer"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(3)]
    (data / "dapo_math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))  # duplicated, as DAPO ships
    cfg = compose_cfg(["data=dapo_math", f"data.path={data / 'dapo_math.jsonl'}", f"paths.data_dir={SHARED_BENCHMARKS}",
                       "benchmark=aime24", "model.warmstart.enabled=false", "data.prompts_per_step=2",
                       "algorithm.group_size=2", "algorithm.num_mini_batches=2", "rollout.max_new_tokens=6",
                       "trainer.total_steps=2", "trainer.eval_every=1", "trainer.eval_problems=2",
                       "trainer.final_eval_problems=3", "trainer.save_every=1", "trainer.progress=false",
                       "trainer.device=cpu", f"paths.cache_dir={tmp_path / 'cache'}"])
    train(cfg, tmp_path / "run", log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/n"] == 2 and rows[1]["eval/n"] == 2 and rows[2]["eval/n"] == 3
    assert all("eval/aime24/accuracy" in r and "eval/accuracy" in r for r in rows)
    assert rows[2]["eval/final"] == 1
    final = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert final["label"] == cfg.run_name and final["step"] == 2 and final["benchmarks"]["aime24"]["n"] == 3
    state = load_trainer_state(tmp_path / "run" / "checkpoints" / "step_000002")
    assert (state["prompts"]["epoch"], state["prompts"]["pos"]) == (1, 1)  # 4 prompts from 3 unique problems
