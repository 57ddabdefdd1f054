"""Reward verifier for RL from verifiable rewards on math problems.

``Verifier.score(responses, answers)`` turns model responses into 0/1 rewards by comparing the
final answer of each response with the gold answer using `math-verify`_.  It composes three
parts, each in its own module:

* :mod:`occ_exp.reward.extract` (parent process): :func:`extract_answer` takes the last
  ``\\boxed{}`` (or ``Answer:`` line) with bounded work, and :func:`fast_verdict` settles the
  pairs decidable without math-verify, never disagreeing with it;
* :mod:`occ_exp.reward.pool`: worker processes running :mod:`occ_exp.reward.engine`
  (math-verify with caches) under per-item deadlines measured in the worker's CPU time, each
  timed-out item retried once before it counts as a timeout;
* this module: identical pairs within one call are verified once and fanned out, and pairs that
  still timed out (or crashed a worker) are remembered in a small parent-side "poison" LRU, so a
  repeated pathological answer does not cost another timeout.  Because deadlines count CPU
  seconds, a pair lands there only because of what it costs, not because the machine was busy.

**Safety.**  Model text is never passed to ``eval``/``exec``/``sympify``.  Predictions go
through math-verify's LaTeX extractor (``\\boxed{answer}``) and, only when that yields no
expression, through math-verify's default extractors on ``$answer$``, whose plain-expression
branch only accepts digits, ``.`` and arithmetic operators.

.. _math-verify: https://github.com/huggingface/Math-Verify
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from occ_exp.reward.engine import GOLD_ERROR, TIMEOUT, UNPARSED
from occ_exp.reward.extract import MAX_ANSWER_CHARS, extract_answer, fast_verdict
from occ_exp.reward.pool import CRASH, Item, WorkerPool

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

#: Default per-item limit in CPU seconds.
DEFAULT_TIMEOUT_S = 5.0
#: Default number of worker processes.
DEFAULT_NUM_WORKERS = 2


@dataclass
class VerifyResult:
    """Outcome of :meth:`Verifier.score`.

    Attributes:
        scores: 1.0 (correct) or 0.0 per response, in input order.
        timeouts: responses whose verification hit the per-item limit twice (including
            repeats of a pair that timed out before).
        unparsed: responses with no extractable answer, or whose answer math-verify
            could not parse into an expression (and did not match as a string).
        seconds: wall-clock duration of the call.
        crashes: responses whose worker died unexpectedly while verifying them.
        fast_path: responses decided by :func:`fast_verdict` without math-verify.
        gold_errors: responses whose gold answer math-verify could not parse.
        retried: distinct pairs that timed out once and were tried again.
    """

    scores: list[float]
    timeouts: int = 0
    unparsed: int = 0
    seconds: float = 0.0
    crashes: int = 0
    fast_path: int = 0
    gold_errors: int = 0
    retried: int = 0


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


class Verifier:
    """Answer extraction, fast path and a pool of math-verify workers with per-item deadlines.

    Args:
        num_workers: number of worker processes.
        timeout_s: per-item limit in CPU seconds of the worker (soft in-worker abort at 80 %,
            then kill-and-replace); each timed-out item is retried once.
        chunk_size: items per chunk; default: spread the work over about four
            chunks per worker, capped at ``max_chunk_size``.
        max_chunk_size: upper bound for the automatic chunk size.
        soft_timeout: use the in-worker SIGPROF abort; with False every timeout is a
            kill-and-replace (useful for testing that path).
        fast_path: decide trivial pairs in the parent (see :func:`fast_verdict`).
        max_memory_mb: address-space headroom per worker, on top of its size once
            started (RLIMIT_AS; None: unlimited).  A runaway computation then fails
            with MemoryError (score 0.0) instead of exhausting the machine.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
            ``"fork"`` is refused: the parent may hold torch/CUDA state.
        startup_timeout_s: wall-clock deadline for a new worker to become ready.
        kill_grace_s: time between SIGTERM and SIGKILL for a stuck worker.
        poison_cache_size: number of timed-out pairs remembered in the parent.
        worker_cache_size: size of each worker's (answer, gold) result LRU.
        max_wall_factor: a stuck item is killed after ``max_wall_factor * timeout_s`` wall
            seconds even if it has not used ``timeout_s`` CPU seconds.
        start_workers: start the workers now (they warm up while the caller does other work);
            False: on the first pair the fast path leaves, so calls it settles whole never
            start a process.

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
        max_wall_factor: float = 10.0,
        start_workers: bool = True,
    ) -> None:
        self._closed = True  # until the pool exists (close() and __del__ check it)
        self.fast_path = bool(fast_path)
        self._poison: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._poison_size = int(poison_cache_size)
        self._lock = threading.Lock()
        self.pool = WorkerPool(
            num_workers, timeout_s, chunk_size=chunk_size, max_chunk_size=max_chunk_size,
            soft_timeout=soft_timeout, max_memory_mb=max_memory_mb, start_method=start_method,
            startup_timeout_s=startup_timeout_s, kill_grace_s=kill_grace_s,
            worker_cache_size=worker_cache_size, max_wall_factor=max_wall_factor, start=start_workers,
        )
        self._closed = False
        # Close at interpreter exit, before multiprocessing's own exit handler (atexit runs in
        # reverse order of registration): that handler SIGTERMs and joins daemonic children, and
        # workers ignore SIGTERM.
        atexit.register(_close_if_alive, weakref.ref(self))

    # -- lifecycle and pool facts ---------------------------------------------- #

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

    @property
    def timeout_s(self) -> float:
        return self.pool.timeout_s

    @property
    def num_workers(self) -> int:
        return self.pool.num_workers

    @property
    def kills(self) -> int:
        """Stuck workers killed and replaced so far."""
        return self.pool.kills

    @property
    def restarts(self) -> int:
        """Worker replacements so far (kills, crashes, failed start-ups)."""
        return self.pool.restarts

    @property
    def spawned_pids(self) -> list[int]:
        """PIDs of every worker this Verifier started (for monitoring and tests)."""
        return self.pool.spawned_pids

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return self.pool.worker_pids()

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Every worker warmed up (see WorkerPool.wait_ready)."""
        return self.pool.wait_ready(timeout_s)

    def close(self) -> None:
        """Stop all workers (see :meth:`WorkerPool.close`).  Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.pool.close()

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
            out = VerifyResult(scores=[0.0] * len(resp))
            fanout: dict[int, list[int]] = {}  # representative index -> all indices with its pair
            first_of: dict[tuple[str, str], int] = {}
            work: list[Item] = []
            for i, (text, gold) in enumerate(zip(resp, golds)):
                ans = extract_answer(text)
                if ans is None:
                    out.unparsed += 1
                    continue
                if self.fast_path:
                    verdict = fast_verdict(ans, gold)
                    if verdict is not None:
                        out.scores[i] = verdict
                        out.fast_path += 1
                        continue
                key = (ans, gold)
                if key in self._poison:
                    self._poison.move_to_end(key)
                    out.timeouts += 1
                    continue
                rep = first_of.get(key)
                if rep is not None:
                    fanout[rep].append(i)
                    continue
                first_of[key] = i
                fanout[i] = [i]
                work.append((i, ans, gold))
            if work:
                results, out.retried = self.pool.run(work)
                for i, ans, gold in work:
                    self._record(out, fanout[i], (ans, gold), *results[i])
            out.seconds = time.monotonic() - t0
            return out

    def _record(self, out: VerifyResult, idxs: list[int], pair: tuple[str, str], value: float, flag: int) -> None:
        for i in idxs:
            out.scores[i] = value
        k = len(idxs)
        if flag == TIMEOUT:
            out.timeouts += k
            self._poison_add(pair)
        elif flag == CRASH:
            out.crashes += k
            self._poison_add(pair)  # do not feed it to the next worker again
        elif flag == UNPARSED:
            out.unparsed += k
        elif flag == GOLD_ERROR:
            out.gold_errors += k


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
