"""What the reliability tests try (inputs, faults, kills, resumes), recorded as they run into
<root>/reliability/<section>.json, where <root> is $OCC_EXP_RELIABILITY_DIR: `make reliability` sets it
to results/ and then runs `python scripts/reliability_report.py`, which turns these files and
results/verifier_fuzz.json into results/reliability.md. Unset (`make test`, CI), nothing is recorded,
so a test run never rewrites the tracked results."""

from __future__ import annotations

import json
import os
from pathlib import Path

from occ_exp.checkpoint import atomic_write_text
from occ_exp.locks import file_lock

ENV = "OCC_EXP_RELIABILITY_DIR"


def results_root() -> Path | None:
    """Where the facts go ($OCC_EXP_RELIABILITY_DIR), or None: not recorded."""
    raw = os.environ.get(ENV, "").strip()
    return Path(raw) if raw else None


def record(section: str, case: str, **facts) -> None:
    """Store the facts of one test case (counts, timings, outcomes) under section/case."""
    root = results_root()
    if root is None:
        return
    folder = root / "reliability"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{section}.json"
    with file_lock(folder / f".{section}.lock"):  # pytest-xdist workers record side by side
        data = json.loads(path.read_text()) if path.exists() else {}
        data[case] = facts
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_report(name: str, report: dict) -> None:
    """A whole report of its own (<root>/<name>), e.g. the verifier fuzz test's verifier_fuzz.json."""
    root = results_root()
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / name, json.dumps(report, indent=2) + "\n")
