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

import re
from decimal import Decimal, InvalidOperation

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
    """Decide ``pred`` vs ``gold`` without math-verify when that is safe.

    Returns 1.0 / 0.0 only where math-verify is known to agree, otherwise None:

    * identical after normalisation (outer whitespace and ``$`` stripped, runs of
      whitespace collapsed) -> 1.0;
    * both plain decimal numerals (``-?digits[.digits]``, at most 40 chars) that are
      exactly equal as decimals (``3`` vs ``3.0``, ``.5`` vs ``0.50``) -> 1.0;
    * both plain integers with ``|x| < 10**12`` that differ -> 0.0.

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

