"""The countdown task: valid demonstrations, honest flawed ones, disjoint splits, a strict reward."""

import random

import pytest

from occ_exp.data.tasks import CountdownTask, _safe_eval
from occ_exp.reward.rewards import uses_numbers
from occ_exp.reward.verifier import extract_answer


@pytest.fixture(scope="module")
def task():
    return CountdownTask()


def test_solutions_reach_the_target_with_the_given_numbers(task):
    rng = random.Random(0)
    for p in task.problems(200, seed=1, split="train"):
        sol = task.solution(p, rng)
        ans = extract_answer(sol)
        assert uses_numbers(ans, p.numbers)
        assert _safe_eval(ans) == int(p.answer)
        assert len(sol.splitlines()) == task.num_numbers  # n-1 steps + the boxed line


def test_flawed_solutions_are_valid_moves_that_miss(task):
    rng = random.Random(1)
    for p in task.problems(100, seed=2, split="train"):
        sol = task.solution(p, rng, flawed=True)
        ans = extract_answer(sol)
        assert uses_numbers(ans, p.numbers)
        assert _safe_eval(ans) != int(p.answer)


def test_several_solution_paths_exist(task):
    """The policy has real choices: most problems have more than one demonstrated path."""
    rng = random.Random(3)
    multi = 0
    probs = task.problems(50, seed=3, split="train")
    for p in probs:
        paths = {task.solution(p, rng).splitlines()[0] for _ in range(20)}
        multi += len(paths) > 1
    assert multi >= 0.6 * len(probs)


def test_splits_are_disjoint_and_deterministic(task):
    train = {p.prompt for p in task.problems(2000, seed=0, split="train")}
    test = {p.prompt for p in task.problems(500, seed=0, split="test")}
    assert not train & test
    assert [p.prompt for p in task.problems(20, seed=5, split="test")] == \
           [p.prompt for p in task.problems(20, seed=5, split="test")]


def test_reward_is_strict():
    from occ_exp.reward.rewards import CountdownReward

    p = CountdownTask().problems(1, seed=0, split="test")[0]
    rng = random.Random(0)
    good = CountdownTask().solution(p, rng)
    texts = [good, f"\\boxed{{{p.answer}}}", good.replace("\\boxed{", "\\boxed{1+"), "no answer"]
    rf = CountdownReward(timeout_s=5.0)
    try:
        r, stats = rf(texts, [p] * len(texts))
    finally:
        rf.close()
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stats["reward/format_ok"] == pytest.approx(0.25)
    assert rf.verifier.spawned_pids == []  # the fast path settled every answer: no worker process started


def test_countdown_reward_starts_workers_only_for_what_the_fast_path_leaves():
    from occ_exp.reward.rewards import CountdownReward

    p = CountdownTask().problems(1, seed=0, split="test")[0]
    a, b, c = p.numbers
    rf = CountdownReward(timeout_s=5.0)
    try:
        assert rf([f"\\boxed{{{a}+{b}+{c}}}"], [p])[0].tolist() == [float(a + b + c == int(p.answer))]
        assert rf.verifier.spawned_pids == []
        rf([f"\\boxed{{{a}({b}+{c})}}"], [p])  # juxtaposition: math-verify's to read
        assert len(rf.verifier.spawned_pids) == rf.verifier.num_workers
    finally:
        rf.close()


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="num_numbers"):
        CountdownTask(num_numbers=1)
    with pytest.raises(ValueError, match="min_target"):
        CountdownTask(min_target=50, max_target=10)
