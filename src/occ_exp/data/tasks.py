"""The procedural, verifiable math task of the tiny scale: countdown.

A problem gives n numbers and a target; a solution combines two remaining numbers per line with
+ - * / (exact division, non-negative results), writes the sorted remaining numbers after each
line, and ends with the whole expression in `\\boxed{...}`:

    Make 33 with 10 12 11.
    12+11=23 [10 23]
    10+23=33 [33]
    \\boxed{10+(12+11)}

Many orders and pairings solve one problem (the policy keeps real entropy), a wrong early choice
leads to a dead end (there is a search to get better at for hundreds of RL steps), and the answer
is checked by math-verify (the boxed expression must equal the target) plus a usage check (every
given number used exactly once), so boxing the target itself earns nothing.

Difficulty knobs: `num_numbers`, `max_number`, the target range. Train and held-out problems are
disjoint by construction: a problem is held out iff a hash of (sorted numbers, target) falls in
the `test_fraction` bucket.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

OPS = ("+", "-", "*", "/")
MAX_VALUE = 100


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text the model is given
    answer: str  # gold answer for the verifier (the target)
    numbers: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class _Item:
    value: int
    expr: str  # expression text
    compound: bool  # needs parentheses as an operand


def _combine(a: _Item, b: _Item, op: str) -> tuple[str, _Item] | None:
    """Apply op to (a, b) with the larger first for - and /; None if not allowed."""
    if op in "-/" and a.value < b.value:
        a, b = b, a
    x, y = a.value, b.value
    if op == "+":
        v = x + y
    elif op == "-":
        v = x - y
        if v < 0:
            return None
    elif op == "*":
        v = x * y
    else:
        if y <= 1 or x % y:
            return None
        v = x // y
    if v > MAX_VALUE:
        return None
    ea = f"({a.expr})" if a.compound else a.expr
    eb = f"({b.expr})" if b.compound else b.expr
    line = f"{x}{op}{y}={v}"
    return line, _Item(v, f"{ea}{op}{eb}", True)


@lru_cache(maxsize=4096)
def _reachable(numbers: tuple[int, ...]) -> frozenset[int]:
    """Final values reachable using all numbers exactly once."""
    if len(numbers) == 1:
        return frozenset(numbers)
    out: set[int] = set()
    n = len(numbers)
    for i in range(n):
        for j in range(i + 1, n):
            rest = numbers[:i] + numbers[i + 1 : j] + numbers[j + 1 :]
            for op in OPS:
                r = _combine(_Item(numbers[i], "", False), _Item(numbers[j], "", False), op)
                if r is not None:
                    out |= _reachable(tuple(sorted(rest + (r[1].value,))))
    return frozenset(out)


def _state_str(items: list[_Item]) -> str:
    return "[" + " ".join(str(v) for v in sorted(it.value for it in items)) + "]"


def _walk(items: list[_Item], rng: random.Random, target: int | None) -> list[str] | None:
    """A random path; with a target, only moves that keep the target reachable (a uniformly
    chosen solution path). Returns the solution lines, the boxed expression last."""
    lines: list[str] = []
    items = list(items)
    while len(items) > 1:
        moves = []
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                for op in OPS:
                    r = _combine(items[i], items[j], op)
                    if r is None:
                        continue
                    rest = [it for k, it in enumerate(items) if k not in (i, j)] + [r[1]]
                    if target is not None and target not in _reachable(tuple(sorted(it.value for it in rest))):
                        continue
                    moves.append((r[0], rest))
        if not moves:
            return None
        line, items = rng.choice(moves)
        lines.append(f"{line} {_state_str(items)}")
    lines.append(f"\\boxed{{{items[0].expr}}}")
    return lines


class CountdownTask:
    """Problem generator, demonstration writer and task-level reward check."""

    def __init__(self, num_numbers: int = 3, max_number: int = 15, min_target: int = 10,
                 max_target: int = 100, test_fraction: float = 0.1):
        if num_numbers < 2:
            raise ValueError(f"data.num_numbers must be >= 2, got {num_numbers}")
        if not (1 <= min_target <= max_target):
            raise ValueError(f"need 1 <= data.min_target <= data.max_target, got {min_target}, {max_target}")
        if not (0.0 < test_fraction < 1.0):
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.min_target = min_target
        self.max_target = max_target
        self.test_fraction = test_fraction

    @classmethod
    def from_config(cls, data_cfg) -> "CountdownTask":
        """The task of a data config (data=tiny's fields; defaults under other data options)."""
        return cls(data_cfg.num_numbers, data_cfg.max_number, data_cfg.min_target, data_cfg.max_target,
                   data_cfg.test_fraction)

    # -- problems ---------------------------------------------------------------------------
    @staticmethod
    def prompt_text(numbers: tuple[int, ...], target: int) -> str:
        return f"Make {target} with {' '.join(map(str, numbers))}.\n"

    def split_of(self, numbers: tuple[int, ...], target: int) -> str:
        key = f"{sorted(numbers)}->{target}".encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        return "test" if bucket < self.test_fraction else "train"

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        """A problem of the given split. The target is the value of a uniformly random path
        (so targets reachable in many ways are more common: a natural mix of easy and hard)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        for _ in range(100_000):
            numbers = tuple(rng.randint(1, self.max_number) for _ in range(self.num_numbers))
            lines = _walk([_Item(v, str(v), False) for v in numbers], rng, None)
            target = self.expression_value(lines[-1]) if lines else None
            if target is None or not (self.min_target <= target <= self.max_target):
                continue
            if self.split_of(numbers, target) == split:
                return Problem(self.prompt_text(numbers, target), str(target), numbers, {"target": target})
        raise RuntimeError("could not sample a problem: widen the target range or max_number")

    def problems(self, n: int, seed: int, split: str) -> list[Problem]:
        rng = random.Random(f"{seed}-{split}")
        return [self.sample(rng, split) for _ in range(n)]

    # -- demonstrations -----------------------------------------------------------------------
    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        """A demonstration: a uniformly random solution path, or (flawed=True) an honest failed
        attempt: a random path of valid moves that misses the target, boxed as it is."""
        items = [_Item(v, str(v), False) for v in problem.numbers]
        target = int(problem.answer)
        if flawed:
            for _ in range(50):
                lines = _walk(items, rng, None)
                if lines is not None and self.expression_value(lines[-1]) != target:
                    return "\n".join(lines)
        lines = _walk(items, rng, target)
        if lines is None:
            raise ValueError(f"problem has no solution: {problem.prompt!r}")
        return "\n".join(lines)

    @staticmethod
    def expression_value(boxed_line: str) -> int | None:
        m = re.fullmatch(r"\\boxed\{([0-9+\-*/() ]+)\}", boxed_line.strip())
        if not m:
            return None
        return _safe_eval(m.group(1))

    # (its reward, the number-usage check, is occ_exp.reward.rewards.uses_numbers)


def _safe_eval(expr: str) -> int | None:
    """Evaluate + - * / ( ) over non-negative integers without eval(); None if invalid or
    not an integer. Used for demonstrations and tests only (rewards go through math-verify)."""
    tokens = re.findall(r"\d+|[+\-*/()]", expr)
    if "".join(tokens) != expr.replace(" ", ""):
        return None
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def atom():
        nonlocal pos
        t = peek()
        if t is None:
            raise ValueError
        pos += 1
        if t == "(":
            v = add()
            if peek() != ")":
                raise ValueError
            pos += 1
            return v
        if t.isdigit():
            return Fraction(int(t))
        raise ValueError

    def mul():
        nonlocal pos
        v = atom()
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            r = atom()
            v = v * r if op == "*" else v / r
        return v

    def add():
        nonlocal pos
        v = mul()
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            r = mul()
            v = v + r if op == "+" else v - r
        return v

    try:
        v = add()
    except (ValueError, ZeroDivisionError):
        return None
    if pos != len(tokens) or v.denominator != 1:
        return None
    return int(v)
