"""math-verify inside a verifier worker process: parsing, caches, the soft CPU-time deadline.

Runs in a worker process's main thread only (it installs a ``SIGPROF`` handler).  Nothing here
is imported by the parent beyond the result flags; math-verify and sympy are imported when an
:class:`Engine` is built (in the worker, or in the forkserver that preloads this module).

**Soft deadline in CPU time.**  An item's soft limit is armed with
``setitimer(ITIMER_PROF, soft_s)``: it counts the worker's own CPU seconds (user + system),
not wall-clock seconds, so a loaded machine that gives the worker a third of a core does not
cut a check that an idle machine finishes.  When it fires, :class:`SoftTimeout` (a
BaseException, so ``except Exception`` in math-verify and sympy cannot swallow it) aborts the
item; math-verify's own ``signal.alarm`` timeouts are disabled so they cannot cancel ours.

**Warm-up.**  sympy and math-verify build regexes, grammar tables and import whole
sub-packages (polynomials, radicals, sets) lazily on first use: a fresh process's first
polynomial check costs ~0.45 s of CPU, ten times a warm one.  :meth:`Engine.warm_up` runs one
check of each kind before the worker reports ready, so that cost never lands inside an item's
deadline.
"""

from __future__ import annotations

import logging
import signal
from collections import OrderedDict
from typing import Any

__all__ = ["OK", "UNPARSED", "TIMEOUT", "GOLD_ERROR", "Engine", "SoftTimeout"]

# Result flags (sent back by workers with each score).
OK = 0
UNPARSED = 1
TIMEOUT = 2
GOLD_ERROR = 3

# One check of every kind that loads something lazily (see the module docstring).
_WARM_UP_PAIRS = (
    ("0.5", "\\frac{1}{2}"),
    ("(1,2]", "(1, 2]"),
    ("(3,4)", "(3, 4)"),
    ("x+1", "1+x"),
    ("(x+1)^2", "x^2+2x+1"),
    ("x^3-1", "(x-1)(x^2+x+1)"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{3}{4}\\pi", "\\frac{3\\pi}{4}"),
    ("\\sin^2 x+\\cos^2 x", "1"),
    ("6\\cdot 7", "42"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("x=3", "3"),
    ("50\\%", "50"),
)


class SoftTimeout(BaseException):
    """Raised by the worker's SIGPROF handler when an item used up its soft CPU budget."""


def _raise_soft_timeout(signum: int, frame: Any) -> None:
    raise SoftTimeout()


def _gold_text(gold: str) -> str:
    """Wrap a gold answer so that math-verify's LaTeX extraction finds it."""
    if "$" in gold or "\\boxed" in gold:
        return gold
    return f"${gold}$"


class Engine:
    """math-verify wrapper with LRU caches of parsed gold answers and of results."""

    def __init__(self, cache_size: int = 4096, gold_cache_size: int = 1024) -> None:
        import math_verify  # noqa: PLC0415 - heavy; imported in the worker (or forkserver) only
        from sympy import Basic, MatrixBase  # noqa: PLC0415 - same

        signal.signal(signal.SIGPROF, _raise_soft_timeout)
        # We disable math-verify's own alarms (they would cancel ours); silence the
        # one-time warning about it and per-item timeout/parse chatter.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

        self._mv = math_verify
        self._latex_only = [math_verify.LatexExtractionConfig()]
        self._default_cfg = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
        self._expr_types = (Basic, MatrixBase)
        self._cache: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._cache_size = cache_size
        self._gold: OrderedDict[str, list[Any]] = OrderedDict()
        self._gold_size = gold_cache_size

    def _has_expr(self, parsed: list[Any]) -> bool:
        return any(isinstance(x, self._expr_types) for x in parsed)

    def _parse_gold(self, gold: str) -> list[Any]:
        hit = self._gold.get(gold)
        if hit is not None:
            self._gold.move_to_end(gold)
            return hit
        parsed = self._mv.parse(_gold_text(gold), parsing_timeout=None)
        self._gold[gold] = parsed
        if len(self._gold) > self._gold_size:
            self._gold.popitem(last=False)
        return parsed

    def _parse_pred(self, pred: str) -> list[Any]:
        parsed = self._mv.parse(
            "\\boxed{" + pred + "}", extraction_config=self._latex_only, parsing_timeout=None
        )
        if not self._has_expr(parsed):
            # e.g. "50\%" fails the LaTeX grammar inside \boxed but math-verify's
            # default extractors read it from "$50\%$".
            again = self._mv.parse("$" + pred + "$", extraction_config=self._default_cfg, parsing_timeout=None)
            if self._has_expr(again):
                parsed = again
        return parsed

    def _verify(self, pred: str, gold: str) -> tuple[float, int]:
        try:
            gold_parsed = self._parse_gold(gold)
        except Exception:
            return 0.0, GOLD_ERROR
        if not gold_parsed:
            return 0.0, GOLD_ERROR
        try:
            pred_parsed = self._parse_pred(pred)
        except Exception:
            return 0.0, UNPARSED
        if not pred_parsed:
            return 0.0, UNPARSED
        try:
            ok = bool(self._mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))
        except Exception:
            ok = False
        if ok:
            return 1.0, OK
        return 0.0, (OK if self._has_expr(pred_parsed) else UNPARSED)

    def run(self, pred: str, gold: str, soft_s: float) -> tuple[float, int]:
        """Score one pair within ``soft_s`` CPU seconds (0: no limit); never raises
        (except for process-level signals).  A timed-out pair is not cached."""
        key = (pred, gold)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            if soft_s > 0:
                signal.setitimer(signal.ITIMER_PROF, soft_s)
            try:
                result = self._verify(pred, gold)
            finally:
                if soft_s > 0:
                    signal.setitimer(signal.ITIMER_PROF, 0)
        except SoftTimeout:
            return 0.0, TIMEOUT
        except Exception:  # anything the wrappers above did not catch
            result = (0.0, UNPARSED)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def warm_up(self) -> None:
        """Load what math-verify and sympy load lazily, before the worker serves (no deadline)."""
        for pred, gold in _WARM_UP_PAIRS:
            self.run(pred, gold, soft_s=0.0)
        self._cache.clear()
        self._gold.clear()
