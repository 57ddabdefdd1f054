#!/usr/bin/env python
"""Write results/reliability.md: what the reliability tests tried (hostile inputs, faults
injected, kills, resumes) and what came out, from the records the tests leave in
results/reliability/*.json and results/verifier_fuzz.json.

    make reliability        # = the tests below, then this script
    python -m pytest -q tests/test_resume.py tests/test_checkpoint.py tests/test_tracking.py \
        tests/test_numerical_guards.py tests/test_verifier_fuzz.py tests/test_bad_input.py \
        tests/test_config.py tests/test_preemption.py tests/test_distributed_faults.py tests/test_locks.py \
        tests/test_checkpoint_reader.py
    python scripts/reliability_report.py
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
TESTS = ("tests/test_resume.py tests/test_checkpoint.py tests/test_tracking.py tests/test_numerical_guards.py "
         "tests/test_verifier_fuzz.py tests/test_bad_input.py tests/test_config.py tests/test_preemption.py "
         "tests/test_distributed_faults.py tests/test_locks.py tests/test_checkpoint_reader.py")


def load(name: str) -> dict:
    path = RESULTS / "reliability" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def facts_section(title: str, key: str, records: dict) -> list[str]:
    """A '## title' table with one row per record: its name, then its facts as key=value (nothing if empty)."""
    if not records:
        return []
    return [f"## {title}", ""] + table([key, "facts"], [[k, ", ".join(f"{a}={b}" for a, b in sorted(v.items()))]
                                                        for k, v in sorted(records.items())])


def main() -> None:
    resume, damage, guards = load("resume"), load("checkpoint_damage"), load("numerical_guards")
    bad, distf = load("bad_input"), load("distributed_faults")
    lock, stops = load("run_lock"), load("preemption")
    fuzz_path = RESULTS / "verifier_fuzz.json"
    fuzz = json.loads(fuzz_path.read_text()) if fuzz_path.exists() else {}
    modes = fuzz.get("modes", {})

    launches = sum(v.get("launches", 0) for v in resume.values())
    resumes = sum(v.get("resumes", 0) for v in resume.values())
    sigkills = sum(v.get("sigkill_during_save", 0) + v.get("sigkill_after_step", 0) for v in resume.values())
    sigterms = sum(v.get("sigterm", 0) + v.get("sigterm_to_group", 0) for v in resume.values())
    nonfinite = sum(v.get("non_finite_injected", 0) for v in guards.values())
    lam = guards.get("occ_lambda_fuzz", {})
    hostile = sum(m.get("hostile_inputs", 0) for m in modes.values())
    false_pos = sum(m.get("false_positives", 0) for m in modes.values())
    dist_faults = sum(v.get("faults_injected", 0) for v in distf.values())

    md = [f"# Reliability: what the tests try ({date.today().isoformat()})", "",
          "Produced by `python scripts/reliability_report.py` from the records the tests write "
          "(`results/reliability/*.json`, `results/verifier_fuzz.json`); regenerate with `make reliability`, "
          f"which runs `pytest {TESTS}` and then this script. CPU only, 2 shared cores.", ""]
    md += table(["area", "what is tried", "count", "outcome"], [
        ["resume", "real `python -m occ_exp.train` launches, killed / pre-empted and resumed",
         f"{launches} launches, {resumes} resumes, {sigkills} SIGKILL, {sigterms} SIGTERM",
         "metrics of every step and final weights + optimiser state identical to an uninterrupted run; "
         "no process left behind" if resume and all(v.get("identical_metrics", True) for v in resume.values()) else "-"],
        ["checkpoints", "damaged checkpoints (flipped byte, truncated, file deleted, manifest missing / corrupt, "
         "unreadable folder) under resume, `model.path` and evaluation; every checkpoint of a run damaged; "
         "temporary folders of live / dead / other-host writers", len(damage),
         "all detected by the manifest: resume used the previous one, `model.path` and evaluation refused in one line "
         "naming the file, a run with none left stopped and moved nothing, prune removed only dead writers' folders"],
        ["numerical guards", "non-finite loss / gradient norm / lambda injected into updates", nonfinite,
         "each update skipped with weights, optimiser, scheduler and OCC state untouched; stop at the limit"],
        ["OCC lambda", "hostile inputs to `occ_coefficient` (no MTP change, empty masks, +-inf, NaN, 1e30 gaps, "
         "eps 5e-324, lambda_plus 1e30)", lam.get("inputs", 0), f"{lam.get('non_finite_results', '-')} non-finite results"],
        ["verifier", "generated hostile responses (see below)", hostile,
         f"{false_pos} false positives, {fuzz.get('injection_markers_created', '-')} files created by injections, "
         "every call within its bound, no worker left after close"],
        ["bad input", "malformed JSONL rows, rows over data.max_row_chars (20 MB without line breaks), config errors, "
         "config.json unreadable / not JSON / unknown model_type, checkpoints of another size / optimiser, "
         "tokenizers without pad / eos (incl. through the CLI)", len(bad),
         "each refused with one message before work starts" if all(v.get("refused") for v in bad.values()) else "-"],
        ["distributed", "ranks SIGKILLed, SIGSTOPped (hung) or raising, 2 gloo ranks, torchrun and by hand",
         dist_faults, "every run ended with an error naming the failed rank, within the bound"],
        ["one writer per run dir", "a second process (and a second `python -m occ_exp.train`) on a run dir held by a "
         "live one; holders SIGKILLed (alone, and with a forked child still alive); SIGTERM while waiting on a cache "
         "lock", len(lock),
         "the second refused at once in one line naming the holder's pid and host, the first's metrics and "
         "checkpoints intact; a dead holder's lock never blocked; the wait ended on SIGTERM"
         if lock else "-"],
        ["SIGTERM during set-up", "SIGTERM while waiting on the warm-start lock and while training a long warm start",
         sum(v.get("sigterm", 0) for v in stops.values()),
         "exit 0 within the subprocess timeout, no cache entry, checkpoint or metrics written" if stops else "-"],
    ])

    bench_path = RESULTS / "bench.json"
    threads = json.loads(bench_path.read_text()).get("threads", {}) if bench_path.exists() else {}
    if "default_over_best_threads" in threads:
        md += [f"Threads (issue 14, item 7): two runs side by side at the default `trainer.threads=0` took "
               f"{threads['default_over_best_threads']:.2f}x the step time of the best manual setting "
               f"({threads['best_manual']} thread(s)); per setting (s/step): "
               + ", ".join(f"{k}: {v:.2f}" for k, v in threads["step_s"].items())
               + " (0 = default; `scripts/bench.py --only threads`, results/bench.md).", ""]
    md += facts_section("Resume and crash safety", "scenario", resume)
    md += facts_section("Damaged checkpoints", "damage", damage)
    md += facts_section("Numerical guards", "case", guards)
    if modes:
        md += ["## Verifier fuzz (tests/test_verifier_fuzz.py)", "",
               f"Seed {fuzz.get('seed')}, {fuzz.get('num_workers')} workers, per-item timeout {fuzz.get('timeout_s')} s, "
               f"latency bound per call: {fuzz.get('latency_bound_per_call')}.", ""]
        cats = sorted({c for m in modes.values() for c in m.get("by_category", {})})
        md += table(["category"] + list(modes), [[c] + [m.get("by_category", {}).get(c, 0) for m in modes.values()]
                                                 for c in cats])
        keys = ["hostile_inputs", "timeouts", "crashes", "worker_kills", "worker_restarts", "false_positives",
                "workers_alive_after_close", "max_call_latency_s", "total_wall_s"]
        md += table(["outcome"] + list(modes), [[k] + [m.get(k, "-") for m in modes.values()] for k in keys])
    md += facts_section("Bad input", "case", bad)
    md += facts_section("One writer per run directory (tests/test_locks.py)", "case", lock)
    md += facts_section("SIGTERM during set-up (tests/test_preemption.py)", "case", stops)
    if distf:
        md += facts_section("Distributed faults", "scenario", distf)
        md += ["Without the watchdog (measured by hand with tests/dist_fault_worker.py, torch 2.13 CPU, gloo): "
               "a SIGSTOPped rank under torchrun left rank 0 waiting for the whole process-group timeout, after "
               "which torchrun named the healthy rank 0 as the root cause; a rank SIGKILLed without torchrun gave "
               "gloo's \"Connection reset by peer\" naming an address, not a rank.", ""]
    out = RESULTS / "reliability.md"
    out.write_text("\n".join(md))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
