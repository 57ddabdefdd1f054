"""Answer extraction and the parent-side fast path of the reward verifier.

:func:`extract_answer` finds the content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` by
scanning backwards with ``str.rfind`` and iterative brace matching (no recursion, no
backtracking regex), falling back to the last ``Answer:`` line.  Every scan is bounded by
:data:`MAX_ANSWER_CHARS`, so a megabyte of text or 10,000-deep braces costs milliseconds.
Only this short, capped answer string ever leaves the parent; the full response never does.

:func:`fast_verdict` settles the pairs that are decidable without math-verify, and only
where math-verify is known to give the same verdict (``tests/test_verifier.py`` cross-checks
it against math-verify); everything else returns None and goes to the worker pool.
"""

from __future__ import annotations

import operator
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = ["MAX_ANSWER_CHARS", "extract_answer", "fast_verdict"]

#: Longest answer (in characters) that is extracted and sent to a worker.
MAX_ANSWER_CHARS = 512

# At most this many \boxed candidates are examined per response.
_MAX_BOX_CANDIDATES = 256
# Whitespace allowed between ``\boxed`` and ``{``.
_MAX_MACRO_GAP = 8
# Integers below this magnitude are compared exactly by the fast path.
_FAST_INT_LIMIT = 10**12
_FAST_NUM_MAX_CHARS = 40

# --------------------------------------------------------------------------- #
# Answer extraction (parent side, pure Python, bounded work)
# --------------------------------------------------------------------------- #

_BOX_MACROS = ("\\boxed", "\\fbox")
_GROUP_OK, _GROUP_TOO_LONG, _GROUP_UNBALANCED = 0, 1, 2

# Line that starts (after optional blanks / markdown) with "Answer:" or "Final answer:".
# Written so that no two adjacent sub-patterns can match the same characters:
# matching is linear in the line length (no catastrophic backtracking).
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_-]*(?:final[ \t]+)?answer[ \t]*(?:(?:\*\*|__)[ \t]*)?:([^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)


def _scan_group(text: str, brace: int) -> tuple[int, int]:
    """Match the ``{`` at ``text[brace]`` iteratively, looking at most
    ``MAX_ANSWER_CHARS + 1`` characters ahead.

    Returns ``(_GROUP_OK, index_of_closing_brace)``, ``(_GROUP_TOO_LONG, -1)`` when the
    content would exceed the cap, or ``(_GROUP_UNBALANCED, -1)`` when the text ends
    first.  Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped.
    """
    n = len(text)
    stop = min(n, brace + MAX_ANSWER_CHARS + 2)
    depth = 0
    i = brace
    while i < stop:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return _GROUP_OK, i
        i += 1
    return (_GROUP_TOO_LONG if stop < n else _GROUP_UNBALANCED), -1


def _extract_boxed(text: str) -> tuple[bool, str | None]:
    """Return ``(found_candidate, content)`` for the last balanced boxed group.

    ``found_candidate`` is True when scanning should stop (an answer was found or the
    last candidate is over the cap); False means "no usable boxed answer".
    """
    ends = {m: len(text) for m in _BOX_MACROS}
    pos = {m: text.rfind(m) for m in _BOX_MACROS}
    for _ in range(_MAX_BOX_CANDIDATES):
        macro = max(_BOX_MACROS, key=lambda m: pos[m])
        start = pos[macro]
        if start < 0:
            return False, None
        # Consume this candidate; only its macro needs a new rfind.
        ends[macro] = start
        pos[macro] = text.rfind(macro, 0, start) if start > 0 else -1

        j = start + len(macro)
        gap_end = min(len(text), j + _MAX_MACRO_GAP)
        while j < gap_end and text[j] in " \t":
            j += 1
        if j >= len(text) or text[j] != "{":
            continue  # e.g. "\boxedtext" or "\boxed 5": not a braced group
        status, close = _scan_group(text, j)
        if status == _GROUP_TOO_LONG:
            return True, None
        if status == _GROUP_UNBALANCED:
            continue  # truncated output: fall back to an earlier box
        content = text[j + 1 : close].strip()
        if content:
            return True, content
    return False, None


def _clean_answer_line(s: str) -> str:
    s = s.strip().strip("*_").strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    elif s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    elif s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2].strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a model response.

    Returns the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` with balanced
    braces; failing that, the rest of the last line starting with ``Answer:``
    (case-insensitive, optionally preceded by markdown such as ``**`` or ``#``, or by
    ``Final``), stripped of a trailing period and of surrounding ``$``.  Returns None
    if nothing is found or the answer is longer than :data:`MAX_ANSWER_CHARS`.

    All work is bounded: a 1 MB response or 10,000-deep braces take milliseconds.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects str, got {type(text).__name__}")
    stop, boxed = _extract_boxed(text)
    if stop:
        return boxed
    last: re.Match[str] | None = None
    for last in _ANSWER_LINE_RE.finditer(text):
        pass
    if last is None:
        return None
    raw = last.group(1)
    if len(raw) > 4 * MAX_ANSWER_CHARS:
        return None
    ans = _clean_answer_line(raw)
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans


# --------------------------------------------------------------------------- #
# Fast path (parent side)
# --------------------------------------------------------------------------- #

_PLAIN_NUMBER_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def _normalise(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    return " ".join(s.split())


def fast_verdict(pred: str, gold: str) -> float | None:
    r"""Decide ``pred`` vs ``gold`` without math-verify when that is safe.

    Returns 1.0 / 0.0 only where math-verify is known to agree, otherwise None:

    * identical after normalisation (outer whitespace and ``$`` stripped, runs of
      whitespace collapsed) -> 1.0;
    * both plain decimal numerals (``-?digits[.digits]``, at most 40 chars) that are
      exactly equal as decimals (``3`` vs ``3.0``, ``.5`` vs ``0.50``) -> 1.0;
    * both plain integers with ``|x| < 10**12`` that differ -> 0.0;
    * both exact closed forms (see :func:`exact_value`: products and one quotient of
      integers, ``\frac``, ``\sqrt{n}`` and ``\pi``, or tuples of integers; or, see
      :func:`arithmetic_value`, integer arithmetic with ``+ - * /`` and parentheses, the
      countdown task's answers) -> equal values 1.0, different values 0.0; a lone decimal
      against a rational: exactly equal 1.0, more than 1e-5 apart 0.0 (math-verify rounds
      floats to 6 places: nearer is left to it).

    Different decimals are *not* decided here: math-verify rounds floats (6 places),
    so ``0.3333333`` may equal ``1/3`` there.
    """
    p, g = _normalise(pred), _normalise(gold)
    if not p or not g or "$" in p or "$" in g:
        return None
    if p == g:
        return 1.0
    if (
        len(p) <= _FAST_NUM_MAX_CHARS
        and len(g) <= _FAST_NUM_MAX_CHARS
        and _PLAIN_NUMBER_RE.match(p)
        and _PLAIN_NUMBER_RE.match(g)
    ):
        try:
            dp, dg = Decimal(p), Decimal(g)
        except InvalidOperation:  # pragma: no cover - the regex admits valid numerals only
            return None
        if dp == dg:
            return 1.0
        if "." not in p and "." not in g and abs(dp) < _FAST_INT_LIMIT and abs(dg) < _FAST_INT_LIMIT:
            return 0.0
        return None
    vp, vg = _value(p), _value(g)
    if vp is None or vg is None:
        return None
    if isinstance(vp, tuple) or isinstance(vg, tuple):
        if not (isinstance(vp, tuple) and isinstance(vg, tuple)):
            return None
        return 1.0 if vp == vg else 0.0
    if vp.decimal or vg.decimal:
        if not (vp.rational and vg.rational):
            return None
        if vp.coef == vg.coef:
            return 1.0
        return 0.0 if abs(vp.coef - vg.coef) > _FAST_FLOAT_GAP else None
    return 1.0 if vp.key() == vg.key() else 0.0


# --------------------------------------------------------------------------- #
# Exact closed forms: c * sqrt(d) * pi^k with c rational, d square-free
# --------------------------------------------------------------------------- #

_FAST_FLOAT_GAP = Fraction(1, 10**5)
_MAX_FORM_CHARS = 64
_MAX_INT_DIGITS = 12
_MAX_RADICAND = 10**8
# Tokens of the closed forms; anything else (letters, other macros, +, ^, !, ...) -> not decided.
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]+)?)|(?P<macro>\\(?:[dt]?frac|sqrt|pi|cdot|times))|(?P<sym>[-*/(){},]))"
)
# Two numerals separated only by blanks or a comma inside a number ("1 000", "1,000") read
# differently in math-verify (1*0, 1000): never decided here.
_AMBIGUOUS_NUMERALS_RE = re.compile(r"[0-9]\s+[0-9]|[0-9],[0-9]{3}(?![0-9])")


class _Form:
    """An exact value ``coef * sqrt(rad) * pi**pi_pow`` (``rad`` square-free)."""

    __slots__ = ("coef", "rad", "pi_pow", "decimal")

    def __init__(self, coef: Fraction, rad: int = 1, pi_pow: int = 0, decimal: bool = False) -> None:
        self.coef, self.rad, self.pi_pow, self.decimal = coef, rad, pi_pow, decimal

    @property
    def rational(self) -> bool:
        return self.rad == 1 and self.pi_pow == 0

    def key(self) -> tuple[Fraction, int, int]:
        return (Fraction(0), 1, 0) if self.coef == 0 else (self.coef, self.rad, self.pi_pow)

    def times(self, other: _Form) -> _Form:
        sq, rad = _split_square(self.rad * other.rad)
        return _Form(self.coef * other.coef * sq, rad, self.pi_pow + other.pi_pow, self.decimal or other.decimal)

    def over(self, other: _Form) -> _Form | None:
        if other.coef == 0:
            return None
        # sqrt(a)/sqrt(b) = sqrt(a*b)/b
        sq, rad = _split_square(self.rad * other.rad)
        return _Form(self.coef * sq / (other.coef * other.rad), rad, self.pi_pow - other.pi_pow,
                     self.decimal or other.decimal)


def _split_square(n: int) -> tuple[int, int]:
    """``n = s*s*r`` with ``r`` square-free: returns ``(s, r)``."""
    s, r, f = 1, 1, 2
    while f * f <= n:
        while n % (f * f) == 0:
            n //= f * f
            s *= f
        if n % f == 0:
            n //= f
            r *= f
        f += 1
    return s, r * n


class _Parser:
    """Recursive descent over the tokens of one closed form; None for anything else."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks, self.i = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, text: str) -> bool:
        t = self.peek()
        if t is not None and t[1] == text:
            self.i += 1
            return True
        return False

    def product(self) -> _Form | None:
        r"""factor ((\cdot | \times | * | implicit before a macro) factor)* [/ factor]"""
        value = self.factor()
        while value is not None:
            t = self.peek()
            if t is None:
                return value
            if t[1] in ("\\cdot", "\\times", "*"):
                self.i += 1
            elif not (t[0] == "macro" and t[1] in ("\\sqrt", "\\pi", "\\frac", "\\dfrac", "\\tfrac")):
                break  # "(3)(4)" is not 12 for math-verify: juxtaposed groups are left to it
            nxt = self.factor()
            value = None if nxt is None or nxt.decimal or value.decimal else value.times(nxt)
        if value is not None and self.take("/"):
            den = self.factor()
            value = None if den is None or den.decimal or value.decimal else value.over(den)
        return value

    def braced(self) -> _Form | None:
        if not self.take("{"):
            return None
        value = self.product()
        return value if self.take("}") else None

    def factor(self) -> _Form | None:
        t = self.peek()
        if t is None:
            return None
        self.i += 1
        kind, text = t
        if kind == "num":
            digits = text.replace(".", "").lstrip("0")
            if len(digits) > _MAX_INT_DIGITS:
                return None
            if "." in text:
                return _Form(Fraction(Decimal(text)), decimal=True)
            return _Form(Fraction(int(text)))
        if text == "\\pi":
            return _Form(Fraction(1), pi_pow=1)
        if text == "\\sqrt":
            inner = self.braced()
            if inner is None or not inner.rational or inner.decimal or inner.coef.denominator != 1:
                return None
            n = int(inner.coef)
            if n < 0 or n > _MAX_RADICAND:
                return None
            sq, rad = _split_square(n)
            return _Form(Fraction(sq), rad)
        if text in ("\\frac", "\\dfrac", "\\tfrac"):
            num, den = self.braced(), self.braced()
            if num is None or den is None or num.decimal or den.decimal:
                return None
            return num.over(den)
        if text == "(":
            inner = self.product()
            return inner if self.take(")") else None
        return None


def _tokens(s: str, pattern: re.Pattern) -> list[tuple[str, str]] | None:
    """``s`` as (group name, text) tokens of ``pattern``; None if anything is left unmatched, or
    ``s`` is too long or has numerals math-verify reads differently (``1 000``, ``1,000``)."""
    if len(s) > _MAX_FORM_CHARS or _AMBIGUOUS_NUMERALS_RE.search(s):
        return None
    tokens: list[tuple[str, str]] = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = pattern.match(s, pos)
        if m is None or m.end() == pos:
            return None
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def exact_value(s: str) -> _Form | tuple[int, ...] | None:
    r"""The exact value of a closed form, or None if ``s`` is anything else.

    Accepted: an optional leading ``-`` and a product of integers, one decimal (alone),
    ``\frac{..}{..}`` (``\dfrac``, ``\tfrac``), ``\sqrt{integer}``, ``\pi`` and parenthesised
    groups, joined by ``\cdot``, ``\times``, ``*`` or juxtaposition before a macro,
    with at most one trailing ``/ factor``; or a parenthesised tuple of two or more integers.
    """
    tokens = _tokens(s, _TOKEN_RE)
    if tokens is None:
        return None
    if tokens and tokens[0][1] == "(" and any(t[1] == "," for t in tokens):
        return _int_tuple(tokens)
    if any(t[1] == "," for t in tokens):
        return None
    negative = bool(tokens) and tokens[0][1] == "-"
    parser = _Parser(tokens[1:] if negative else tokens)
    value = parser.product()
    if value is None or parser.i != len(parser.toks):
        return None
    if negative:
        value.coef = -value.coef
    return value


def _value(s: str) -> _Form | tuple[int, ...] | None:
    """The exact value of ``s`` as integer arithmetic or, failing that, as a closed form."""
    q = arithmetic_value(s)
    return _Form(q) if q is not None else exact_value(s)


# Integer arithmetic: numerals without leading zeros, + - * /, parentheses, blanks between tokens
_ARITH_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_ARITH_TOKEN_RE = re.compile(r"\s*(?:(?P<num>0|[1-9][0-9]*)(?![0-9])|(?P<sym>[-+*/()]))")


def arithmetic_value(s: str) -> Fraction | None:
    """The exact value of integer arithmetic, or None if ``s`` is anything else.

    Grammar (the usual precedence, left to right): ``expr = term (('+' | '-') term)*``,
    ``term = atom (('*' | '/') atom)*``, ``atom = '-' atom | integer | '(' expr ')'``; integers
    of at most 12 digits without leading zeros, at most 64 characters in all. ``/`` is exact
    division. Left to math-verify (None): juxtaposition (``2(3+4)``), division by zero,
    decimals, blanks between digits. math-verify reads the rest the same way
    (tests/test_verifier_fastpath.py checks random countdown answers against it).
    """
    tokens = _tokens(s, _ARITH_TOKEN_RE)
    if not tokens:
        return None
    parser = _ArithParser(tokens)
    value = parser.expr()
    return value if value is not None and parser.i == len(tokens) else None


class _ArithParser(_Parser):
    """Recursive descent over the tokens of integer arithmetic (see :func:`arithmetic_value`)."""

    def chain(self, operand, ops: tuple[str, ...]) -> Fraction | None:
        """operand (op operand)*, left to right; None on anything else or a division by zero."""
        value = operand()
        while value is not None and (t := self.peek()) is not None and t[1] in ops:
            self.i += 1
            rhs = operand()
            if rhs is None or (t[1] == "/" and rhs == 0):
                return None
            value = _ARITH_OPS[t[1]](value, rhs)
        return value

    def expr(self) -> Fraction | None:
        return self.chain(self.term, ("+", "-"))

    def term(self) -> Fraction | None:
        return self.chain(self.atom, ("*", "/"))

    def atom(self) -> Fraction | None:
        if self.take("-"):  # a sign, also after an operator (3*-2): -(a*b) = (-a)*b, so it binds where it likes
            value = self.atom()
            return None if value is None else -value
        if self.take("("):
            value = self.expr()
            return value if value is not None and self.take(")") else None
        t = self.peek()
        if t is None or t[0] != "num" or len(t[1]) > _MAX_INT_DIGITS:
            return None
        self.i += 1
        return Fraction(int(t[1]))


def _int_tuple(tokens: list[tuple[str, str]]) -> tuple[int, ...] | None:
    """``( [-]int , [-]int , ... )`` -> the integers; None for anything else."""
    if tokens[-1][1] != ")":
        return None
    out: list[int] = []
    body, k = tokens[1:-1], 0
    while k < len(body):
        sign = 1
        if body[k][1] == "-":
            sign, k = -1, k + 1
        if k >= len(body) or body[k][0] != "num" or "." in body[k][1] or len(body[k][1]) > _MAX_INT_DIGITS:
            return None
        out.append(sign * int(body[k][1]))
        k += 1
        if k < len(body):
            if body[k][1] != ",":
                return None
            k += 1
            if k == len(body):
                return None
    return tuple(out) if len(out) >= 2 else None
