"""The reproduction's aggregation (occ_exp.report): runs read back from their folders, the paired
bootstrap, the Table 1 rows, the ordering verdict and the mechanism table."""

from __future__ import annotations

import json
import math
import re

import numpy as np
from omegaconf import OmegaConf

from occ_exp.report import (
    Run, bootstrap_diff, collect_runs, findings_markdown, mechanism_markdown, ordering_verdict, regime_table, table_markdown,
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


# == the theory test (issue 16): synthetic run folders with known c, v2, L and accuracy curves ==========
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from occ_exp.report import (  # noqa: E402
    agreement, break_even, cell_label, measured_curves, missing_cells, predicted_curve, proxy_observations,
    proxy_table, regime_label, response_curve, sign_markdown, spearman, theory_verdict,
)

L_TRUE, ETA, N_PROBLEMS = 2.0, 0.01, 1000  # L*eta = 0.02
ROOT = Path(__file__).resolve().parents[1]


def _base(seed):
    return (np.random.default_rng(seed).random(N_PROBLEMS) < 0.45).astype(int)


def _shifted(seed, delta, salt):
    """The seed's detach correctness with round(delta * N) problems flipped (up if delta > 0, down if < 0)."""
    c = _base(seed).copy()
    n = int(round(abs(delta) * N_PROBLEMS))
    if n:
        pool = np.flatnonzero(c == (0 if delta > 0 else 1))
        c[np.random.default_rng(1000 * seed + salt).choice(pool, n, replace=False)] = 1 if delta > 0 else 0
    return c


def write_run(root, *, regime="policy", seed=0, coef=0.1, lambda_plus=1.0, estimator="paper", delta=0.0, c=1.0, v2=196.0,
              steps=20, diag_every=5, sps=2.0, finished=True, accept=0.9, salt=0, mb_keys=False):
    """One run folder as a Hydra multirun point writes it: config, metrics (diagnosed steps with
    the exact c, v2 and a Taylor check consistent with H = L_TRUE * I), and eval.json."""
    d = Path(root) / f"regime={regime},est={estimator},coef={coef},lp={lambda_plus},seed={seed}"
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "regime": {"name": regime, "coef": coef, "lambda_plus": lambda_plus,
                                                              "estimator": estimator, "head_ce": 0.0},
                                     "algorithm": {"num_mini_batches": 4}, "trainer": {"total_steps": steps}}),
                   d / ".hydra" / "config.yaml")
    lam = lambda_plus * c / v2 if regime == "occ" else coef
    star = lambda_plus * c / v2 if v2 else 0.0  # detach: no MTP gradient on the trunk (c = v2 = 0)
    rows = []
    for t in range(1, steps + 1 if finished else steps // 2):
        r = {"step": t, "time/step_s": sps, "mtp/acceptance": accept, "mtp/coef": lam, "reward/mean": 0.4}
        if t % diag_every == 0:
            first = ETA * lam * c
            r.update({"diag/corr": c, "diag/penalty": v2, "diag/lambda_applied": lam, "diag/lambda_star": star,
                      "diag/lambda_proxy": star * (1 + 0.1 * math.sin(t)), "diag/lambda_reference_code": -star, "diag/lambda_paper_in_clip": 0.0,
                      "diag/delta_mtp_predicted": first, "diag/taylor_eta": ETA,
                      "diag/delta_mtp_predicted2": first - ETA**2 * L_TRUE * (lam * c + lam**2 * v2 / 2)})
        rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        corr = _shifted(seed, delta, salt) * 4  # k = 4 samples, all alike
        (d / "eval.json").write_text(json.dumps({"benchmarks": {"tiny": {"avg@k": float(corr.mean() / 4), "k": 4,
                                                                         "correct": corr.tolist()}}}))
    return d


def curve(lam, lam0=0.5):
    """A measured accuracy response crossing 0 at lam0 (log-linear)."""
    return 0.08 * math.log(lam0 / lam) / math.log(lam0 / 0.03)


def write_table2(root, seeds=4, policy_v2=196.0):
    for s in range(seeds):
        write_run(root, regime="detach", seed=s, c=0.0, v2=0.0)
        for i, lam in enumerate([0.03, 0.1, 0.3, 1.0, 3.0]):
            write_run(root, regime="policy", seed=s, coef=lam, delta=curve(lam), v2=policy_v2, salt=i)
            write_run(root, regime="ce", seed=s, coef=lam, delta=-0.02 - 0.02 * lam, c=-0.1, v2=50.0, salt=10 + i)
        for lp in (0.1, 1.0, 10.0):
            write_run(root, regime="occ", seed=s, lambda_plus=lp, delta=0.0, c=1.0, v2=10.0)


def test_break_even_interpolates_in_log_lambda_and_marks_the_grid_ends():
    lams = [0.1, 1.0, 10.0]
    assert break_even(lams, [1.0, 1.0, -1.0]) == pytest.approx(math.sqrt(10.0))  # midway in log between 1 and 10
    assert break_even(lams, [-1.0, -2.0, -3.0]) == 0.0  # below the grid
    assert break_even(lams, [1.0, -1.0, 2.0]) == math.inf  # the last delta is >= 0: above the grid
    assert break_even(lams, [-1.0, 1.0, -1.0]) == pytest.approx(math.sqrt(10.0))  # the last crossing counts


def test_response_curve_pairs_seeds_and_problems_and_locates_the_crossing():
    cells = {lam: {s: _shifted(s, curve(lam), i) for s in range(4)} for i, lam in enumerate([0.03, 0.1, 0.3, 1.0, 3.0])}
    ref = {s: _base(s) for s in range(4)}
    r = response_curve(cells, ref, n_boot=500)
    assert r["seeds"] == [0, 1, 2, 3]
    assert r["delta"][0] == pytest.approx(curve(0.03), abs=1e-3) and r["delta"][-1] < 0
    assert all(lo <= d <= hi for d, lo, hi in zip(r["delta"], r["lo"], r["hi"]))
    assert r["lo"][0] > 0 and r["hi"][-1] < 0  # resolved at both ends
    assert r["break_even"] == pytest.approx(0.5, rel=0.05)
    assert 0.3 < r["break_even_lo"] <= r["break_even"] <= r["break_even_hi"] < 1.0
    # a cell missing a seed: only the seeds every cell and the reference share are used
    del cells[3.0][3]
    assert response_curve(cells, ref, n_boot=10)["seeds"] == [0, 1, 2]
    # a sweep still running: a cell with fewer seeds than planned stays out of the curve (named), instead
    # of cutting every other cell down to the seeds it has
    cells[1.0] = {0: cells[1.0][0]}
    r = response_curve(cells, ref, n_boot=10, min_seeds=3)
    assert r["lams"] == [0.03, 0.1, 0.3, 3.0] and r["seeds"] == [0, 1, 2] and r["left_out"] == [1.0]
    assert response_curve(cells, ref, n_boot=10)["seeds"] == [0]  # without min_seeds: every cell, the seeds all share


def test_prediction_recovers_l_eta_and_lambda_0_from_the_taylor_terms(tmp_path):
    write_table2(tmp_path, seeds=2)
    runs = collect_runs(tmp_path)
    policy = [r for r in runs if regime_label(r) == "policy"]
    grid = np.geomspace(0.01, 30, 31)
    p = predicted_curve(policy, grid, n_boot=200)
    assert p["L_eta"] == pytest.approx(L_TRUE * ETA) and p["eta_source"] == "taylor_eta"
    lam0 = 2 * (1 - L_TRUE * ETA) * 1.0 / (L_TRUE * ETA * 196.0)  # = 0.5
    assert p["lambda_0"] == pytest.approx(lam0) and p["lambda_0_lo"] == pytest.approx(lam0)
    gain = np.array(p["gain"])
    assert gain[grid < lam0].min() > 0 and gain[grid > lam0 * 1.01].max() < 0
    assert grid[np.argmax(gain)] == pytest.approx(lam0 / 2, rel=0.3)  # largest at lambda_0 / 2
    # occ: lambda_t = lambda_plus * c / v2, so in lambda_plus units lambda_0 = 2 (1 - L eta) / (L eta)
    occ = predicted_curve([r for r in runs if regime_label(r) == "occ"], grid, n_boot=50)
    assert occ["lambda_0"] == pytest.approx(2 * (1 - L_TRUE * ETA) / (L_TRUE * ETA))
    # ce: c < 0, so the MTP term costs at every lambda: lambda_0 is 0 ('below the grid')
    ce = predicted_curve([r for r in runs if regime_label(r) == "ce"], grid, n_boot=50)
    assert ce["lambda_0"] == 0.0
    # an explicit eta scales L*eta (L from the Hessian term is independent of the step size)
    assert predicted_curve(policy, grid, eta=0.1, n_boot=5)["L_eta"] == pytest.approx(L_TRUE * 0.1)
    assert predicted_curve([r for r in runs if regime_label(r) == "detach"][:0], grid) is None


def test_theory_verdict_agree_disagree_and_untestable(tmp_path):
    write_table2(tmp_path / "a", seeds=3)
    runs = collect_runs(tmp_path / "a")
    measured = measured_curves(runs, ["policy", "ce", "occ"], n_boot=300)
    grid = np.geomspace(0.01, 30, 31)
    lams = [0.03, 0.1, 0.3, 1.0, 3.0]
    pred = {lab: predicted_curve([r for r in runs if regime_label(r) == lab], grid, n_boot=100) for lab in ("policy", "ce")}
    assert theory_verdict(measured["policy"]["accuracy"], pred["policy"], lams)[0] == "agree"
    assert theory_verdict(measured["ce"]["accuracy"], pred["ce"], lams)[0] == "agree"  # both: costs from the smallest
    # the same measurement against a prediction of 9.8 (v2 = 20 instead of 196)
    write_table2(tmp_path / "b", seeds=2, policy_v2=20.0)
    other = predicted_curve([r for r in collect_runs(tmp_path / "b") if regime_label(r) == "policy"], grid, n_boot=50)
    status, text = theory_verdict(measured["policy"]["accuracy"], other, lams)
    assert status == "disagree" and "do not overlap" in text
    # deltas that never leave 0 within noise place no break-even: untestable
    flat = {"break_even": math.inf, "break_even_lo": 0.0, "break_even_hi": math.inf}
    assert theory_verdict(flat, pred["policy"], lams)[0] == "untestable"
    assert theory_verdict(None, pred["policy"], lams)[0] == "no data"
    # the acceptance curve is there too (one number per run: bootstrap over seeds)
    assert measured["policy"]["acceptance"]["delta"] == pytest.approx([0.0] * 5)


def test_labels_and_missing_cells(tmp_path):
    write_run(tmp_path, regime="occ", estimator="exact", seed=0)
    write_run(tmp_path, regime="occ", estimator="reference_code", lambda_plus=0.1, seed=0)
    write_run(tmp_path, regime="policy", coef=0.3, seed=1, finished=False)
    runs = collect_runs(tmp_path)
    assert sorted(regime_label(r) for r in runs) == ["occ_exact", "occ_reference", "policy"]
    assert sorted(cell_label(r) for r in runs) == ["occ_exact λ=1", "occ_reference λ=0.1", "policy λ=0.3"]
    expected = [("policy λ=0.3", 0), ("policy λ=0.3", 1), ("occ_exact λ=1", 0)]
    assert missing_cells(runs, expected, cell_label) == {"policy λ=0.3": [0, 1]}  # seed 1 is unfinished


def test_spearman_and_agreement():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)  # ties share their rank
    a = agreement([0.0, 1.0, -1.0, 2.0], [1.0, 1.0, 1.0, 0.0], n_boot=50)  # lambda* = 0 is left out
    assert a["n"] == 3 and a["sign"] == pytest.approx(1 / 3) and a["zero"] == pytest.approx(1 / 3)


def test_proxy_observations_by_mini_batch_index(tmp_path):
    # the learner logs only the last mini-batch (unsuffixed): index num_mini_batches - 1
    write_run(tmp_path / "a", regime="occ", seed=0, lambda_plus=10.0)
    obs = proxy_observations(collect_runs(tmp_path / "a"))
    assert {o["mb"] for o in obs} == {3} and len(obs) == 4
    assert obs[0]["star"] == pytest.approx(1.0 / 196.0)  # divided by lambda_plus
    rows = proxy_table(obs, n_boot=50)
    by = {(r["by"], r["estimator"]): r for r in rows if r["group"].startswith("4")}
    assert by[("mini-batch", "paper")]["sign"] == 1.0 and by[("mini-batch", "reference_code")]["sign"] == 0.0
    assert by[("mini-batch", "paper_in_clip")]["zero"] == 1.0
    # per-mini-batch metrics diag/<name>_mb<i>, when the learner logs them
    d = tmp_path / "b" / "run"
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": 0, "regime": {"name": "policy", "coef": 0.1, "estimator": "paper",
                                                           "head_ce": 0.0}}), d / ".hydra" / "config.yaml")
    row = {"step": 10, **{f"diag/lambda_star_mb{i}": 0.1 * (i + 1) for i in range(4)},
           **{f"diag/lambda_proxy_mb{i}": 0.0 if i == 0 else 0.05 * i for i in range(4)}}
    (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    obs = proxy_observations(collect_runs(tmp_path / "b"))
    assert [o["mb"] for o in obs] == [0, 1, 2, 3] and obs[0]["paper"] == 0.0 and obs[0]["reference_code"] is None
    groups = [r["group"] for r in proxy_table(obs, n_boot=10) if r["by"] == "mini-batch"]
    assert groups[0] == "1 (on-policy: d_rl = 0)"


# -- scripts/reproduce.py on synthetic runs: --report-only and --plan (no training) -------------------
def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _write_sweeps(runs_dir, seeds=3, steps=20):
    t1, t2 = runs_dir / "table1_20steps", runs_dir / "table2_20steps"
    for s in range(seeds):
        write_run(t1, regime="detach", seed=s, c=0.0, v2=0.0, steps=steps)
        write_run(t1, regime="ce", seed=s, coef=0.1, delta=-0.04, c=-0.1, v2=50.0, steps=steps, salt=11)
        write_run(t1, regime="policy", seed=s, coef=0.1, delta=curve(0.1), steps=steps, salt=1)
        write_run(t1, regime="occ", seed=s, delta=0.0, c=1.0, v2=10.0, steps=steps, accept=0.85)
        write_run(t1, regime="occ", estimator="exact", seed=s, delta=0.01, c=1.0, v2=10.0, steps=steps, sps=3.0)
        for i, lam in enumerate([0.03, 0.3, 1.0, 3.0]):
            write_run(t2, regime="policy", seed=s, coef=lam, delta=curve(lam), steps=steps, salt=2 + i)
            write_run(t2, regime="ce", seed=s, coef=lam, delta=-0.02 - 0.02 * lam, c=-0.1, v2=50.0, steps=steps, salt=20 + i)
        for lp in (0.1, 10.0):
            write_run(t2, regime="occ", seed=s, lambda_plus=lp, delta=0.0, c=1.0, v2=10.0, steps=steps)


@pytest.mark.slow  # ~45 s on 2 loaded cores: the figures
def test_reproduce_report_only_writes_every_results_file(tmp_path, capsys):
    rep = _reproduce()
    runs, res = tmp_path / "runs", tmp_path / "results"
    _write_sweeps(runs)
    common = ["--steps", "20", "--seeds", "3", "--runs", str(runs), "--results", str(res), "--report-only",
              "--boot", "200"]
    for what in ("table1", "table2", "proxy", "figure4", "findings"):
        assert rep.main([what, *common]) == 0
    names = sorted(p.name for p in res.iterdir() if p.is_file())
    assert names == sorted(["FINDINGS_20steps.md", "figure4_tiny_20steps.png", "proxy_tiny_20steps.json",
                            "proxy_tiny_20steps.md", "proxy_tiny_20steps.png", "table1_tiny_20steps.csv",
                            "table1_tiny_20steps.json", "table1_tiny_20steps.md", "table2_tiny_20steps.csv",
                            "table2_tiny_20steps.json", "table2_tiny_20steps.md", "table2_tiny_20steps.png"])
    t1 = (res / "table1_tiny_20steps.md").read_text()
    assert "python scripts/reproduce.py table1 --steps 20" in t1 and "--report-only" not in t1
    assert "occ_reference: seed 0, 1, 2" in t1  # the cells never run are named
    assert "| occ_exact | 3 |" in t1 and "| 58.9 |" in t1  # the oracle row; the paper's detach beside
    t2 = (res / "table2_tiny_20steps.md").read_text()
    assert "All cells finished." in t2 and "| policy λ=3 | 3 |" in t2 and "| occ λ=10 | 3 |" in t2
    assert "- **policy**: agree:" in t2 and "- **ce**: agree:" in t2
    assert "signs by λ" in t2 and "disagree at" not in t2  # the synthetic runs follow the theory exactly
    summary = rep.read_json(res / "table2_tiny_20steps.json")
    assert summary["predicted"]["policy"]["L_eta"] == pytest.approx(L_TRUE * ETA)
    assert summary["predicted"]["occ"]["lambda_0"] == pytest.approx(98.0)
    assert [r["status"] for r in summary["signs"]["policy"] if r["measured"] != "0"] == ["agree"] * 5
    findings = (res / "FINDINGS_20steps.md").read_text()
    assert "**policy** (agree)" in findings and "L·η = 0.02" in findings
    assert re.search(r"Sign check over the \d+ measured \(regime, λ\) cells: \d+ agree, 0 disagree", findings)
    assert "Suggestion for a real-scale run" in findings and "paper" in findings.split("Suggestion")[1]
    assert "per-mini-batch diagnostics" in findings  # only the last mini-batch is logged in these runs
    csv_head = (res / "table1_tiny_20steps.csv").read_text().splitlines()[0]
    assert csv_head.endswith(",paper")


def test_a_report_built_while_a_sweep_runs_reads_only_finished_runs(tmp_path):
    """A run still training (no eval.json yet) has diagnosed steps in its metrics; the prediction and
    the proxy's table must not take them in, or a report would depend on when it was built."""
    rep = _reproduce()
    runs, res = tmp_path / "runs", tmp_path / "results"
    _write_sweeps(runs)
    common = ["--steps", "20", "--seeds", "3", "--runs", str(runs), "--results", str(res), "--report-only",
              "--boot", "50"]
    assert rep.main(["table2", *common]) == 0 and rep.main(["proxy", *common]) == 0
    before = rep.read_json(res / "table2_tiny_20steps.json")["predicted"], (res / "proxy_tiny_20steps.md").read_text()
    # policy λ=0.3 seed 0 again, still running: other exact terms (v2 = 1), no final evaluation
    write_run(runs / "table2_20steps" / "running", regime="policy", seed=0, coef=0.3, v2=1.0, steps=20, finished=False)
    assert rep.main(["table2", *common]) == 0 and rep.main(["proxy", *common]) == 0
    after = rep.read_json(res / "table2_tiny_20steps.json")["predicted"], (res / "proxy_tiny_20steps.md").read_text()
    assert after[0] == before[0]
    assert after[1].split("\n", 3)[3] == before[1].split("\n", 3)[3]  # all but the header (command, commit)


def test_reproduce_plan_counts_what_is_left(tmp_path, capsys):
    rep = _reproduce()
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match="--sec-per-step"):
        rep.main(["table1", "--plan", "--runs", str(runs), "--results", str(tmp_path / "r")])
    rep.main(["table1", "--plan", "--steps", "10", "--seeds", "2", "--jobs", "1", "--sec-per-step", "1.5",
              "--runs", str(runs), "--results", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "| occ_exact λ=1 | 2 | 20 | 1.50 (--sec-per-step) | 30 |" in out
    assert "12 runs, 120 steps left" in out  # 6 regimes x 2 seeds x 10 steps
    _write_sweeps(runs, seeds=1)  # seed 0 of the 20-step sweeps finished: measured s/step, fewer steps left
    rep.main(["table1", "--plan", "--steps", "20", "--seeds", "2", "--jobs", "1", "--runs", str(runs),
              "--results", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "| occ_exact λ=1 | 2 | 20 | 3.00 (measured) | 60 |" in out
    assert "| occ_reference λ=1 | 2 | 40 |" in out and "(measured, all regimes)" in out


def test_run_summary_lines(tmp_path):
    """What `python -m occ_exp.train` prints when a run ends: accuracy before -> after, lambda_t,
    acceptance, and exact c / v2 only where steps were diagnosed."""
    from occ_exp.tracking import run_summary

    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/n": 16},
            {"step": 1, "mtp/coef": 0.01, "mtp/acceptance": 0.5},
            {"step": 2, "mtp/coef": 0.03, "mtp/acceptance": 0.6, "eval/accuracy": 0.5, "eval/n": 32}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = run_summary(tmp_path / "metrics.jsonl")
    assert lines == ["held-out accuracy 0.250 (step 0, n=16) -> 0.500 (step 2, n=32)",
                     "lambda_t mean +0.02, last +0.03 (2 steps)", "MTP acceptance 0.500 -> 0.600"]
    rows[2].update({"diag/corr": 0.002, "diag/penalty": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_summary(tmp_path / "metrics.jsonl")[-1] == "exact c mean +0.002, v2 mean 0.5 (1 diagnosed steps)"


def test_findings_with_a_regime_not_run_yet():
    t2 = {"file": "results/table2_tiny.md", "command": "python scripts/reproduce.py table2", "commit": "abc",
          "verdicts": {"policy": ["untestable", "no break-even inside the grid"], "occ_exact": ["no data", "no runs"]},
          "predicted": {"policy": {"L_eta": 1.6, "L_eta_lo": 0.5, "L_eta_hi": 2.8, "eta_source": "taylor_eta", "c": 0.02,
                                   "v2": 0.35, "steps": 80},
                        "occ_exact": None},
          "measured": {"policy": {"accuracy": {"lams": [0.1], "delta": [0.2], "lo": [-1.6], "hi": [1.9]}},
                       "occ_exact": None},
          "missing": []}
    md = findings_markdown(None, t2, None, "python scripts/reproduce.py findings", "abc")
    assert "**policy** (untestable)" in md and "0.1: +0.2 [-1.6, +1.9]" in md
    assert "**occ_exact** (no data)" in md
    assert "Caveat" in md  # the policy row's eta came from the Taylor check


def test_collapsed_runs_are_named_with_the_step_their_reward_stayed_at_zero_from():
    from occ_exp.report import collapsed_markdown, collapsed_runs

    healthy = [{"step": s, "reward/mean": 0.3 if s % 7 else 0.0} for s in range(1, 41)]  # a zero now and then
    broken = [{"step": s, "reward/mean": 0.4 if s < 25 else (0.06 if s == 26 else 0.01)} for s in range(1, 41)]
    runs = [_run("detach", 0, 0.5, rows=healthy), _run("ce", 1, 0.0, rows=broken)]
    got = collapsed_runs(runs, regime_label)
    assert got == [{"label": "ce", "seed": 1, "from_step": 27, "final_accuracy": 0.0}]
    assert "ce: seed 1 (from step 27)" in collapsed_markdown(got)
    assert collapsed_markdown([]) == ""


def _occ_t2(lo: float, hi: float) -> dict:
    occ = {"L_eta": 33.4, "L_eta_lo": -4.6, "L_eta_hi": 41.4, "eta_source": "update/gradient norm", "c": -9.7e-5,
           "v2": 1.1e-5, "steps": 120, "lambda_0": 17.2, "lambda_0_lo": lo, "lambda_0_hi": hi}
    return {"file": "results/table2_tiny.md", "command": "python scripts/reproduce.py table2", "commit": "abc",
            "verdicts": {"occ": ["untestable", "no break-even inside the grid"]}, "predicted": {"occ": occ},
            "measured": {"occ": {"accuracy": {"lams": [1.0], "delta": [-1.0], "lo": [-2.9], "hi": [0.7]}}},
            "missing": []}


def test_findings_suggest_the_theorys_lambda_plus_only_when_its_interval_is_resolved():
    """The suggestion used to read "λ0/2 = 8.61 [0, inf]: start there": an optimum whose interval
    spans every lambda is no guidance, and a researcher would have started a 128-GPU run there."""
    unresolved = findings_markdown(None, _occ_t2(0.0, math.inf), None, "python scripts/reproduce.py findings", "abc")
    line = next(s for s in unresolved.splitlines() if s.startswith("- λ_plus"))
    assert "start there" not in line and "not resolved" in line and "8.6" in line
    resolved = findings_markdown(None, _occ_t2(4.0, 30.0), None, "python scripts/reproduce.py findings", "abc")
    line = next(s for s in resolved.splitlines() if s.startswith("- λ_plus"))
    assert "λ0/2 = 8.6 [2, 15]: start there" in line


def test_sign_check_compares_measured_and_predicted_signs_at_each_lambda(tmp_path):
    """The break-even verdict looks at one crossing; the sign check looks at every measured lambda: a
    prediction that says "gain" where the measurement resolves a loss is a disagreement, and a
    prediction whose interval spans 0 (ce: curvature along its direction not resolved) is named as
    unresolved instead of counting as agreement."""
    from occ_exp.report import sign_check

    write_table2(tmp_path / "a", seeds=3)
    runs = collect_runs(tmp_path / "a")
    measured = measured_curves(runs, ["policy"], n_boot=300)["policy"]["accuracy"]
    grid = np.geomspace(0.01, 30, 31)
    pred = predicted_curve([r for r in runs if regime_label(r) == "policy"], grid, n_boot=100)
    rows = sign_check(measured, pred)
    assert [r["lam"] for r in rows] == [0.03, 0.1, 0.3, 1.0, 3.0]
    assert {r["status"] for r in rows if r["measured"] != "0"} == {"agree"}
    assert rows[-1]["measured"] == "−" and rows[-1]["predicted"] == "−"
    # the same measurement against a prediction of lambda_0 = 9.8: a gain predicted where a loss is measured
    write_table2(tmp_path / "b", seeds=2, policy_v2=20.0)
    other = predicted_curve([r for r in collect_runs(tmp_path / "b") if regime_label(r) == "policy"], grid, n_boot=50)
    rows = sign_check(measured, other)
    assert rows[-1]["status"] == "disagree" and rows[-1]["predicted"] == "+"
    # a prediction whose interval spans 0 is unresolved, whatever its point says
    wide = {**pred, "gain_lo": [-1.0] * len(grid), "gain_hi": [1.0] * len(grid)}
    assert {r["status"] for r in sign_check(measured, wide)} == {"unresolved"}
    assert sign_check(None, pred) == [] and sign_check(measured, None) == []
    text = sign_markdown(sign_check(measured, other))
    assert "1 −/+(+), 3 −/+(+)" in text and "disagree at λ = 1, 3" in text and "at 3 of the 5 λ" in text
