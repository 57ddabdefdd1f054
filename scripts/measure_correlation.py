"""Measure the exact correlation c = <g_RL, g_MTP> on the tiny model, per regime, across batches.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/measure_correlation.py [--steps 40] [--regimes ce policy occ]
        [--warmstart-steps 300] [override ...]

Trains each regime from the same cached warm start with `diagnostics.exact_every=1` (exact c, v2
on every step's last mini-batch) and summarises `diag/*` from its metrics.jsonl:

- ce: is c centred near zero relative to its spread across batches (the paper's argument that the
  CE objective is nearly orthogonal to the RL gradient)? mean / std and the t statistic.
- policy: does c (and the scale-free cosine) start positive and decay? early vs late thirds, slope.
- every regime: how often the cheap estimators (paper's proxy, reference_code, paper_in_clip) agree
  in sign with lambda* from the exact gradients on the same mini-batch.

Writes results/correlation_tiny.json and .md, figures in results/correlation_tiny/ and the runs in
outputs/measure_correlation/<regime>/ (plot again with `python -m occ_exp.plot outputs/measure_correlation`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

ESTIMATOR_KEYS = {"paper": "diag/lambda_proxy", "reference_code": "diag/lambda_reference_code",
                  "paper_in_clip": "diag/lambda_paper_in_clip"}


def _stats(x: list[float]) -> dict:
    n = len(x)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(x)
    std = statistics.stdev(x) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "median": statistics.median(x),
            "mean_over_std": mean / std if std > 0 else None,
            "t_stat": mean / (std / math.sqrt(n)) if std > 0 else None,
            "frac_positive": sum(v > 0 for v in x) / n}


def _trend(steps: list[int], x: list[float]) -> dict:
    n = len(x)
    if n < 6:
        return {}
    third = n // 3
    s, y = np.array(steps, float), np.array(x, float)
    slope, icpt = np.polyfit(s, y, 1)
    resid = y - (slope * s + icpt)
    se = math.sqrt(float(resid @ resid) / (n - 2) / float(((s - s.mean()) ** 2).sum()))
    return {"early_mean": float(y[:third].mean()), "late_mean": float(y[-third:].mean()),
            "slope_per_step": float(slope), "slope_se": se}


def summarise(rows: list[dict]) -> dict:
    diagnosed = [r for r in rows if "diag/corr" in r]
    # a mini-batch whose groups all got equal rewards has zero advantages, so g_RL = 0 and c = 0
    # exactly: it says nothing about the angle between the objectives; the statistics skip it
    diag = [r for r in diagnosed if r["diag/g_rl_norm"] > 0]
    steps = [r["step"] for r in diag]
    out = {"n_diagnosed": len(diagnosed), "n_with_rl_signal": len(diag),
           "corr": _stats([r["diag/corr"] for r in diag]), "cosine": _stats([r["diag/cosine"] for r in diag]),
           "penalty": _stats([r["diag/penalty"] for r in diag]),
           "lambda_star": _stats([r["diag/lambda_star"] for r in diag]),
           "corr_trend": _trend(steps, [r["diag/corr"] for r in diag]),
           "cosine_trend": _trend(steps, [r["diag/cosine"] for r in diag])}
    out["median_abs_lambda"] = {name: statistics.median(abs(r[key]) for r in diag) if diag else None
                                for name, key in {"exact": "diag/lambda_star", **ESTIMATOR_KEYS}.items()}
    agree = {}
    for name, key in ESTIMATOR_KEYS.items():
        pairs = [(r["diag/lambda_star"], r[key]) for r in diag if key in r and r["diag/lambda_star"] != 0 and r[key] != 0]
        agree[name] = {"n": len(pairs), "rate": (sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs)) if pairs else None}
    out["sign_agreement_with_exact"] = agree
    coefs = [r["mtp/coef"] for r in rows if "mtp/coef" in r]
    out["lambda_applied"] = {**_stats(coefs), "median_abs": statistics.median(map(abs, coefs)) if coefs else None,
                             "frac_negative": sum(c < 0 for c in coefs) / len(coefs) if coefs else None}
    acc = [r["mtp/acceptance"] for r in rows if "mtp/acceptance" in r]
    out["acceptance_first_last"] = [acc[0], acc[-1]] if acc else None
    ev = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    out["eval_accuracy_first_last"] = [ev[0], ev[-1]] if ev else None
    return out


def verdicts(regimes: dict) -> list[str]:
    """The two questions of the issue, answered from the numbers (|t| < 2: not distinguishable from 0)."""
    out = []
    if "ce" in regimes and regimes["ce"]["corr"].get("t_stat") is not None:
        c = regimes["ce"]["corr"]
        centred = abs(c["t_stat"]) < 2
        out.append(f"- ce: mean c / std across batches = {_fmt(c['mean_over_std'])} (t = {_fmt(c['t_stat'])}, n = {c['n']}): "
                   + ("centred near zero relative to its spread, as the paper argues." if centred
                      else "NOT centred at zero relative to its spread."))
    for regime in ("policy", "occ"):
        if regime not in regimes or regimes[regime]["corr"].get("t_stat") is None:
            continue
        c, tr = regimes[regime]["corr"], regimes[regime]["cosine_trend"]
        positive = c["t_stat"] >= 2
        decays = tr and tr["slope_per_step"] + 2 * tr["slope_se"] < 0
        out.append(f"- {regime}: c > 0 on {_fmt(c['frac_positive'])} of batches (t = {_fmt(c['t_stat'])}): "
                   + ("positive" if positive else "not distinguishable from 0")
                   + (f"; cosine {_fmt(tr['early_mean'])} (first third) -> {_fmt(tr['late_mean'])} (last third), slope "
                      f"{_fmt(tr['slope_per_step'])} +- {_fmt(tr['slope_se'])} per step: "
                      + ("it decays." if decays else "no decay detectable over this run.") if tr else "."))
    out.append("- Sign agreement is meaningful for policy / occ, whose MTP loss is the one the proxy is built for; "
               "under ce lambda* is the CE term's, the proxy the policy term's.")
    return out


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.{nd}f}"
    return str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--regimes", nargs="+", default=["ce", "policy", "occ"])
    p.add_argument("--warmstart-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "correlation_tiny"))
    p.add_argument("--runs", default=str(ROOT / "outputs" / "measure_correlation"))
    p.add_argument("--reuse", action="store_true", help="summarise existing runs of --steps steps instead of retraining")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bench_mtp_cost import compose

    from occ_exp.plot import plot_dir
    from occ_exp.tracking import read_metrics
    from occ_exp.trainer import train

    common = [
        f"seed={args.seed}", f"trainer.total_steps={args.steps}", "diagnostics.exact_every=1",
        f"model.warmstart.steps={args.warmstart_steps}", "model.warmstart.eval_problems=128",
        "data.prompts_per_step=16", "algorithm.group_size=8", "algorithm.num_mini_batches=4",
        "trainer.eval_every=0", "trainer.eval_before_train=true", "trainer.eval_problems=128",
        "trainer.final_eval_problems=128", "trainer.save_every=0", "trainer.progress=false",
        f"trainer.threads={args.threads}", f"paths.cache_dir={ROOT / '.cache'}", *args.overrides,
    ]
    results = {"command": "OMP_NUM_THREADS=%s PYTHONPATH=src python scripts/measure_correlation.py --steps %d "
                          "--regimes %s --warmstart-steps %d --seed %d %s"
                          % (os.environ.get("OMP_NUM_THREADS", "?"), args.steps, " ".join(args.regimes),
                             args.warmstart_steps, args.seed, " ".join(args.overrides)),
               "overrides": common, "regimes": {}}
    for regime in args.regimes:
        run_dir, t0 = Path(args.runs) / regime, time.perf_counter()
        metrics = run_dir / "metrics.jsonl"
        done = metrics.exists() and any(r["step"] == args.steps for r in read_metrics(metrics))
        trained = not (args.reuse and done)
        if trained:
            metrics.unlink(missing_ok=True)
            train(compose(common + [f"regime={regime}", "trainer.resume=never"]), run_dir, log=lambda m: print(m, flush=True))
        rows = read_metrics(metrics)
        results["regimes"][regime] = {"train_wall_s": time.perf_counter() - t0 if trained else None, **summarise(rows)}
        print(regime, json.dumps(results["regimes"][regime]["corr"]), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plots = plot_dir(args.runs, out)
    lines = ["# Exact correlation c = <g_RL, g_MTP> on the tiny model", "", f"`{results['command']}`", "",
             "Overrides of every run: `" + " ".join(common) + "`", "",
             "c, v2 and lambda* are measured on each step's last mini-batch (of 4) with the regime's own MTP loss "
             "(CE for ce, the clipped policy loss of the head for policy / occ), on the trunk parameters. "
             "Statistics use the diagnosed steps whose mini-batch had an RL signal (some group with unequal "
             "rewards, so g_RL != 0): n of them out of the diagnosed steps.", "",
             "| regime | n | c mean | c std | mean/std | t | c > 0 | cosine mean | cosine early -> late | cosine slope/step (se) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for regime, r in results["regimes"].items():
        c, cs, tr = r["corr"], r["cosine"], r["cosine_trend"]
        lines.append(f"| {regime} | {c['n']}/{r['n_diagnosed']} | {_fmt(c.get('mean'))} | {_fmt(c.get('std'))} | {_fmt(c.get('mean_over_std'))} "
                     f"| {_fmt(c.get('t_stat'))} | {_fmt(c.get('frac_positive'))} | {_fmt(cs.get('mean'))} "
                     f"| {_fmt(tr.get('early_mean'))} -> {_fmt(tr.get('late_mean'))} "
                     f"| {_fmt(tr.get('slope_per_step'))} ({_fmt(tr.get('slope_se'))}) |")
    lines += ["", *verdicts(results["regimes"])]
    lines += ["", "Sign agreement with lambda* (exact) on the same mini-batch (steps where both are non-zero):", "",
              "| regime | paper | reference_code | paper_in_clip | applied lambda: median abs, share < 0 | acceptance first -> last | eval acc first -> last |",
              "|---|---|---|---|---|---|---|"]
    for regime, r in results["regimes"].items():
        ag = r["sign_agreement_with_exact"]
        la = r["lambda_applied"]
        acc, ev = r["acceptance_first_last"] or [None, None], r["eval_accuracy_first_last"] or [None, None]
        cells = [f"{_fmt(ag[n]['rate'])} (n={ag[n]['n']})" for n in ESTIMATOR_KEYS]
        lines.append(f"| {regime} | " + " | ".join(cells) + f" | {_fmt(la['median_abs'])}, {_fmt(la['frac_negative'])} "
                     f"| {_fmt(acc[0])} -> {_fmt(acc[1])} | {_fmt(ev[0])} -> {_fmt(ev[1])} |")
    lines += ["", "Typical size of lambda on the same mini-batches (median |lambda|, lambda_plus = 1):", "",
              "| regime | exact lambda* | " + " | ".join(ESTIMATOR_KEYS) + " |", "|---|---|" + "---|" * len(ESTIMATOR_KEYS)]
    for regime, r in results["regimes"].items():
        m = r["median_abs_lambda"]
        lines.append(f"| {regime} | {_fmt(m['exact'])} | " + " | ".join(_fmt(m[n]) for n in ESTIMATOR_KEYS) + " |")
    lines += ["", "Figures: " + ", ".join(f"`{os.path.relpath(x, ROOT)}`" for x in plots), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
