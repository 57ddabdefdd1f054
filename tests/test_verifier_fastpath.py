"""The exact closed-form fast path never disagrees with math-verify.

Seeded pairs of every form the fast path decides (fractions in four spellings, decimals
against fractions, products, radicals, pi multiples, integer tuples, signs and zeros), equal
and unequal, are scored by fast_verdict in the parent and by math-verify in a worker
(fast path off); every pair the fast path decides must get math-verify's score.  (A larger
offline run of the same generator, 1,500 pairs, is recorded in results/verifier_bench.md.)
"""

from __future__ import annotations

import random

import pytest

from occ_exp.reward.verifier import Verifier, fast_verdict

pytestmark = pytest.mark.timeout(300)


def _frac(rng: random.Random, a: int, b: int) -> str:
    return rng.choice([f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\tfrac{{{a}}}{{{b}}}"])


def closed_form_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """(predicted, gold) pairs, about half equal."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for k in range(n):
        a, b = rng.randint(0, 60), rng.randint(1, 30)
        kind = k % 7
        if kind == 0:
            c = rng.choice([1, 2, 3])
            out.append((_frac(rng, a * c, b * c) if rng.random() < 0.6 else _frac(rng, b, a + 1), _frac(rng, a, b)))
        elif kind == 1:
            x, y = rng.randint(-9, 9), rng.randint(-9, 9)
            out.append((rng.choice([f"({x},{y})", f"({y},{x})", f"({x}, {y + 1})", f"({x},{y},{a})"]), f"({x}, {y})"))
        elif kind == 2:
            c, r = rng.randint(1, 6), rng.choice([2, 3, 5, 6, 4, 12])
            p = rng.choice([f"\\sqrt{{{c * c * r}}}", f"\\sqrt{{{r}}}\\cdot {c}", f"{c + 1}\\sqrt{{{r}}}",
                            f"\\frac{{{c * r}}}{{\\sqrt{{{r}}}}}", f"{c}\\sqrt{{{4 * r}}}"])
            out.append((p, f"{c}\\sqrt{{{r}}}"))
        elif kind == 3:
            p = rng.choice([f"\\frac{{{a}}}{{{b}}}\\pi", f"\\frac{{{a}}}{{{b + 1}}}\\pi", f"{a}\\pi/{b}",
                            f"\\pi\\cdot\\frac{{{a}}}{{{b}}}", f"\\frac{{{a}}}{{{b}}}"])
            out.append((p, f"\\frac{{{a}\\pi}}{{{b}}}"))
        elif kind == 4:
            q = a / 4
            out.append((rng.choice([f"{q}", f"{q + 0.5}", f"{q:.3f}", f"{q + 0.00002:.5f}", f"-{q}"]), _frac(rng, a, 4)))
        elif kind == 5:
            out.append((rng.choice([f"{a}\\cdot {b}", f"{a}\\times{b}", f"{a}*{b}", f"{a}\\cdot {b + 1}"]), str(a * b)))
        else:
            out.append((rng.choice(["0", "-0", "0\\pi", "0\\sqrt{2}", "\\frac{0}{5}", "-\\frac{1}{2}", "\\frac{-1}{2}"]),
                        rng.choice(["0", "-\\frac{1}{2}", "\\frac{1}{-2}"])))
    return out


def test_closed_form_fast_path_agrees_with_math_verify() -> None:
    pairs = [(p, g) for p, g in closed_form_pairs(seed=11, n=140) if fast_verdict(p, g) is not None]
    assert len(pairs) >= 120  # the fast path decides nearly all of these forms
    assert {fast_verdict(p, g) for p, g in pairs} == {0.0, 1.0}
    with Verifier(num_workers=2, timeout_s=10.0, fast_path=False) as slow:
        res = slow.score([f"so \\boxed{{{p}}}" for p, _ in pairs], [g for _, g in pairs])
    assert res.timeouts == 0
    wrong = [(p, g, fast_verdict(p, g), s) for (p, g), s in zip(pairs, res.scores) if fast_verdict(p, g) != s]
    assert not wrong, wrong
