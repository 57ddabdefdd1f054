"""Rewards for RL from verifiable rewards (math answer checking)."""

from occ_exp.reward.verifier import (
    MAX_ANSWER_CHARS,
    Verifier,
    VerifyResult,
    extract_answer,
    fast_verdict,
    score,
)

__all__ = ["MAX_ANSWER_CHARS", "Verifier", "VerifyResult", "extract_answer", "fast_verdict", "score"]
