"""The exact fast path never disagrees with math-verify.

Seeded pairs of every form the fast path decides (fractions in four spellings, decimals
against fractions, products, radicals, pi multiples, integer tuples, signs and zeros; and
integer arithmetic, the countdown task's answers), equal and unequal, are scored by
fast_verdict in the parent and by math-verify in a worker (fast path off); every pair the
fast path decides must get math-verify's score.  (A larger
offline run of the same generator, 1,500 pairs, is recorded in results/verifier_bench.md.)
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

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


def disagreements(pairs: list[tuple[str, str]]) -> list[tuple]:
    """The pairs whose fast verdict differs from math-verify's score (a worker, fast path off)."""
    with Verifier(num_workers=2, timeout_s=10.0, fast_path=False) as slow:
        res = slow.score([f"so \\boxed{{{p}}}" for p, _ in pairs], [g for _, g in pairs])
    assert res.timeouts == 0
    return [(p, g, fast_verdict(p, g), s) for (p, g), s in zip(pairs, res.scores) if fast_verdict(p, g) != s]


def test_closed_form_fast_path_agrees_with_math_verify() -> None:
    pairs = [(p, g) for p, g in closed_form_pairs(seed=11, n=140) if fast_verdict(p, g) is not None]
    assert len(pairs) >= 120  # the fast path decides nearly all of these forms
    assert {fast_verdict(p, g) for p, g in pairs} == {0.0, 1.0}
    assert disagreements(pairs) == []


def countdown_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """Random countdown-style answers (integers 0-15, + - * /, parentheses, blanks, a sign now and
    then, also after an operator) against their value when it is an integer (half the time), else
    a random integer gold."""
    rng = random.Random(seed)

    def expr(depth: int = 0) -> str:
        if depth > 2 or rng.random() < 0.35:
            return str(rng.randint(0, 15))
        blank = " " if rng.random() < 0.3 else ""
        s = f"{expr(depth + 1)}{blank}{rng.choice('+-*/')}{blank}{expr(depth + 1)}"
        s = f"({s})" if rng.random() < 0.4 else s
        return "-" + s if rng.random() < 0.05 else s

    def value(node: ast.AST) -> Fraction:  # the test's own exact reading, through Python's parser
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand)
        ops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
               ast.Div: Fraction.__truediv__}
        return ops[type(node.op)](value(node.left), value(node.right))

    out = []
    for _ in range(n):
        s = expr()
        try:
            v = value(ast.parse(s, mode="eval").body)
        except ZeroDivisionError:
            v = None
        right = v is not None and v.denominator == 1 and rng.random() < 0.5
        out.append((s, str(v.numerator) if right else str(rng.randint(10, 100))))
    return out


def test_fast_path_decides_countdown_answers() -> None:
    """The tiny task's answers are integer arithmetic: the fast path settles all of them but the
    divisions by zero, so its reward needs no math-verify worker."""
    pairs = countdown_pairs(seed=0, n=500)
    undecided = [p for p, g in pairs if fast_verdict(p, g) is None]
    assert len(undecided) < 0.05 * len(pairs), undecided
    assert all("/" in p and "0" in p for p in undecided), undecided


def test_countdown_fast_path_agrees_with_math_verify() -> None:
    """(Offline, 3,000 pairs of the same generator: 2,904 decided, 0 disagreements.)"""
    pairs = [(p, g) for p, g in countdown_pairs(seed=1, n=200) if fast_verdict(p, g) is not None]
    assert {fast_verdict(p, g) for p, g in pairs} == {0.0, 1.0}
    assert disagreements(pairs) == []
