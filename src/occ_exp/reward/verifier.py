"""Reward verifier for RL from verifiable rewards on math problems.

``score(responses, answers)`` turns model responses into 0/1 rewards by comparing
the final answer of each response with the gold answer using `math-verify`_.

Design
------
**Extraction (parent process).**  :func:`extract_answer` finds the content of the
*last* ``\\boxed{...}`` / ``\\fbox{...}`` by scanning backwards with ``str.rfind`` and
iterative brace matching (no recursion, no backtracking regex), falling back to the
last ``Answer:`` line.  Every scan is bounded by :data:`MAX_ANSWER_CHARS`, so a
megabyte of text or 10,000-deep braces costs milliseconds.  Only this short,
capped answer string ever leaves the parent; the full response never does.

**Fast path (parent process).**  :func:`fast_verdict` settles the trivially decidable
pairs without math-verify: identical strings after normalisation (outer whitespace
and ``$`` removed, whitespace runs collapsed) score 1.0; two plain decimal numerals
are compared exactly with :class:`decimal.Decimal` (equal -> 1.0) and two plain
integers below 10**12 that differ score 0.0.  Nothing else is decided here, so
the fast path is never more lenient or stricter than math-verify for the cases it
answers (``tests/test_verifier.py`` cross-checks this against math-verify).

**Process pool.**  math-verify protects itself with ``signal.alarm`` and refuses to
run in threads, and sympy can run for hours on inputs like ``9^{9^{9^{9}}}``,
possibly inside C code that no signal interrupts, so verification runs in worker *processes* started with the
``forkserver`` method (``spawn`` where forkserver is unavailable): the parent may
have torch and CUDA loaded, which must never be forked.  The forkserver preloads
``math_verify`` so a replacement worker is ready in a fraction of a second.  As with
any spawn/forkserver child, multiprocessing re-runs the parent's main module (as
``__mp_main__``) in each worker: entry points must keep their work under
``if __name__ == "__main__":``, and heavy top-level imports there (torch) add to
worker start-up time, which is asynchronous and bounded by ``startup_timeout_s``.

**Chunking.**  Unique (answer, gold) pairs are grouped into chunks; a chunk costs one
message to the worker, which streams back one small result message per item.
Those result messages double as progress reports: the parent knows which item of
the chunk is running and since when, without any extra round trip.  Identical pairs
inside one call are verified once and fanned out.

**Deadlines: soft, then kill-and-replace.**  Each item has a hard limit of
``timeout_s`` seconds.  Inside the worker a ``SIGALRM`` timer (``setitimer``) fires at
80 % of it and aborts Python-level work cheaply (math-verify's own alarms are
disabled so they cannot cancel ours).  If the worker is stuck in C code and misses
the soft deadline, the parent sends SIGTERM at the hard deadline, SIGKILL after a
short grace, starts a replacement, scores the stuck item 0.0 (counted as a
timeout) and puts the rest of its chunk back at the head of the queue, where the
next free worker (typically the replacement) picks it up.  A worker that dies
while verifying is handled the same way (its item counts as a crash).  Pairs that
timed out or crashed are remembered in a small parent-side "poison" LRU so that a
repeated pathological answer does not cost another timeout (the flip side: a pair
that timed out only because the machine was overloaded keeps scoring 0.0 while it
stays in that LRU).  Every wait in the parent has a deadline, including worker
start-up; workers also run under an address-space limit (their start-up size plus
``max_memory_mb``) so a runaway computation fails with ``MemoryError`` instead of
exhausting the machine's memory.

**Caches.**  Each worker keeps an LRU of parsed gold answers and an LRU of results
keyed by (answer, gold); work is sorted by gold before chunking so that the samples
of one prompt share a chunk and their gold is parsed once.

**Safety.**  Model text is never passed to ``eval``/``exec``/``sympify``.  Predictions
go through math-verify's LaTeX extractor (``\\boxed{answer}``) and, only when that
yields no expression, through math-verify's default extractors on ``$answer$``,
whose plain-expression branch only accepts digits, ``.`` and arithmetic operators.

.. _math-verify: https://github.com/huggingface/Math-Verify
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Sequence

__all__ = [
    "MAX_ANSWER_CHARS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_NUM_WORKERS",
    "VerifyResult",
    "Verifier",
    "extract_answer",
    "fast_verdict",
    "score",
]

logger = logging.getLogger(__name__)

#: Longest answer (in characters) that is extracted and sent to a worker.
MAX_ANSWER_CHARS = 512
#: Default hard per-item limit in seconds.
DEFAULT_TIMEOUT_S = 5.0
#: Default number of worker processes.
DEFAULT_NUM_WORKERS = 2

# Fraction of ``timeout_s`` after which the in-worker SIGALRM aborts an item.
_SOFT_FRACTION = 0.8
# At most this many \boxed candidates are examined per response.
_MAX_BOX_CANDIDATES = 256
# Whitespace allowed between ``\boxed`` and ``{``.
_MAX_MACRO_GAP = 8
# Integers below this magnitude are compared exactly by the fast path.
_FAST_INT_LIMIT = 10**12
_FAST_NUM_MAX_CHARS = 40

# Result flags sent back by workers.
_OK = 0
_UNPARSED = 1
_TIMEOUT = 2
_GOLD_ERROR = 3
_CRASH = 4  # parent-side only: the worker died while verifying the item

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


# --------------------------------------------------------------------------- #
# Worker process
# --------------------------------------------------------------------------- #


class _SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM handler.

    A BaseException so that ``except Exception`` blocks inside math-verify and
    sympy do not swallow it.
    """


def _raise_soft_timeout(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _gold_text(gold: str) -> str:
    """Wrap a gold answer so that math-verify's LaTeX extraction finds it."""
    if "$" in gold or "\\boxed" in gold:
        return gold
    return f"${gold}$"


class _Engine:
    """math-verify wrapper with LRU caches; lives in a worker process's main thread
    (it installs a SIGALRM handler for the soft per-item deadline)."""

    def __init__(self, cache_size: int = 4096, gold_cache_size: int = 1024) -> None:
        import math_verify  # noqa: PLC0415 - imported in the worker only
        from sympy import Basic, MatrixBase  # noqa: PLC0415

        signal.signal(signal.SIGALRM, _raise_soft_timeout)

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
            return 0.0, _GOLD_ERROR
        if not gold_parsed:
            return 0.0, _GOLD_ERROR
        try:
            pred_parsed = self._parse_pred(pred)
        except Exception:
            return 0.0, _UNPARSED
        if not pred_parsed:
            return 0.0, _UNPARSED
        try:
            ok = bool(self._mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))
        except Exception:
            ok = False
        if ok:
            return 1.0, _OK
        return 0.0, (_OK if self._has_expr(pred_parsed) else _UNPARSED)

    def run(self, pred: str, gold: str, soft_s: float) -> tuple[float, int]:
        """Score one pair; never raises (except for process-level signals)."""
        key = (pred, gold)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            if soft_s > 0:
                signal.setitimer(signal.ITIMER_REAL, soft_s)
            try:
                result = self._verify(pred, gold)
            finally:
                if soft_s > 0:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            return 0.0, _TIMEOUT
        except Exception:  # anything the wrappers above did not catch
            result = (0.0, _UNPARSED)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def warm_up(self) -> None:
        """Build math-verify's lazily compiled regexes and grammar before serving."""
        for pred, gold in (("0.5", "\\frac{1}{2}"), ("(1,2]", "(1, 2]"), ("x+1", "1+x")):
            self.run(pred, gold, soft_s=0.0)
        self._cache.clear()


def _current_address_space() -> int:
    """This process's virtual memory size in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_address_space(headroom_mb: int) -> None:
    """Cap the worker's address space at its current size plus ``headroom_mb``.

    Relative to the current size because multiprocessing re-imports the parent's
    main module in the worker, which may already have mapped gigabytes (torch/CUDA
    libraries); an absolute cap below that would make every allocation fail.
    """
    try:
        import resource  # noqa: PLC0415

        limit = _current_address_space() + headroom_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))
    except (ImportError, ValueError, OSError):
        pass


def _worker_main(
    conn: Connection,
    timeout_s: float,
    soft_timeout: bool,
    max_memory_mb: int | None,
    cache_size: int,
) -> None:
    """Worker loop: receive ``(chunk_id, [(idx, pred, gold), ...])``, stream back
    ``(chunk_id, idx, score, flag)`` per item; ``None`` or EOF ends the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    # ... and so is SIGTERM: a cluster pre-empting the job signals every process, and the parent
    # still needs its verifier to finish the step (the parent kills stuck workers with SIGKILL
    # after kill_grace_s; an orphaned worker exits on EOF).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if max_memory_mb:
        _limit_address_space(int(max_memory_mb))
    # We disable math-verify's own alarms (they would cancel ours); silence the
    # one-time warning about it and per-item timeout/parse chatter.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    engine = _Engine(cache_size=cache_size)
    engine.warm_up()
    soft_s = timeout_s * _SOFT_FRACTION if soft_timeout else 0.0
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            chunk_id, items = msg
            for idx, pred, gold in items:
                try:
                    score_, flag = engine.run(pred, gold, soft_s)
                except _SoftTimeout:  # fired in the gap around the guarded region
                    score_, flag = 0.0, _TIMEOUT
                conn.send((chunk_id, idx, score_, flag))
    except (BrokenPipeError, EOFError, OSError):
        return


# --------------------------------------------------------------------------- #
# Parent side: pool management
# --------------------------------------------------------------------------- #


@dataclass
class VerifyResult:
    """Outcome of :meth:`Verifier.score`.

    Attributes:
        scores: 1.0 (correct) or 0.0 per response, in input order.
        timeouts: responses whose verification hit the per-item limit (including
            repeats of a pair that timed out before).
        unparsed: responses with no extractable answer, or whose answer math-verify
            could not parse into an expression (and did not match as a string).
        seconds: wall-clock duration of the call.
        crashes: responses whose worker died unexpectedly while verifying them.
        fast_path: responses decided by :func:`fast_verdict` without math-verify.
        gold_errors: responses whose gold answer math-verify could not parse.
    """

    scores: list[float]
    timeouts: int = 0
    unparsed: int = 0
    seconds: float = 0.0
    crashes: int = 0
    fast_path: int = 0
    gold_errors: int = 0


_STARTING, _IDLE, _BUSY, _DEAD = "starting", "idle", "busy", "dead"


@dataclass
class _Worker:
    slot: int
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    state: str = _STARTING
    deadline: float = math.inf
    chunk_id: int = -1
    items: list[tuple[int, str, str]] = field(default_factory=list)
    pos: int = 0
    pid: int | None = None


@dataclass
class _Batch:
    """Bookkeeping for one :meth:`Verifier.score` call."""

    scores: list[float]
    fanout: dict[int, list[int]]  # representative index -> all indices with that pair
    pairs: dict[int, tuple[str, str]]
    remaining: int
    timeouts: int = 0
    unparsed: int = 0
    crashes: int = 0
    gold_errors: int = 0


def _check_inputs(responses: Sequence[str], answers: Sequence[str]) -> tuple[list[str], list[str]]:
    for name, seq in (("responses", responses), ("answers", answers)):
        if isinstance(seq, (str, bytes)):
            raise TypeError(f"{name} must be a sequence of str, not a single {type(seq).__name__}")
        if not hasattr(seq, "__len__") or not hasattr(seq, "__iter__"):
            raise TypeError(f"{name} must be a sequence of str, got {type(seq).__name__}")
    if len(responses) != len(answers):
        raise ValueError(
            f"responses and answers must have the same length, "
            f"got len(responses)={len(responses)} and len(answers)={len(answers)}"
        )
    resp, ans = list(responses), list(answers)
    for i, r in enumerate(resp):
        if not isinstance(r, str):
            raise TypeError(f"responses[{i}] must be str, got {type(r).__name__}")
    for i, a in enumerate(ans):
        if not isinstance(a, str):
            raise TypeError(f"answers[{i}] must be str, got {type(a).__name__}")
    return resp, ans


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class Verifier:
    """A pool of math-verify worker processes with hard per-item deadlines.

    Args:
        num_workers: number of worker processes.
        timeout_s: hard per-item limit in seconds (soft in-worker abort at 80 %).
        chunk_size: items per chunk; default: spread the work over about four
            chunks per worker, capped at ``max_chunk_size``.
        max_chunk_size: upper bound for the automatic chunk size.
        soft_timeout: use the in-worker SIGALRM abort; with False every timeout is a
            kill-and-replace (useful for testing that path).
        fast_path: decide trivial pairs in the parent (see :func:`fast_verdict`).
        max_memory_mb: address-space headroom per worker, on top of its size once
            started (RLIMIT_AS; None: unlimited).  A runaway computation then fails
            with MemoryError (score 0.0) instead of exhausting the machine.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
            ``"fork"`` is refused: the parent may hold torch/CUDA state.
        startup_timeout_s: deadline for a new worker to become ready.
        kill_grace_s: time between SIGTERM and SIGKILL for a stuck worker.
        poison_cache_size: number of timed-out pairs remembered in the parent.
        worker_cache_size: size of each worker's (answer, gold) result LRU.

    Use as a context manager or call :meth:`close`.  Not fork-safe; calls to
    :meth:`score` from several threads are serialised.
    """

    def __init__(
        self,
        num_workers: int = DEFAULT_NUM_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        chunk_size: int | None = None,
        max_chunk_size: int = 64,
        soft_timeout: bool = True,
        fast_path: bool = True,
        max_memory_mb: int | None = 2048,
        start_method: str | None = None,
        startup_timeout_s: float = 60.0,
        kill_grace_s: float = 0.2,
        poison_cache_size: int = 1024,
        worker_cache_size: int = 4096,
    ) -> None:
        if int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        method = start_method or _default_start_method()
        if method == "fork":
            raise ValueError("start_method='fork' is unsafe here (torch/CUDA in the parent); use forkserver or spawn")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self.max_chunk_size = max(1, int(max_chunk_size))
        self.soft_timeout = bool(soft_timeout)
        self.fast_path = bool(fast_path)
        self.max_memory_mb = max_memory_mb
        self.start_method = method
        self.startup_timeout_s = float(startup_timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.worker_cache_size = int(worker_cache_size)
        self._poison: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._poison_size = int(poison_cache_size)
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            # Only takes effect if this process has not started its forkserver yet
            # (the forkserver is per process and shared).  math_verify and this module
            # are preloaded so that a replacement worker forks ready to serve.
            self._ctx.set_forkserver_preload(["math_verify", __name__])
        self._lock = threading.Lock()
        self._closed = False
        self._chunk_counter = 0
        self._start_failures = 0
        #: Lifetime counters (kills = stuck workers replaced, restarts = all replacements).
        self.kills = 0
        self.restarts = 0
        #: PIDs of every worker this Verifier started (for monitoring and tests).
        self.spawned_pids: list[int] = []
        self._workers: list[_Worker] = []
        # Close at interpreter exit, before multiprocessing's own exit handler (atexit runs in
        # reverse order of registration): that handler SIGTERMs and joins daemonic children, and
        # workers ignore SIGTERM.
        atexit.register(_close_if_alive, weakref.ref(self))
        try:
            for slot in range(self.num_workers):
                self._workers.append(self._spawn(slot))
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------- #

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def close(self) -> None:
        """Stop all workers: idle ones are asked to exit, the rest (and any that do not
        exit within a second) get SIGTERM, then SIGKILL.  Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        workers = [w for w in self._workers if w.state != _DEAD]
        self._workers = []
        polite = []
        for w in workers:
            if w.state == _IDLE:
                try:
                    w.conn.send(None)
                    polite.append(w)
                    continue
                except (OSError, ValueError):
                    pass
            self._kill(w)
        deadline = time.monotonic() + 1.0
        for w in polite:
            try:
                w.proc.join(max(0.0, deadline - time.monotonic()))
            except ValueError:  # process object already closed
                pass
            self._kill(w)

    # -- process helpers ------------------------------------------------------ #

    def _spawn(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.timeout_s, self.soft_timeout, self.max_memory_mb, self.worker_cache_size),
            name=f"occ-verifier-{slot}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_conn.close()
        if proc.pid is not None:
            self.spawned_pids.append(proc.pid)
        return _Worker(
            slot=slot,
            proc=proc,
            conn=parent_conn,
            state=_STARTING,
            deadline=time.monotonic() + self.startup_timeout_s,
            pid=proc.pid,
        )

    def _kill(self, w: _Worker) -> None:
        """SIGTERM, wait ``kill_grace_s``, SIGKILL, wait (bounded) and release."""
        w.state = _DEAD
        proc = w.proc
        try:
            if proc.is_alive():
                proc.terminate()
                proc.join(self.kill_grace_s)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2.0)
            if not proc.is_alive():
                proc.close()
        except (OSError, ValueError):
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    def _replace(self, w: _Worker, *, startup_failure: bool = False) -> None:
        self._kill(w)
        self.restarts += 1
        if startup_failure:
            self._start_failures += 1
            if self._start_failures > 3 * self.num_workers:
                raise RuntimeError(
                    f"verifier workers failed to start {self._start_failures} times in a row "
                    f"(start_method={self.start_method!r}, startup_timeout_s={self.startup_timeout_s})"
                )
        if not self._closed:
            self._workers[w.slot] = self._spawn(w.slot)

    def _poison_add(self, key: tuple[str, str]) -> None:
        self._poison[key] = None
        self._poison.move_to_end(key)
        if len(self._poison) > self._poison_size:
            self._poison.popitem(last=False)

    # -- scoring ------------------------------------------------------------- #

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        """Score each response against its gold answer (1.0 correct, else 0.0).

        Raises:
            ValueError: if the two sequences differ in length.
            TypeError: if an item is not a str (the message names the index).
            RuntimeError: if the verifier is closed or workers cannot be started.
        """
        resp, golds = _check_inputs(responses, answers)
        with self._lock:
            if self._closed:
                raise RuntimeError("Verifier is closed")
            t0 = time.monotonic()
            n = len(resp)
            batch = _Batch(scores=[0.0] * n, fanout={}, pairs={}, remaining=0)
            fast = 0
            first_of: dict[tuple[str, str], int] = {}
            work: list[tuple[int, str, str]] = []
            for i, (text, gold) in enumerate(zip(resp, golds)):
                ans = extract_answer(text)
                if ans is None:
                    batch.unparsed += 1
                    continue
                if self.fast_path:
                    verdict = fast_verdict(ans, gold)
                    if verdict is not None:
                        batch.scores[i] = verdict
                        fast += 1
                        continue
                key = (ans, gold)
                if key in self._poison:
                    self._poison.move_to_end(key)
                    batch.timeouts += 1
                    continue
                rep = first_of.get(key)
                if rep is not None:
                    batch.fanout[rep].append(i)
                    continue
                first_of[key] = i
                batch.fanout[i] = [i]
                batch.pairs[i] = key
                work.append((i, ans, gold))
            if work:
                self._run(work, batch)
            return VerifyResult(
                scores=batch.scores,
                timeouts=batch.timeouts,
                unparsed=batch.unparsed,
                seconds=time.monotonic() - t0,
                crashes=batch.crashes,
                fast_path=fast,
                gold_errors=batch.gold_errors,
            )

    def _chunks(self, work: list[tuple[int, str, str]]) -> deque[list[tuple[int, str, str]]]:
        # Items sharing a gold answer (the samples of one prompt) go to the same chunk,
        # so the worker parses that gold once.  Order is restored through the indices.
        work = sorted(work, key=lambda item: item[2])
        size = self.chunk_size or min(
            self.max_chunk_size, max(1, math.ceil(len(work) / (4 * self.num_workers)))
        )
        return deque(work[k : k + size] for k in range(0, len(work), size))

    def _record(self, batch: _Batch, rep: int, value: float, flag: int) -> None:
        idxs = batch.fanout[rep]
        for i in idxs:
            batch.scores[i] = value
        k = len(idxs)
        if flag == _TIMEOUT:
            batch.timeouts += k
            self._poison_add(batch.pairs[rep])
        elif flag == _CRASH:
            batch.crashes += k
            self._poison_add(batch.pairs[rep])  # do not feed it to the next worker again
        elif flag == _UNPARSED:
            batch.unparsed += k
        elif flag == _GOLD_ERROR:
            batch.gold_errors += k
        batch.remaining -= 1

    def _run(self, work: list[tuple[int, str, str]], batch: _Batch) -> None:
        pending = self._chunks(work)
        batch.remaining = len(work)
        try:
            for w in list(self._workers):
                if w.state == _DEAD:  # left behind by an earlier start-up failure
                    self._workers[w.slot] = self._spawn(w.slot)
                elif w.state != _STARTING and not w.proc.is_alive():
                    self._replace(w)
            while batch.remaining > 0:
                now = time.monotonic()
                for w in list(self._workers):
                    if w.state == _IDLE and pending:
                        self._dispatch(w, pending.popleft(), pending, now)
                active = [w for w in self._workers if w.state in (_STARTING, _BUSY)]
                if not active:  # pragma: no cover - defensive: nothing can make progress
                    raise RuntimeError("verifier has no live workers")
                wait_s = max(0.0, min(w.deadline for w in active) - time.monotonic())
                by_handle: dict[Any, _Worker] = {}
                for w in active:
                    by_handle[w.conn] = w
                    by_handle[w.proc.sentinel] = w
                ready = _mp_wait(list(by_handle), timeout=min(wait_s, 5.0))
                seen: set[int] = set()
                for handle in ready:
                    w = by_handle[handle]
                    if id(w) in seen:
                        continue
                    seen.add(id(w))
                    self._drain(w, batch, pending)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.state in (_STARTING, _BUSY) and now >= w.deadline:
                        self._on_deadline(w, batch, pending)
        finally:
            # Interrupted (exception / KeyboardInterrupt): workers still holding work
            # from this call would send stale results later; replace them.
            if not self._closed:
                for w in list(self._workers):
                    if w.state == _BUSY:
                        self._replace(w)

    def _dispatch(
        self, w: _Worker, chunk: list[tuple[int, str, str]], pending: deque[list[tuple[int, str, str]]], now: float
    ) -> None:
        self._chunk_counter += 1
        try:
            w.conn.send((self._chunk_counter, chunk))
        except (OSError, ValueError):
            pending.appendleft(chunk)  # worker vanished before starting: nothing to blame
            self._replace(w)
            return
        w.state = _BUSY
        w.chunk_id = self._chunk_counter
        w.items = chunk
        w.pos = 0
        w.deadline = now + self.timeout_s

    def _drain(self, w: _Worker, batch: _Batch, pending: deque[list[tuple[int, str, str]]]) -> None:
        """Read every message available from ``w``; handle its death if it died."""
        while w.state in (_STARTING, _BUSY):
            try:
                if not w.conn.poll():
                    if not w.proc.is_alive():
                        raise EOFError
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._on_crash(w, batch, pending)
                return
            if w.state == _STARTING:
                if isinstance(msg, tuple) and msg and msg[0] == "ready":
                    w.state = _IDLE
                    w.deadline = math.inf
                    self._start_failures = 0
                continue
            chunk_id, idx, value, flag = msg
            if chunk_id != w.chunk_id or w.pos >= len(w.items) or w.items[w.pos][0] != idx:
                continue  # stale or unexpected message: ignore
            self._record(batch, idx, float(value), int(flag))
            w.pos += 1
            if w.pos >= len(w.items):
                w.state = _IDLE
                w.deadline = math.inf
                w.items = []
            else:
                w.deadline = time.monotonic() + self.timeout_s

    def _fail_current(self, w: _Worker, batch: _Batch, pending: deque[list[tuple[int, str, str]]], flag: int) -> None:
        """Score the item ``w`` is stuck on as 0.0 and re-queue the rest of its chunk."""
        idx = w.items[w.pos][0]
        rest = w.items[w.pos + 1 :]
        self._record(batch, idx, 0.0, flag)
        if rest:
            pending.appendleft(rest)
        w.items = []

    def _on_deadline(self, w: _Worker, batch: _Batch, pending: deque[list[tuple[int, str, str]]]) -> None:
        if w.state == _STARTING:
            logger.warning("verifier worker %s did not start within %.1fs; restarting", w.pid, self.startup_timeout_s)
            self._replace(w, startup_failure=True)
            return
        self.kills += 1
        self._fail_current(w, batch, pending, _TIMEOUT)
        self._replace(w)

    def _on_crash(self, w: _Worker, batch: _Batch, pending: deque[list[tuple[int, str, str]]]) -> None:
        if w.state == _STARTING:
            logger.warning("verifier worker %s died during start-up; restarting", w.pid)
            self._replace(w, startup_failure=True)
            return
        if w.state == _BUSY and w.pos < len(w.items):
            logger.warning("verifier worker %s died while verifying an item; restarting", w.pid)
            self._fail_current(w, batch, pending, _CRASH)
        self._replace(w)


# --------------------------------------------------------------------------- #
# Module-level convenience API
# --------------------------------------------------------------------------- #

_default_verifier: Verifier | None = None
_default_lock = threading.Lock()


def score(responses: Sequence[str], answers: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[float]:
    """Score responses with a lazily created module-level :class:`Verifier`.

    The default verifier is re-created when ``timeout_s`` changes or after it was
    closed, and is closed at interpreter exit.
    """
    resp, golds = _check_inputs(responses, answers)
    global _default_verifier
    with _default_lock:
        v = _default_verifier
        if v is None or v.closed or v.timeout_s != float(timeout_s):
            if v is not None:
                v.close()
            v = _default_verifier = Verifier(timeout_s=timeout_s)
        return v.score(resp, golds).scores


def _close_if_alive(ref: weakref.ref) -> None:
    v = ref()
    if v is not None:
        v.close()


def _close_default() -> None:
    global _default_verifier
    v, _default_verifier = _default_verifier, None
    if v is not None:
        v.close()


atexit.register(_close_default)

