"""Tests for occ_exp.reward.verifier (answer extraction, math-verify pool, deadlines)."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from occ_exp.reward import verifier as vmod
from occ_exp.reward.verifier import (
    MAX_ANSWER_CHARS,
    Verifier,
    extract_answer,
    fast_verdict,
    score,
)

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 2.0  # short per-item limit (CPU seconds) for the pathological cases
MARGIN_S = 2.0  # kill grace + replacement start + scheduling noise on 2 shared cores
# The limit counts CPU seconds; on a busy machine the wall-clock backstop (WALL_FACTOR x the
# limit) bounds each try. A timed-out item is tried twice.
WALL_FACTOR = 2.0
MAX_TIMEOUT_WALL_S = 2 * (WALL_FACTOR * TIMEOUT_S + MARGIN_S)


def slowdown() -> float:
    """Run-queue length per CPU (>= 1): the wall-clock bounds below scale with it, since the
    deadlines count CPU time and other processes on the machine share the cores."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout_s=5.0) as v:
        yield v


def boxed(ans: str) -> str:
    """A realistic response: some reasoning, then the boxed answer."""
    return (
        "Let us work through the problem step by step. First we simplify the expression, "
        "then we check the boundary cases carefully.\n"
        f"Therefore the final answer is $\\boxed{{{ans}}}$."
    )


# --------------------------------------------------------------------------- #
# extract_answer
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("x \\boxed{ {a}{ {b} } } y", "{a}{ {b} }"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} and later \\fbox{3}", "3"),
        ("\\fbox{1} and later \\boxed{4}", "4"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed {5}", "5"),
        ("\\boxed{4} ... then truncated \\boxed{5", "4"),  # unbalanced last box: earlier one
        ("nested \\boxed{\\boxed{6}}", "6"),
        ("prompt says \\boxed{} but\nAnswer: 9", "9"),  # empty box is not an answer
        ("Answer: 42", "42"),
        ("reasoning\nAnswer: 42.", "42"),
        ("**Answer:** 42", "42"),
        ("**Answer**: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("## answer: 3", "3"),
        ("Final Answer: 7", "7"),
        ("ANSWER: x+1", "x+1"),
        ("Answer: 1\nmore text\nAnswer: 2\n", "2"),
        ("Answer: 1\nthen \\boxed{3}", "3"),  # boxed wins over Answer lines
        ("Answer: $$12$$", "12"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no answer here",
        "The answer: 5",  # not at the start of a line
        "\\boxed{}",
        "\\boxed{   }",
        "\\boxedx{5}",
        "\\boxed{5",  # unbalanced only
        "Answer:",
        "Answer: .",
        "\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}",
        "Answer: " + "1" * (MAX_ANSWER_CHARS + 1),
    ],
)
def test_extract_answer_none(text: str) -> None:
    assert extract_answer(text) is None


def test_extract_answer_cap_is_inclusive() -> None:
    ans = "1" * MAX_ANSWER_CHARS
    assert extract_answer("\\boxed{" + ans + "}") == ans


def test_extract_answer_type_error() -> None:
    with pytest.raises(TypeError):
        extract_answer(123)  # type: ignore[arg-type]


MB = 1 << 20
_HUGE_INPUTS = {
    "1MB_plain": "a" * MB,
    "1MB_open_braces_after_boxed": "\\boxed" + "{" * MB,
    "1MB_repeated_boxed_open": "\\boxed{" * (MB // 7),
    "1MB_repeated_empty_boxes": "\\boxed{}" * (MB // 8),
    "1MB_repeated_macro_no_brace": "\\boxed" * (MB // 6),
    "1MB_answer_then_spaces": "Answer" + " " * MB,
    "1MB_markdown_line": "*" * MB + "\nAnswer",
    "1MB_lines_answer_prefix": "Answer\n" * (MB // 7),
    "1MB_answer_long_line": "Answer: " + "9" * MB,
    "1MB_backslashes": "\\" * MB,
    "deep_braces_10000": "\\boxed" + "{" * 10_000 + "1" + "}" * 10_000,
    "deep_braces_10000_unclosed": "\\boxed" + "{" * 10_000,
    "deep_braces_then_box": "{" * 10_000 + "\\boxed{8}" + "}" * 10_000,
    "1MB_text_then_box": "x " * (MB // 2) + "\\boxed{8}",
}


@pytest.mark.parametrize("name", sorted(_HUGE_INPUTS))
def test_extract_answer_is_fast(name: str) -> None:
    text = _HUGE_INPUTS[name]
    t0 = time.perf_counter()
    out = extract_answer(text)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5 * slowdown(), f"{name}: {elapsed:.3f}s"
    assert out is None or len(out) <= MAX_ANSWER_CHARS
    if name.endswith("then_box"):
        assert out == "8"


# --------------------------------------------------------------------------- #
# Equivalences and near-misses (checked interactively against math-verify 0.9.0)
# --------------------------------------------------------------------------- #

EQUIVALENT = [
    # (gold, predicted answer inside \boxed{})
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("\\frac{3}{4}", "\\dfrac{3}{4}"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("\\frac{1}{2}", "\\tfrac12"),
    ("(1,2]", "(1, 2]"),  # interval, two spellings
    ("(1,2]", "\\left(1,2\\right]"),
    ("(1, -2)", "(1,-2)"),  # ordered pair
    ("(1, -2)", "\\left(1, -2\\right)"),
    ("(1, 2, 3)", "(1,2,3)"),
    ("50\\%", "50"),  # percentages
    ("50", "50\\%"),  # via the "$...$" fallback with math-verify's default extractors
    ("50", "50%"),  # fallback: parsed as 50/100, math-verify accepts x% for both x and x/100
    ("0.5", "50%"),
    ("50", "50 percent"),
    ("5", "5 \\text{ cm}"),  # units are dropped by math-verify's normaliser
    ("5", "5\\text{cm}"),
    ("5", "5 \\mathrm{cm}"),
    ("5\\text{ cm}", "5"),
    ("30", "30^\\circ"),  # degrees
    ("30", "30^{\\circ}"),
    ("30^\\circ", "30"),
    ("30", "30°"),  # unicode degree sign: only through the "$...$" fallback
    ("2\\pi", "\\pi \\cdot 2"),  # pi forms
    ("2\\pi", "2 \\pi"),
    ("2\\pi", "\\pi*2"),
    ("24", "(9-3)*(7-3)"),  # simple expressions
    ("24", "(9-3)\\times(7-3)"),
    ("24", "(9-3)\\cdot(7-3)"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("1000", "1,000"),
    ("1000", "1{,}000"),
    ("3", "3.0"),
    ("7", "007"),
    ("\\frac{1}{3}", "0.3333333"),  # math-verify rounds floats to 6 places
    ("x=3", "x = 3"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\text{(C)}", "\\text{(C)}"),
]

# Forms math-verify 0.9.0 does NOT treat as equal (kept out of EQUIVALENT on purpose;
# asserted below so that a math-verify upgrade that changes them is noticed):
#   "50\%" (escaped percent) vs 0.5: the \% is dropped, so it reads 50, not 0.5
#   (whereas a bare "50%" is accepted for both 50 and 0.5, see EQUIVALENT);
#   degrees are not converted: "30^\circ" does not match \frac{\pi}{6};
#   thousands separators written with a space, "1\,000" or "1 000", parse as 1*0;
#   an interval written as a set-builder "\{x: 1 < x \le 2\}" or as the inequality
#   "1 < x \le 2" does not match the interval (1,2].
# Note also that "50%" and "30°" fail math-verify's LaTeX extractor inside \boxed{};
# they are accepted only because the verifier retries "$answer$" with math-verify's
# default (LaTeX + plain expression) extractors when \boxed{} yields no expression.
NOT_ACCEPTED = [
    ("0.5", "50\\%"),
    ("\\frac{\\pi}{6}", "30^\\circ"),
    ("1000", "1\\,000"),
    ("1000", "1 000"),
    ("(1,2]", "\\{x: 1 < x \\le 2\\}"),
    ("(1,2]", "1 < x \\le 2"),
]

NEAR_MISS = [
    ("7", "8"),  # off by one
    ("7", "6"),
    ("7", "-7"),  # wrong sign
    ("-3", "3"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\frac{1}{2}", "0.51"),
    ("(1,2]", "(1,2)"),  # open vs closed
    ("(1,2]", "[1,2]"),
    ("[1,2)", "(1,2]"),
    ("(1, -2)", "(-2, 1)"),  # swapped ordered pair
    ("\\frac{1}{3}", "0.33"),  # math-verify distinguishes these
    ("\\frac{1}{3}", "0.333"),
    ("2\\pi", "\\pi"),
    ("24", "(9-3)*(7-2)"),
    ("x^2+2x+1", "(x-1)^2"),
    ("\\sqrt{8}", "3\\sqrt{2}"),
    ("5", "5.01"),
]


def test_equivalent_forms_score_one(verifier: Verifier) -> None:
    res = verifier.score([boxed(p) for _, p in EQUIVALENT], [g for g, _ in EQUIVALENT])
    wrong = [(g, p) for (g, p), s in zip(EQUIVALENT, res.scores) if s != 1.0]
    assert not wrong, f"not accepted: {wrong}"
    assert res.timeouts == 0


def test_near_misses_score_zero(verifier: Verifier) -> None:
    res = verifier.score([boxed(p) for _, p in NEAR_MISS], [g for g, _ in NEAR_MISS])
    wrong = [(g, p) for (g, p), s in zip(NEAR_MISS, res.scores) if s != 0.0]
    assert not wrong, f"wrongly accepted: {wrong}"


def test_missing_answer_scores_zero_and_counts_unparsed(verifier: Verifier) -> None:
    res = verifier.score(["I am not sure.", "\\boxed{}", "Answer:"], ["7", "7", "7"])
    assert res.scores == [0.0, 0.0, 0.0]
    assert res.unparsed == 3


def test_documented_math_verify_rejections(verifier: Verifier) -> None:
    res = verifier.score([boxed(p) for _, p in NOT_ACCEPTED], [g for g, _ in NOT_ACCEPTED])
    assert res.scores == [0.0] * len(NOT_ACCEPTED)


def test_answer_line_is_scored(verifier: Verifier) -> None:
    res = verifier.score(["work...\n**Answer:** $\\frac{1}{2}$.", "Answer: 13"], ["0.5", "13"])
    assert res.scores == [1.0, 1.0]


# --------------------------------------------------------------------------- #
# Fast path: never disagrees with math-verify
# --------------------------------------------------------------------------- #

FAST_PAIRS = [
    ("5", "5"),
    ("5", "$5$"),
    (" x + 1 ", "x + 1"),
    ("x  +   1", "x + 1"),
    ("3", "3.0"),
    ("3.00", "3"),
    (".5", "0.50"),
    ("007", "7"),
    ("-0", "0"),
    ("1.", "1"),
    ("8", "7"),
    ("-7", "7"),
    ("999999999998", "999999999999"),
    ("12345678901234567890", "12345678901234567890"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("(1,2]", "(1,2]"),
    ("\\infty", "\\infty"),
    ("\\text{(C)}", "\\text{(C)}"),
    ("x=3", "x=3"),
    ("0/0", "0/0"),
    # integer arithmetic (the countdown task's answers): + - * / and parentheses, usual precedence
    ("(9-3)*(7-3)", "24"),
    ("3*5+2", "17"),
    ("15 - 4 / 2", "13"),
    ("12/(4-1)", "4"),
    ("6/2*3", "9"),
    ("6/2/3", "1"),
    ("-3+5", "2"),
    ("8-5-1", "2"),
    ("7+7+7", "20"),
    ("1+2", "\\frac{6}{2}"),
    ("10/4", "\\frac{5}{2}"),
]


def test_fast_path_decisions() -> None:
    assert fast_verdict("5", "5") == 1.0
    assert fast_verdict("3.0", "3") == 1.0
    assert fast_verdict("8", "7") == 0.0
    # Exact closed forms (rationals, radicals, pi multiples, integer tuples):
    assert fast_verdict("\\frac{1}{2}", "0.5") == 1.0
    assert fast_verdict("\\dfrac{6}{8}", "3/4") == 1.0
    assert fast_verdict("\\sqrt{8}", "2\\sqrt{2}") == 1.0
    assert fast_verdict("\\frac{3}{4}\\pi", "\\frac{3\\pi}{4}") == 1.0
    assert fast_verdict("(1,-2)", "(1, -2)") == 1.0
    assert fast_verdict("(-2,1)", "(1, -2)") == 0.0
    assert fast_verdict("0.51", "\\frac{1}{2}") == 0.0
    # Not decided by the fast path (math-verify rounds / parses these):
    assert fast_verdict("0.3333333", "0.33333333") is None
    assert fast_verdict("0.3333333", "\\frac{1}{3}") is None  # within math-verify's 6-place rounding
    assert fast_verdict("1000000000001", "1000000000000") is None
    assert fast_verdict("1,000", "1000") is None
    assert fast_verdict("1 000", "1000") is None
    assert fast_verdict("(3)(4)", "12") is None  # math-verify does not read this as 12
    assert fast_verdict("(1,2]", "(1, 2]") is None
    assert fast_verdict("x+1", "1+x") is None
    assert fast_verdict("", "") is None
    # Integer arithmetic with the usual precedence, exactly (the countdown task's answers):
    assert fast_verdict("(9-3)*(7-3)", "24") == 1.0
    assert fast_verdict("3*5+2", "17") == 1.0
    assert fast_verdict("3+5*2", "16") == 0.0
    assert fast_verdict("14/(5-1)", "3") == 0.0  # 7/2, not integer division
    assert fast_verdict("2(3+4)", "14") is None  # juxtaposition: left to math-verify
    assert fast_verdict("3*-2+9", "3") == 1.0  # a sign after an operator
    assert fast_verdict("-(2+3)*2", "-10") == 1.0
    assert fast_verdict("5/(3-3)", "7") is None  # division by zero: left to math-verify
    assert fast_verdict("1.5+1.5", "3") is None  # decimals are rounded by math-verify


def test_fast_path_agrees_with_math_verify() -> None:
    decided = [(p, g) for p, g in FAST_PAIRS if fast_verdict(p, g) is not None]
    assert len(decided) == len(FAST_PAIRS)
    with Verifier(num_workers=1, timeout_s=5.0, fast_path=False) as slow:
        res = slow.score([boxed(p) for p, _ in decided], [g for _, g in decided])
    for (p, g), s in zip(decided, res.scores):
        assert fast_verdict(p, g) == s, f"fast path disagrees with math-verify on {p!r} vs {g!r}"


# --------------------------------------------------------------------------- #
# Pathological answers, timeouts and pool survival
# --------------------------------------------------------------------------- #

PATHOLOGICAL = {
    "power_tower": boxed("9^{9^{9^{9}}}"),
    "factorial_tower": boxed("((100!)!)!"),
    "deep_braces": "\\boxed" + "{" * 10_000 + "1" + "}" * 10_000,
    "megabyte": "7 " * (MB // 2) + "\\boxed{" + "9" * MB,
}

ORDINARY = [
    (boxed("\\frac{1}{2}"), "0.5", 1.0),
    (boxed("(9-3)*(7-3)"), "24", 1.0),
    (boxed("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
    (boxed("13"), "12", 0.0),
    (boxed("(1,2)"), "(1,2]", 0.0),
]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _check_ordinary(v: Verifier) -> None:
    res = v.score([r for r, _, _ in ORDINARY], [g for _, g, _ in ORDINARY])
    assert res.scores == [e for _, _, e in ORDINARY]
    assert res.timeouts == 0


@pytest.mark.parametrize("soft_timeout", [True, False], ids=["soft-alarm", "kill-only"])
def test_pathological_answers_time_out_and_pool_survives(soft_timeout: bool) -> None:
    with Verifier(num_workers=2, timeout_s=TIMEOUT_S, soft_timeout=soft_timeout, max_wall_factor=WALL_FACTOR) as v:
        _check_ordinary(v)  # workers are up
        pids_before = set(v.worker_pids())
        for name, text in PATHOLOGICAL.items():
            t0 = time.monotonic()
            res = v.score([text], ["7"])
            elapsed = time.monotonic() - t0
            assert res.scores == [0.0], name
            assert elapsed < MAX_TIMEOUT_WALL_S * slowdown(), f"{name} took {elapsed:.2f}s"
            if name in ("power_tower", "factorial_tower"):
                assert res.timeouts == 1, name
        if not soft_timeout:
            assert v.kills >= 2
            assert set(v.worker_pids()) != pids_before  # workers were replaced
        # A repeated pathological answer hits the parent's poison cache: no new wait.
        t0 = time.monotonic()
        res = v.score([PATHOLOGICAL["power_tower"]], ["7"])
        assert res.scores == [0.0] and res.timeouts == 1
        assert time.monotonic() - t0 < 0.5 * slowdown()
        _check_ordinary(v)  # the pool survived


def test_stuck_item_in_a_chunk_does_not_lose_the_rest() -> None:
    """Kill-only mode: the stuck item scores 0.0, the rest of its chunk is re-sent."""
    # Work is sorted by gold before chunking: golds "1".."9" keep the stuck item
    # (gold "4") in the middle of the single chunk.
    items = [(boxed(str(k)), str(k), 1.0) for k in (1, 2, 3)]
    items.append((boxed("10^{10^{10}}"), "4", 0.0))
    items += [(boxed(f"\\frac{{{2 * k}}}{{2}}"), str(k), 1.0) for k in (5, 6, 7, 8, 9)]
    with Verifier(num_workers=1, timeout_s=TIMEOUT_S, soft_timeout=False, chunk_size=16, fast_path=False,
                  max_wall_factor=WALL_FACTOR) as v:
        res = v.score([r for r, _, _ in items], [g for _, g, _ in items])
        assert res.scores == [e for _, _, e in items]
        assert res.timeouts == 1 and res.retried == 1 and v.kills == 2  # killed, retried, killed
        assert res.seconds < (MAX_TIMEOUT_WALL_S + 2 * MARGIN_S + 2.0) * slowdown()  # two replacements start
        _check_ordinary(v)


def test_pool_survives_external_sigkill(verifier: Verifier) -> None:
    _check_ordinary(verifier)
    victim = verifier.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not _gone(victim) and time.monotonic() < deadline:
        time.sleep(0.01)
    _check_ordinary(verifier)
    assert victim not in verifier.worker_pids()


def test_worker_dying_mid_item_is_a_crash_not_a_hang() -> None:
    """A worker killed while busy: its item scores 0.0 (a crash), the rest still scores."""
    items = [(boxed("1"), "1", 1.0), (boxed("9^{9^{9^{9}}}"), "2", 0.0), (boxed("\\frac{6}{2}"), "3", 1.0)]
    with Verifier(num_workers=1, timeout_s=10.0, soft_timeout=False, chunk_size=16, fast_path=False) as v:
        _check_ordinary(v)
        victim = v.worker_pids()[0]
        timer = threading.Timer(1.0, os.kill, args=(victim, signal.SIGKILL))
        timer.start()
        try:
            res = v.score([r for r, _, _ in items], [g for _, g, _ in items])
        finally:
            timer.cancel()
        assert res.scores == [e for _, _, e in items]
        assert res.crashes == 1 and res.timeouts == 0
        assert res.seconds < 6.0 * slowdown()  # far below the 10 s item deadline
        _check_ordinary(v)


# --------------------------------------------------------------------------- #
# Ordering, input validation, module-level API, close()
# --------------------------------------------------------------------------- #


def _mixed_items(n: int) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    for k in range(n):
        a, b = k + 1, k + 2
        kind = k % 6
        if kind == 0:
            out.append((boxed(f"\\frac{{{a}}}{{{b}}}"), f"{a}/{b}", 1.0))
        elif kind == 1:
            out.append((boxed(f"\\frac{{{a}}}{{{b}}}"), f"\\frac{{{b}}}{{{a}}}", 0.0))
        elif kind == 2:
            out.append((boxed(f"{a}\\cdot {b}"), str(a * b), 1.0))
        elif kind == 3:
            out.append((boxed(str(a * b + 1)), str(a * b), 0.0))
        elif kind == 4:
            out.append((f"So it is\nAnswer: {a}.", str(a), 1.0))
        else:
            out.append(("I give up.", str(a), 0.0))
    return out


def test_order_preserved_across_chunks_and_workers() -> None:
    items = _mixed_items(200)
    with Verifier(num_workers=2, timeout_s=5.0, chunk_size=7, fast_path=False) as v:
        res = v.score([r for r, _, _ in items], [g for _, g, _ in items])
    assert res.scores == [e for _, _, e in items]
    assert res.unparsed == sum(1 for r, _, _ in items if r == "I give up.")


def test_order_preserved_with_fast_path_and_duplicates(verifier: Verifier) -> None:
    items = _mixed_items(60) * 3  # duplicates are verified once and fanned out
    res = verifier.score([r for r, _, _ in items], [g for _, g, _ in items])
    assert res.scores == [e for _, _, e in items]


def test_empty_batch(verifier: Verifier) -> None:
    res = verifier.score([], [])
    assert res.scores == [] and res.timeouts == 0 and res.unparsed == 0


def test_mismatched_lengths_raise_value_error(verifier: Verifier) -> None:
    with pytest.raises(ValueError, match=r"len\(responses\)=3.*len\(answers\)=2"):
        verifier.score(["a", "b", "c"], ["1", "2"])
    with pytest.raises(ValueError, match=r"len\(responses\)=1.*len\(answers\)=0"):
        score(["a"], [])


def test_non_str_items_raise_type_error_naming_index(verifier: Verifier) -> None:
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        verifier.score(["\\boxed{1}", None], ["1", "2"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"answers\[0\]"):
        verifier.score(["\\boxed{1}"], [1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        verifier.score("\\boxed{1}", "1")  # type: ignore[arg-type]


def test_module_level_score() -> None:
    try:
        assert score([boxed("\\frac{1}{2}"), boxed("3")], ["0.5", "4"], timeout_s=3.0) == [1.0, 0.0]
        first = vmod._default_verifier
        assert first is not None and first.timeout_s == 3.0
        assert score([boxed("2")], ["2"], timeout_s=3.0) == [1.0]
        assert vmod._default_verifier is first  # reused
        assert score([boxed("x+1")], ["1+x"], timeout_s=4.0) == [1.0]
        assert vmod._default_verifier is not first and first.closed  # re-created
        vmod._default_verifier.close()
        assert score([boxed("2")], ["2"], timeout_s=4.0) == [1.0]  # re-created after close
    finally:
        vmod._close_default()


def test_close_stops_workers_and_is_idempotent() -> None:
    v = Verifier(num_workers=2, timeout_s=5.0)
    _check_ordinary(v)
    pids = v.worker_pids()
    assert len(pids) == 2
    v.close()
    v.close()
    for pid in pids:
        assert _gone(pid), f"worker {pid} survived close()"
    with pytest.raises(RuntimeError, match="closed"):
        v.score([boxed("1")], ["1"])


def test_spawn_start_method() -> None:
    with Verifier(num_workers=1, timeout_s=5.0, start_method="spawn") as v:
        _check_ordinary(v)


def test_rejects_fork_start_method() -> None:
    with pytest.raises(ValueError, match="fork"):
        Verifier(start_method="fork")
