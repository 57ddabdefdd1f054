"""Reward functions: texts + problems -> rewards [N] and counts for the metrics.

`math` scores the extracted final answer against the gold answer with math-verify (in the
verifier's process pool, with a per-item timeout). `countdown` (the tiny task) additionally
requires the boxed expression to use exactly the given numbers, so boxing the target itself
earns nothing; the value check is still math-verify's.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from occ_exp.reward.verifier import Verifier, extract_answer


class MathReward:
    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, verifier: Verifier | None = None):
        """`verifier`: share another reward's worker pool (this reward then leaves closing it to its owner)."""
        self._owns_verifier = verifier is None
        self.verifier = verifier or Verifier(num_workers=num_workers, timeout_s=timeout_s)

    def _check(self, texts, problems):
        return [True] * len(texts)

    def __call__(self, texts: list[str], problems: list) -> tuple[torch.Tensor, dict]:
        ok = self._check(texts, problems)
        idx = [i for i, good in enumerate(ok) if good]
        scores = [0.0] * len(texts)
        timeouts = unparsed = retried = 0
        if idx:
            res = self.verifier.score([texts[i] for i in idx], [problems[i].answer for i in idx])
            for i, s in zip(idx, res.scores):
                scores[i] = s
            timeouts, unparsed, retried = res.timeouts, res.unparsed, res.retried
        n = max(len(texts), 1)
        stats = {
            "reward/timeouts": timeouts,  # pairs over the CPU-time limit twice (or poisoned earlier)
            "reward/timeout_retries": retried,  # pairs over the limit once, then tried again
            "reward/unparsed": unparsed + (len(texts) - len(idx)),
            "reward/format_ok": len(idx) / n,
        }
        return torch.tensor(scores, dtype=torch.float32), stats

    def close(self) -> None:
        if self._owns_verifier:
            self.verifier.close()


def uses_numbers(answer: str | None, numbers: tuple[int, ...]) -> bool:
    """The countdown check: the boxed expression uses exactly the given numbers (as a multiset)
    and only arithmetic characters; the value itself is math-verify's job."""
    if answer is None or not re.fullmatch(r"[0-9+\-*/() ]+", answer):
        return False
    return Counter(int(x) for x in re.findall(r"\d+", answer)) == Counter(numbers)


class CountdownReward(MathReward):
    def _check(self, texts, problems):
        return [uses_numbers(extract_answer(t), p.numbers) for t, p in zip(texts, problems)]


REWARDS = {"math": MathReward, "countdown": CountdownReward}


def reward_kind(data_cfg) -> str:
    """Which reward scores a training data set: the countdown check for data=tiny, math otherwise."""
    return "countdown" if data_cfg.name == "tiny" else "math"


def build_reward(data_cfg, timeout_s: float = 5.0):
    return REWARDS[reward_kind(data_cfg)](timeout_s)
