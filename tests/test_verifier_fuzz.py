"""Hostile-input fuzz test for the reward verifier.

About 2,000 deterministic (seeded) hostile responses go through one Verifier with a
short per-item timeout.  The test checks bounded latency, no false positives, that
no injected command ran, that the pool survives, and that close() leaves no worker
behind.  Counts are written to results/verifier_fuzz.json for the reliability report (under `make reliability`).
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from occ_exp.reward.verifier import MAX_ANSWER_CHARS, Verifier, extract_answer
from tests.reliability_log import write_report

pytestmark = pytest.mark.timeout(1200)

SEED = 20240607
TIMEOUT_S = 0.5  # CPU seconds: each distinct hostile shape that times out costs about this, twice
NUM_WORKERS = 2
BATCH = 100
KILL_ONLY_SAMPLE = 150
MARGIN_S = 5.0  # per call: start-up of replacements, kill grace, 2 shared CPU cores
# The limit counts CPU seconds; the wall-clock backstop (WALL_FACTOR x the limit) bounds each
# try on a busy machine, and a timed-out pair is tried twice.  Wall-clock latency therefore
# grows with the machine's load (that is what keeps rewards independent of it): the bound is
# scaled by the run-queue length per CPU when the batch starts.
WALL_FACTOR = 3.0


def _slowdown() -> float:
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
MARKER = "occ_pwned"
GOLD = "7"
REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _b(s: str) -> str:
    return f"Reasoning... the result is \\boxed{{{s}}}"


def _injections(rng: random.Random, n: int) -> list[str]:
    templates = [
        "__import__('os').system('touch /tmp/{m}')",
        "__import__(\"os\").system(\"touch {m}\")",
        "exec(\"open('/tmp/{m}','w').write('x')\")",
        "eval(compile('open(\\'{m}\\',\\'w\\')','x','exec'))",
        "$(touch /tmp/{m})",
        "$(rm -rf ~)",
        "`touch /tmp/{m}`",
        "; touch /tmp/{m} #",
        "| touch {m}",
        "lambda: __import__('subprocess').call(['touch', '/tmp/{m}'])",
        "().__class__.__base__.__subclasses__()",
        "Symbol('x').__class__.__init__.__globals__['os'].system('touch /tmp/{m}')",
        "\\immediate\\write18{{touch /tmp/{m}}}",
        "\\input{{/etc/passwd}}",
        "\\include{{/tmp/{m}}}",
        "open('/tmp/{m}', 'w')",
        "os.system('touch /tmp/{m}')",
        "import os; os.system('touch /tmp/{m}')",
        "{{{{7*7}}}}",
        "${{7*7}}",
    ]
    out = []
    for k in range(n):
        t = templates[k % len(templates)]
        payload = t.format(m=f"{MARKER}_{k}")
        form = rng.randrange(3)
        if form == 0:
            out.append(_b(payload))
        elif form == 1:
            out.append(f"Let me think.\nAnswer: {payload}")
        else:
            out.append(payload + " " + _b(payload))
    return out


def _power_towers(rng: random.Random, n: int) -> list[str]:
    pool = [
        "9^{9^{9^{9}}}",
        "8^{8^{8^{8}}}",
        "7^{7^{7^{7^{7}}}}",
        "10^{10^{10^{10}}}",
        "9^{9^{9}}",
        "2^{3^{4^{5^{6}}}}",
        "99^{99^{99}}",
        "(9^{9})^{9^{9^{9}}}",
    ]
    return [_b(pool[rng.randrange(len(pool))]) for _ in range(n)]


def _factorials(rng: random.Random, n: int) -> list[str]:
    pool = ["((100!)!)!", "10!!!!!!", "(1000!)!", "((50!)!)!"]
    return [_b(pool[rng.randrange(len(pool))]) for _ in range(n)]


def _enormous_numbers(rng: random.Random, n: int) -> list[str]:
    out = []
    for k in range(n):
        form = k % 5
        if form == 0:
            out.append(_b("".join(rng.choice("123456789") for _ in range(rng.randint(50, 500)))))
        elif form == 1:
            out.append(_b("10^{10^{10}}"))
        elif form == 2:
            out.append(_b("1e" + "9" * rng.randint(5, 300)))
        elif form == 3:
            out.append(_b("9" * rng.randint(100, 400) + "." + "9" * rng.randint(1, 100)))
        else:
            out.append(_b("-" + "8" * (MAX_ANSWER_CHARS - 1)))
    return out


def _deep_braces(rng: random.Random, n: int) -> list[str]:
    out = []
    for k in range(n):
        form = k % 4
        if form == 0:
            d = rng.randint(1_000, 10_000)
            out.append("\\boxed" + "{" * d + "1" + "}" * d)
        elif form == 1:
            out.append("\\boxed" + "{" * rng.randint(1_000, 10_000))
        # Deep but under the answer cap, so it reaches math-verify, whose parse time
        # grows steeply with depth (15 nested braces already take > 3 s).  Depths come
        # from a small pool: each distinct shape costs a full timeout, repeats hit the
        # parent's cache of timed-out pairs.
        elif form == 2:
            d = rng.choice([15, 40, 120, 250])
            out.append(_b("{" * d + "1" + "}" * d))
        else:
            d = rng.choice([20, 60, 120])
            out.append(_b("\\frac{" * d + "1" + "}{2}" * d))
    return out


def _megabytes(rng: random.Random, n: int) -> list[str]:
    out = []
    for k in range(n):
        form = k % 4
        if form == 0:
            out.append("x" * MB)
        elif form == 1:
            out.append("step " * (MB // 5) + _b("9^{9^{9^{9}}}"))
        elif form == 2:
            out.append("\\boxed{" + "9" * MB + "}")
        else:
            out.append("Answer: " + "{" * MB)
    return out


def _invalid_unicode(rng: random.Random, n: int) -> list[str]:
    bad = ["\ud800", "\udfff", "\udc00\ud800", "\ufffe", "\uffff", "\U0010ffff", "\u202e", "\u200b"]
    out = []
    for _ in range(n):
        s = "".join(rng.choice(bad) + rng.choice("xyz+-{}\\") for _ in range(rng.randint(1, 20)))
        out.append(_b(s) if rng.random() < 0.7 else s + "\nAnswer: " + s)
    return out


def _latex_loops(rng: random.Random, n: int) -> list[str]:
    pool = [
        "\\def\\a{\\a}\\a",
        "\\def\\a{\\a\\a}\\a",
        "\\newcommand{\\x}{\\x}\\x",
        "\\renewcommand{\\frac}{\\frac}\\frac{1}{2}",
        "\\let\\a\\a\\a",
        "\\loop\\iftrue\\repeat",
        "\\expandafter\\expandafter\\expandafter\\a",
        "\\csname a\\endcsname",
        "\\catcode`\\{=12 {",
        "\\begin{equation}\\begin{equation}",
        "\\left(" * 100 + "\\right)" * 100,
        "\\sqrt" * 200 + "{2}",
        "^" * 300 + "2",
        "\\frac" * 150,
    ]
    return [_b(pool[rng.randrange(len(pool))]) for _ in range(n)]


def _null_bytes(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        s = "".join(rng.choice(["\x00", "1", "x", "\x00\x00", "\\frac{1}{\x00}", "\x1b[2J"]) for _ in range(rng.randint(1, 30)))
        out.append(_b(s) if rng.random() < 0.7 else "\x00" * rng.randint(1, 1000))
    return out


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    def ch() -> str:
        while True:
            c = chr(rng.randrange(0x80, 0x30000))  # no ASCII: cannot spell the gold "7"
            if not c.isdigit():
                return c

    out = []
    for _ in range(n):
        s = "".join(ch() for _ in range(rng.randint(1, 300)))
        out.append(_b(s) if rng.random() < 0.8 else s)
    return out


def _latex_soup(rng: random.Random, n: int) -> list[str]:
    tokens = ["\\frac", "{", "}", "^", "_", "\\sqrt", "\\sum", "\\int", "\\lim", "x", "y", "\\pi",
              "(", ")", "[", "]", ",", "+", "-", "\\cdot", "\\infty", "9", "1", "0", "\\left", "\\right",
              "\\text{", "\\mathbb{R}", "\\cup", "\\le", "=", "!", "\\%", "\\circ", "&", "\\\\"]
    return [_b(" ".join(rng.choice(tokens) for _ in range(rng.randint(1, 60)))) for _ in range(n)]


CATEGORIES = {
    "power_tower": (_power_towers, 150),
    "factorial_tower": (_factorials, 100),
    "enormous_number": (_enormous_numbers, 150),
    "deep_braces": (_deep_braces, 150),
    "megabyte_string": (_megabytes, 16),
    "invalid_unicode": (_invalid_unicode, 200),
    "injection": (_injections, 320),
    "latex_macro_loop": (_latex_loops, 150),
    "null_bytes": (_null_bytes, 120),
    "random_unicode": (_random_unicode, 300),
    "latex_soup": (_latex_soup, 344),
}


def _generate() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    items: list[tuple[str, str]] = []
    for name, (gen, count) in CATEGORIES.items():
        items += [(name, text) for text in gen(rng, count)]
    rng.shuffle(items)
    return items


def _marker_files() -> set[str]:
    found: set[str] = set()
    for d in {Path("/tmp"), Path.cwd(), REPO, Path.home()}:
        try:
            found |= {str(p) for p in d.iterdir() if MARKER in p.name}
        except OSError:
            pass
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _run_mode(items: list[tuple[str, str]], soft_timeout: bool) -> dict[str, object]:
    """Score ``items`` in batches through one Verifier; assert the invariants."""
    seen_pids: set[int] = set()
    timeouts = unparsed = crashes = retried = 0
    max_call_s = 0.0
    false_positives: list[str] = []
    t_start = time.monotonic()
    # Children that other tests in this process left (none expected, but not this test's concern).
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    v = Verifier(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S, soft_timeout=soft_timeout, max_wall_factor=WALL_FACTOR)
    try:
        seen_pids.update(v.worker_pids())
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            t0, slowdown = time.monotonic(), _slowdown()
            res = v.score([text for _, text in chunk], [GOLD] * len(chunk))
            elapsed = time.monotonic() - t0
            seen_pids.update(v.worker_pids())
            max_call_s = max(max_call_s, elapsed)
            bound = (res.timeouts * 2 * WALL_FACTOR * TIMEOUT_S + MARGIN_S) * max(slowdown, _slowdown())
            assert elapsed <= bound, f"batch at {start}: {elapsed:.2f}s > {bound:.2f}s ({res.timeouts} timeouts)"
            assert len(res.scores) == len(chunk)
            for (cat, text), s in zip(chunk, res.scores):
                assert s in (0.0, 1.0)
                if s == 1.0:
                    false_positives.append(f"{cat}: {extract_answer(text)!r}"[:200])
            timeouts += res.timeouts
            unparsed += res.unparsed
            crashes += res.crashes
            retried += res.retried
        assert not false_positives, false_positives[:10]

        # The pool still works after all of that.
        ordinary = v.score(
            ["\\boxed{\\frac{1}{2}}", "\\boxed{(9-3)*(7-3)}", "\\boxed{13}", "Answer: 2\\sqrt{2}"],
            ["0.5", "24", "12", "\\sqrt{8}"],
        )
        assert ordinary.scores == [1.0, 1.0, 0.0, 1.0]
        assert ordinary.timeouts == 0
        kills, restarts = v.kills, v.restarts
    finally:
        seen_pids.update(v.spawned_pids)
        v.close()
    wall_s = time.monotonic() - t_start

    # No worker survives close().
    deadline = time.monotonic() + 5.0
    while not all(_gone(p) for p in seen_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [p for p in seen_pids if not _gone(p)]
    assert not survivors, f"workers alive after close(): {survivors}"
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        assert child.pid not in seen_pids
        assert "forkserver" in cmd or "resource_tracker" in cmd, f"unexpected child process: {cmd[:200]}"

    return {
        "soft_timeout": soft_timeout,
        "hostile_inputs": len(items),
        "by_category": dict(sorted(Counter(cat for cat, _ in items).items())),
        "timeouts": timeouts,
        "unparsed": unparsed,
        "crashes": crashes,
        "timeout_retries": retried,
        "worker_kills": kills,
        "worker_restarts": restarts,
        "worker_processes_seen": len(seen_pids),
        "workers_alive_after_close": 0,
        "false_positives": 0,
        "max_call_latency_s": round(max_call_s, 3),
        "total_wall_s": round(wall_s, 2),
    }


def test_hostile_inputs() -> None:
    items = _generate()
    assert len(items) >= 2000
    markers_before = _marker_files()
    home_existed = Path.home().exists()

    # 1) Everything, default configuration (in-worker soft alarm, then kill).
    soft = _run_mode(items, soft_timeout=True)
    # 2) A seeded sample with the soft alarm off: every timeout is a kill-and-replace.
    sample = random.Random(SEED + 1).sample(items, KILL_ONLY_SAMPLE)
    kill_only = _run_mode(sample, soft_timeout=False)
    assert kill_only["worker_kills"] > 0

    # No injected command ran.
    assert _marker_files() == markers_before
    assert Path.home().exists() == home_existed

    report = {
        "test": "tests/test_verifier_fuzz.py::test_hostile_inputs",
        "seed": SEED,
        "gold_answer": GOLD,
        "num_workers": NUM_WORKERS,
        "timeout_s": TIMEOUT_S,
        "batch_size": BATCH,
        "latency_bound_per_call": "(timeouts * 2 tries * %.0f x timeout_s (wall backstop) + %.1f s) x max(1, load/CPUs)"
        % (WALL_FACTOR, MARGIN_S),
        "injection_markers_created": 0,
        "modes": {"soft_alarm": soft, "kill_only": kill_only},
        "python": sys.version.split()[0],
        "math_verify": metadata.version("math-verify"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    write_report("verifier_fuzz.json", report)
