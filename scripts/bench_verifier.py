#!/usr/bin/env python
"""Throughput benchmark for occ_exp.reward.verifier.

Scores batches of realistic model outputs (a few hundred characters of reasoning
ending in ``\\boxed{...}``) whose answers mix integers, fractions, ``\\frac``, decimals
and simple expressions, about half of them correct.  Every repetition draws fresh
numbers, so the workers' result caches do not carry over between repetitions.

Reports the median verifications per second over several repetitions for

* ``default`` (the headline): the Verifier as shipped, every item its own problem;
* ``math_verify_only``: fast path off, every item goes through math-verify;
* ``grouped_<G>_per_prompt``: G samples per problem sharing the gold answer, as in a
  GRPO-style RL batch (gold parsed once per chunk, duplicate answers verified once),

and writes results/verifier_bench.json and results/verifier_bench.md.

Usage::

    python scripts/bench_verifier.py [--n 2000] [--reps 5] [--workers 2] [--timeout 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import occ_exp.reward.verifier  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from occ_exp.reward.verifier import Verifier  # noqa: E402

TARGET_PER_S = 500.0

_FILLER = [
    "First, we rewrite the equation in a more convenient form.",
    "Substituting the known values gives a linear relation between the unknowns.",
    "We check the boundary case separately to make sure nothing is lost.",
    "Simplifying both sides and collecting like terms, we obtain the result.",
    "Since the expression is symmetric, we may assume without loss of generality that a <= b.",
    "Multiplying through by the common denominator clears the fractions.",
]


def _response(rng: random.Random, answer: str) -> str:
    body = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(3, 6)))
    return f"{body}\nTherefore, the final answer is $\\boxed{{{answer}}}$."


def _problem(rng: random.Random) -> tuple[str, int, int]:
    """A problem: (answer kind, a, b)."""
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    x = rng.random()
    kind = (
        "int" if x < 0.35  # integer answer, same spelling (parent fast path)
        else "int_expr" if x < 0.45  # integer answer written as a product
        else "frac" if x < 0.65
        else "decimal" if x < 0.75  # decimal prediction vs fraction gold
        else "sqrt" if x < 0.90
        else "pi" if x < 0.95
        else "pair"
    )
    return kind, a, b


def _gold(problem: tuple[str, int, int]) -> str:
    kind, a, b = problem
    return {
        "int": str(a * b),
        "int_expr": str(a * b),
        "frac": f"\\frac{{{a}}}{{{b}}}",
        "decimal": f"\\frac{{{a}}}{{4}}",
        "sqrt": f"{b}\\sqrt{{{a}}}",
        "pi": f"\\frac{{{a}\\pi}}{{{b}}}",
        "pair": f"({a}, {b})",
    }[kind]


def _sample(rng: random.Random, problem: tuple[str, int, int]) -> str:
    """A predicted answer for ``problem``; about half are correct."""
    kind, a, b = problem
    right = rng.random() < 0.5
    if kind == "int":
        return str(a * b) if right else str(a * b + rng.choice([-1, 1, 10]))
    if kind == "int_expr":
        return rng.choice([f"{a}\\cdot {b}", f"{a}\\times{b}", f"({a})({b})"]) if right else f"{a}\\cdot {b + 1}"
    if kind == "frac":
        if right:
            return rng.choice([_gold(problem), f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{2 * a}}}{{{2 * b}}}"])
        return f"\\frac{{{b}}}{{{a}}}"
    if kind == "decimal":
        return f"{a / 4}" if right else f"{a / 4 + 0.5}"
    if kind == "sqrt":
        if right:
            return rng.choice([f"{b}\\sqrt{{{a}}}", f"\\sqrt{{{a}}}\\cdot {b}", f"\\sqrt{{{a * b * b}}}"])
        return f"{b + 1}\\sqrt{{{a}}}"
    if kind == "pi":
        return f"\\frac{{{a}}}{{{b}}}\\pi" if right else f"\\frac{{{a}}}{{{b + 1}}}\\pi"
    return f"({a},{b})" if right else f"({b},{a})"


def make_batch(seed: int, n: int, group: int = 1) -> tuple[list[str], list[str]]:
    """``n`` (response, gold) pairs; ``group`` samples share each problem (GRPO-style)."""
    rng = random.Random(seed)
    responses, golds = [], []
    while len(responses) < n:
        problem = _problem(rng)
        for _ in range(min(group, n - len(responses))):
            responses.append(_response(rng, _sample(rng, problem)))
            golds.append(_gold(problem))
    return responses, golds


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_seconds(pids: list[int]) -> float | None:
    """Total user+system CPU seconds of ``pids`` (Linux /proc; None if unavailable)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


class Config:
    """One benchmark configuration with its own long-lived Verifier."""

    def __init__(self, name: str, args: argparse.Namespace, fast_path: bool, group: int) -> None:
        self.name, self.fast_path, self.group, self.args = name, fast_path, group, args
        t0 = time.monotonic()
        self.verifier = Verifier(num_workers=args.workers, timeout_s=args.timeout, fast_path=fast_path)
        self.verifier.score(*make_batch(seed=10_000, n=64))  # waits for the workers to start
        self.startup_s = time.monotonic() - t0
        self.details: list[dict[str, object]] = []

    def run_rep(self, rep: int) -> None:
        # Fresh numbers every repetition and configuration: no cache carry-over.
        seed = 1 + rep + 1000 * self.group + (0 if self.fast_path else 100)
        responses, golds = make_batch(seed=seed, n=self.args.n, group=self.group)
        pids = self.verifier.worker_pids()
        w0, p0 = _cpu_seconds(pids), time.process_time()
        res = self.verifier.score(responses, golds)
        w1, p1 = _cpu_seconds(pids), time.process_time()
        rate = len(responses) / res.seconds
        cpu = None if (w0 is None or w1 is None) else (w1 - w0) + (p1 - p0)
        # Throughput the same work would reach on num_workers otherwise idle cores.
        capacity = None if not cpu else len(responses) / (cpu / self.args.workers)
        self.details.append(
            {
                "rep": rep,
                "items": len(responses),
                "seconds": round(res.seconds, 4),
                "per_s": round(rate, 1),
                "cpu_seconds": None if cpu is None else round(cpu, 3),
                "cpu_capacity_per_s": None if capacity is None else round(capacity, 1),
                "accuracy": round(sum(res.scores) / len(res.scores), 4),
                "fast_path": res.fast_path,
                "timeouts": res.timeouts,
                "unparsed": res.unparsed,
                "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            }
        )
        print(f"  rep {rep} [{self.name:24}] {rate:8.1f} verifications/s ({res.seconds:.2f}s, "
              f"fast path {res.fast_path}/{len(responses)}, timeouts {res.timeouts}"
              + (f", CPU-bound capacity {capacity:.0f}/s" if capacity else "") + ")", flush=True)

    def summary(self) -> dict[str, object]:
        rates = [float(d["per_s"]) for d in self.details]
        caps = [float(d["cpu_capacity_per_s"]) for d in self.details if d["cpu_capacity_per_s"] is not None]
        self.verifier.close()
        return {
            "fast_path": self.fast_path,
            "samples_per_prompt": self.group,
            "median_per_s": round(statistics.median(rates), 1),
            "min_per_s": round(min(rates), 1),
            "max_per_s": round(max(rates), 1),
            "median_cpu_capacity_per_s": round(statistics.median(caps), 1) if caps else None,
            "startup_s": round(self.startup_s, 2),
            "reps": self.details,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="items per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument("--workers", type=int, default=2, help="num_workers")
    ap.add_argument("--timeout", type=float, default=5.0, help="timeout_s per item")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt in the grouped workload")
    ap.add_argument("--out", type=Path, default=REPO / "results", help="output directory")
    args = ap.parse_args()

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"verifier benchmark: n={args.n} x {args.reps} reps, num_workers={args.workers}, timeout_s={args.timeout}")
    names = {
        "default": (True, 1),
        "math_verify_only": (False, 1),
        f"grouped_{args.group}_per_prompt": (True, args.group),
    }
    runners = [Config(name, args, fast_path=fp, group=g) for name, (fp, g) in names.items()]
    # Interleave the configurations so that background load hits them alike.
    for rep in range(args.reps):
        for r in runners:
            r.run_rep(rep)
    configs = {r.name: r.summary() for r in runners}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    headline = configs["default"]["median_per_s"]
    machine = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before] if load_before else None,
        "loadavg_after": [round(x, 2) for x in load_after] if load_after else None,
    }
    versions = {
        "python": sys.version.split()[0],
        "math-verify": _version("math-verify"),
        "latex2sympy2_extended": _version("latex2sympy2_extended"),
        "sympy": _version("sympy"),
    }
    report = {
        "benchmark": "scripts/bench_verifier.py",
        "metric": "verifications per second (median over repetitions)",
        "headline_per_s": headline,
        "target_per_s": TARGET_PER_S,
        "target_met": headline >= TARGET_PER_S,
        "cpu_bound_capacity_per_s": configs["default"]["median_cpu_capacity_per_s"],
        "target_met_cpu_bound": (configs["default"]["median_cpu_capacity_per_s"] or 0) >= TARGET_PER_S,
        "wall_over_cpu_bound": (
            round(headline / configs["default"]["median_cpu_capacity_per_s"], 2)
            if configs["default"]["median_cpu_capacity_per_s"] else None
        ),
        "num_workers": args.workers,
        "timeout_s": args.timeout,
        "items_per_rep": args.n,
        "reps": args.reps,
        "workload": "realistic responses (~300-600 chars of reasoning) ending in \\boxed{}; answer kinds: "
        "35% integers (same spelling as gold), 10% integers written as products, 20% fractions "
        "(\\frac, \\dfrac, a/b, unreduced), 10% decimals vs fraction gold, 15% sqrt expressions, "
        "5% pi fractions, 5% ordered pairs; ~50% correct; fresh numbers every repetition. "
        "'default' and 'math_verify_only': every item its own problem (worst case for caches); "
        f"'grouped': {args.group} samples per problem sharing the gold, as in GRPO-style RL batches",
        "configs": configs,
        "machine": machine,
        "versions": versions,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verifier_bench.json").write_text(json.dumps(report, indent=2) + "\n")

    mv = configs["math_verify_only"]
    grouped = configs[f"grouped_{args.group}_per_prompt"]
    md = [
        "# Reward verifier throughput",
        "",
        f"Command: `{report['command']}`",
        "",
        f"- **{headline:.0f} verifications/s** (median of {args.reps} x {args.n} items, default configuration; "
        f"target {TARGET_PER_S:.0f}/s: {'met' if report['target_met'] else 'NOT met'})",
        f"- {mv['median_per_s']:.0f} verifications/s with the fast path off (every item through math-verify)",
        f"- {grouped['median_per_s']:.0f} verifications/s with {args.group} samples per prompt (shared gold, default configuration)",
        f"- CPU-bound capacity (items / (worker + parent CPU seconds / num_workers), i.e. the rate on "
        f"{args.workers} otherwise idle cores): {configs['default']['median_cpu_capacity_per_s']} /s default, "
        f"{mv['median_cpu_capacity_per_s']} /s math-verify only",
        f"- num_workers={args.workers}, timeout_s={args.timeout}; configurations interleaved per repetition",
        f"- machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs (cpu_count={machine['cpu_count']}), "
        f"load average before/after {machine['loadavg_before']} / {machine['loadavg_after']}",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        f"Workload: {report['workload']}.",
        "",
        "| configuration | samples/prompt | median /s | min /s | max /s | CPU-bound capacity /s | fast-path share | worker start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in configs.items():
        reps = c["reps"]
        share = sum(r["fast_path"] for r in reps) / max(1, sum(r["items"] for r in reps))
        md.append(f"| {name} | {c['samples_per_prompt']} | {c['median_per_s']:.0f} | {c['min_per_s']:.0f} | {c['max_per_s']:.0f} | "
                  f"{c['median_cpu_capacity_per_s']} | {share:.0%} | {c['startup_s']:.2f} |")
    ratio = report["wall_over_cpu_bound"]
    md += [
        "",
        "Notes:",
        "",
        f"- Wall-clock rate / CPU-bound capacity = {ratio}. A value well below 1 means the cores were "
        "shared with other processes during the run (see the load average); the CPU-bound capacity is "
        "what the same work reaches on idle cores.",
        "- What limits throughput: math-verify's LaTeX parser (a pure-Python ANTLR parser: ~1-2 ms for a "
        "simple answer, ~15 ms for a tuple or interval) and sympy's equivalence checks for "
        "radicals and pi expressions (~3-4 ms). Integers spelled like the gold answer are settled "
        "in the parent by the fast path; repeated gold answers and duplicate answers (grouped "
        "workload) are parsed/verified once.",
        "",
    ]
    (args.out / "verifier_bench.md").write_text("\n".join(md))
    print(f"\nheadline: {headline:.1f} verifications/s (math-verify only: {mv['median_per_s']:.1f}/s, "
          f"grouped: {grouped['median_per_s']:.1f}/s); "
          f"target {TARGET_PER_S:.0f}/s {'met' if report['target_met'] else 'NOT met'}")
    print(f"wrote {args.out / 'verifier_bench.json'} and {args.out / 'verifier_bench.md'}")


if __name__ == "__main__":
    main()
