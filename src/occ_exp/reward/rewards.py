"""Reward functions: texts + problems -> rewards [N] and counts for the metrics.

`math` scores the extracted final answer against the gold answer with math-verify (in the
verifier's process pool, with a per-item timeout). `countdown` (the tiny task) additionally
requires the boxed expression to use exactly the given numbers, so boxing the target itself
earns nothing; the value check is the verifier's: its fast path evaluates the integer arithmetic
exactly in this process (agreeing with math-verify), and what it leaves goes to math-verify.

Both return the verifier's score (1 correct, 0 not): evaluation averages it as accuracy. The
training reward is `scale_reward(score, reward.scale)`: `binary` keeps 1 / 0, `signed` gives
+1 / -1 as verl's DAPO reward manager does (the default of algorithm=dapo). Under GRPO's
group normalisation the two give the same advantages up to adv_eps, until the overlong penalty
is added: it is then measured against a gap of 2 between right and wrong, not 1.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from occ_exp.reward.verifier import Verifier, extract_answer


class MathReward:
    #: start the verifier's workers at construction, so they warm up while the model loads
    START_WORKERS = True

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, verifier: Verifier | None = None):
        """`verifier`: share another reward's worker pool (this reward then leaves closing it to its owner)."""
        self._owns_verifier = verifier is None
        self.verifier = verifier or Verifier(num_workers=num_workers, timeout_s=timeout_s,
                                             start_workers=self.START_WORKERS)

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
    and only arithmetic characters; the value itself is the verifier's job."""
    if answer is None or not re.fullmatch(r"[0-9+\-*/() ]+", answer):
        return False
    return Counter(int(x) for x in re.findall(r"\d+", answer)) == Counter(numbers)


class CountdownReward(MathReward):
    # its answers are integer arithmetic, which the verifier's fast path settles: the workers
    # start only if an answer is left to math-verify (a division by zero, say)
    START_WORKERS = False

    def _check(self, texts, problems):
        return [uses_numbers(extract_answer(t), p.numbers) for t, p in zip(texts, problems)]


REWARDS = {"math": MathReward, "countdown": CountdownReward}
REWARD_SCALES = ("binary", "signed")


def scale_reward(scores: torch.Tensor, scale: str) -> torch.Tensor:
    """The training reward of verifier scores in [0, 1]: `binary` as they are, `signed` 2*s - 1
    (+1 correct, -1 wrong: verl's DAPO reward)."""
    if scale == "binary":
        return scores
    if scale == "signed":
        return 2.0 * scores - 1.0
    raise ValueError(f"unknown reward.scale {scale!r}; choose one of {REWARD_SCALES}")


def reward_kind(data_cfg) -> str:
    """Which reward scores a training data set: the countdown check for data=tiny, math otherwise."""
    return "countdown" if data_cfg.name == "tiny" else "math"


def build_reward(data_cfg, timeout_s: float = 5.0):
    return REWARDS[reward_kind(data_cfg)](timeout_s)
