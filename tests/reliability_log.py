"""What the reliability tests try (inputs, faults, kills, resumes), recorded as they run into
results/reliability/<section>.json; `python scripts/reliability_report.py` turns these files and
results/verifier_fuzz.json into results/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "reliability"


def record(section: str, case: str, **facts) -> None:
    """Store the facts of one test case (counts, timings, outcomes) under section/case."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{section}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[case] = facts
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
