"""Rewards do not depend on machine load (issue 14, item 5).

The same batch of slow-ish sympy checks (polynomial identities, radicals, pi multiples,
intervals, trigonometric identities) is scored by a fresh Verifier on the machine as it is and
again while four CPU-burning processes started by the test compete for the cores.  The rewards
must be identical and no pair may time out.

A short ``timeout_s`` (1 s) makes the old failure visible within a test's time: a fresh
worker's first polynomial check costs ~0.45 s of CPU (sympy's lazy imports), and with the
deadline measured on the wall clock, a worker that gets a third of a core missed its 0.8 s soft
deadline and the pair was poisoned at 0 for the verifier's lifetime.  Deadlines now count the
worker's CPU seconds and workers warm up before they report ready.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from occ_exp.reward.rewards import MathReward
from occ_exp.reward.verifier import Verifier

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 1.0
BURNERS = 4

# (gold, predicted answer, expected reward)
BATCH = [
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("x^2+2x+1", "(x-1)^2", 0.0),
    ("x^2-1", "(x-1)(x+1)", 1.0),
    ("x^3-1", "(x-1)(x^2+x+1)", 1.0),
    ("x^2+4x+4", "(x+2)^2", 1.0),
    ("\\sqrt{8}", "2\\sqrt{2}", 1.0),
    ("5\\sqrt{2}", "\\sqrt{50}", 1.0),
    ("\\sqrt{8}", "3\\sqrt{2}", 0.0),
    ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi", 1.0),
    ("2\\pi", "\\pi", 0.0),
    ("1", "\\sin^2 x+\\cos^2 x", 1.0),
    ("(1,2]", "\\left(1,2\\right]", 1.0),
    ("(1, -2)", "(-2, 1)", 0.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("24", "(9-3)\\cdot(7-3)", 1.0),
]


def _responses() -> tuple[list[str], list[str]]:
    return [f"Some reasoning first.\nSo the answer is $\\boxed{{{p}}}$." for _, p, _ in BATCH], [g for g, _, _ in BATCH]


def _score_fresh() -> tuple[list[float], int]:
    """Score BATCH with a Verifier whose workers have just started (the case that flipped)."""
    with Verifier(num_workers=2, timeout_s=TIMEOUT_S) as v:
        res = v.score(*_responses())
    return res.scores, res.timeouts


def test_rewards_identical_on_idle_and_loaded_machine() -> None:
    expected = [e for _, _, e in BATCH]
    idle_scores, idle_timeouts = _score_fresh()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BURNERS)]
    try:
        loaded = [_score_fresh()]
    finally:
        for p in burners:
            p.kill()
        for p in burners:
            p.wait()
    assert idle_scores == expected and idle_timeouts == 0
    for scores, timeouts in loaded:
        assert (scores, timeouts) == (idle_scores, 0), [
            (g, p) for (g, p, _), a, b in zip(BATCH, idle_scores, scores) if a != b
        ]


def test_timed_out_pair_is_retried_once_then_poisoned() -> None:
    tower = "Answer: 9^{9^{9^{9}}}"
    with Verifier(num_workers=1, timeout_s=TIMEOUT_S) as v:
        res = v.score([tower, "\\boxed{(x+1)^2}"], ["7", "x^2+2x+1"])
        assert res.scores == [0.0, 1.0]
        assert (res.timeouts, res.retried, v.pool.retries) == (1, 1, 1)
        again = v.score([tower], ["7"])  # poisoned: not tried a third time
        assert (again.scores, again.timeouts, again.retried, v.pool.retries) == ([0.0], 1, 0, 1)


def test_math_reward_reports_timeouts_per_call() -> None:
    problems = [SimpleNamespace(answer="7"), SimpleNamespace(answer="x^2+2x+1")]
    reward = MathReward(timeout_s=TIMEOUT_S, num_workers=1)
    try:
        scores, stats = reward(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{(x+1)^2}"], problems)
        assert scores.tolist() == [0.0, 1.0]
        assert stats["reward/timeouts"] == 1 and stats["reward/timeout_retries"] == 1
        scores, stats = reward(["\\boxed{(x+1)^2}"], problems[1:])
        assert stats["reward/timeouts"] == 0 and stats["reward/timeout_retries"] == 0
    finally:
        reward.close()
