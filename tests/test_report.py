"""The reproduction's aggregation (occ_exp.report): runs read back from their folders, the paired
bootstrap, the Table 1 rows, the ordering verdict and the mechanism table."""

from __future__ import annotations

import json

import numpy as np
from omegaconf import OmegaConf

from occ_exp.report import (
    Run, bootstrap_diff, collect_runs, mechanism_markdown, ordering_verdict, regime_table, table_markdown,
)

REGIMES = ["detach", "ce", "policy", "occ"]


def _run(regime: str, seed: int, p_correct: float, n: int = 400, rows=None, rng=None) -> Run:
    rng = rng or np.random.default_rng(seed)
    correct = (rng.random(n) < p_correct).astype(float)
    return Run(path=None, regime=regime, seed=seed, coef=0.1, estimator="paper", head_ce=0.0,
               accuracy=float(correct.mean()), correct=correct, rows=rows or [])


def test_bootstrap_interval_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(0)
    same = {s: (rng.random(500) < 0.4).astype(float) for s in range(4)}
    d, lo, hi = bootstrap_diff(same, same)
    assert d == 0.0 and lo == 0.0 and hi == 0.0
    worse = {s: np.where(rng.random(500) < 0.5, 0.0, v) for s, v in same.items()}  # loses about half its wins
    d, lo, hi = bootstrap_diff(worse, same)
    assert d < -0.1 and hi < 0 and lo < d < hi
    noise = {s: (rng.random(500) < 0.4).astype(float) for s in range(4)}  # same rate, other draws
    d, lo, hi = bootstrap_diff(noise, same)
    assert lo < 0 < hi


def test_table_rows_and_the_ordering_verdict():
    flat = [_run(r, s, 0.45, rng=np.random.default_rng(100 * i + s)) for i, r in enumerate(REGIMES) for s in range(4)]
    table = regime_table(flat, lambda r: r.regime, REGIMES)
    assert [row["label"] for row in table] == REGIMES and all(row["seeds"] == 4 for row in table)
    assert "diff" not in table[0] and all("diff" in row for row in table[1:])
    assert "does not appear" in ordering_verdict(table)

    # The paper's ordering, built in: occ wins more problems than detach, policy and ce fewer.
    rng = np.random.default_rng(1)
    base = {s: (rng.random(1000) < 0.45).astype(float) for s in range(4)}
    shift = {"detach": 0.0, "ce": -0.15, "policy": -0.05, "occ": +0.06}
    runs = []
    for reg, dp in shift.items():
        for s, c in base.items():
            flip = rng.random(c.size) < abs(dp)
            cc = np.where(flip, 1.0 if dp > 0 else 0.0, c) if dp else c
            runs.append(Run(None, reg, s, 0.1, "paper", 0.0, float(cc.mean()), cc, []))
    table = regime_table(runs, lambda r: r.regime, REGIMES)
    verdict = ordering_verdict(table)
    assert verdict.startswith("**The paper's ordering appears"), verdict
    md = table_markdown(table)
    assert md.count("\n") == 1 + len(REGIMES) and "(reference)" in md


def test_mechanism_table_reads_the_logged_terms():
    def rows(lam_star, corr, coef, acc0, acc1):
        return [{"step": 1, "mtp/coef": coef, "mtp/corr_proxy": 1.0, "mtp/penalty_proxy": 10.0, "mtp/acceptance": acc0},
                {"step": 2, "mtp/coef": coef, "mtp/corr_proxy": -1.0, "mtp/penalty_proxy": 30.0, "mtp/acceptance": acc1,
                 "diag/lambda_star": lam_star, "diag/corr": corr, "diag/cosine": 0.5}]

    runs = [_run("policy", 0, 0.4, rows=rows(0.2, 0.3, 0.1, 0.9, 0.8)),
            _run("occ", 0, 0.4, rows=rows(0.05, -0.1, -0.002, 0.9, 0.7))]
    md = mechanism_markdown(runs, lambda r: r.regime, REGIMES).splitlines()
    assert len(md) == 4  # header, rule, policy, occ (regimes without runs are left out)
    policy, occ = md[2].split(" | "), md[3].split(" | ")
    assert policy[1] == "0.2" and policy[2] == "1.00" and policy[4] == "1.00e-01" and policy[5] == "0.50"
    assert occ[2] == "0.00" and occ[4] == "-2.00e-03" and occ[6] == "20"
    assert md[3].endswith("0.900 → 0.700 |")


def test_runs_are_read_back_from_their_folders(tmp_path):
    for i, (reg, seed) in enumerate([("detach", 0), ("occ", 0), ("occ", 1)]):
        d = tmp_path / f"regime={reg},seed={seed}"
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"seed": seed, "regime": {"name": reg, "coef": 0.1, "estimator": "paper",
                                                                  "head_ce": 0.0}}), d / ".hydra" / "config.yaml")
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "mtp/acceptance": 0.9}) + "\n")
        if i < 2:  # the third run has not finished: no eval.json
            (d / "eval.json").write_text(json.dumps({"benchmarks": {"tiny": {"avg@k": 0.5, "k": 4,
                                                                             "correct": [4, 0, 2, 2]}}}))
    runs = collect_runs(tmp_path)
    assert sorted((r.regime, r.seed, r.finished) for r in runs) == [("detach", 0, True), ("occ", 0, True),
                                                                    ("occ", 1, False)]
    done = next(r for r in runs if r.regime == "occ" and r.seed == 0)
    assert done.accuracy == 0.5 and done.correct.tolist() == [1.0, 0.0, 0.5, 0.5]
    table = regime_table(runs, lambda r: r.regime, REGIMES)
    assert [row["seeds"] for row in table] == [1, 1]  # unfinished runs stay out of the table


def test_run_summary_lines(tmp_path):
    """What `python -m occ_exp.train` prints when a run ends: accuracy before -> after, lambda_t,
    acceptance, and exact c / v2 only where steps were diagnosed."""
    from occ_exp.report import run_summary

    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/n": 16},
            {"step": 1, "mtp/coef": 0.01, "mtp/acceptance": 0.5},
            {"step": 2, "mtp/coef": 0.03, "mtp/acceptance": 0.6, "eval/accuracy": 0.5, "eval/n": 32}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = run_summary(tmp_path)
    assert lines == ["held-out accuracy 0.250 (step 0, n=16) -> 0.500 (step 2, n=32)",
                     "lambda_t mean +0.02, last +0.03 (2 steps)", "MTP acceptance 0.500 -> 0.600"]
    rows[2].update({"diag/corr": 0.002, "diag/penalty": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_summary(tmp_path)[-1] == "exact c mean +0.002, v2 mean 0.5 (1 diagnosed steps)"
