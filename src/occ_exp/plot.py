"""Figures from metrics files: `python -m occ_exp.plot <run dir or multirun dir> [--out DIR] [--smooth N]`.

Finds every `metrics.jsonl` below the directory, labels each run by its regime (from the run's
`.hydra/` files: the regime name plus any override other than seed / trainer / logger / paths),
averages runs that share a label (seeds) with a min-max band, and writes one PNG per figure into
`<dir>/plots/` (or --out), one line per label:

    lambda.png      the applied lambda_t (`mtp/coef`) and, on diagnosed steps, lambda* from the
                    exact gradients (`diag/lambda_star`): the paper's Figure 4
    corr.png        c: the proxy c_hat (`mtp/corr_proxy`) and the exact c (`diag/corr`)
    penalty.png     v2: the proxy v2_hat (`mtp/penalty_proxy`) and the exact v2 (`diag/penalty`)
    reward.png      `reward/mean`
    accuracy.png    `eval/accuracy` (greedy, held out)
    acceptance.png  `mtp/acceptance` (expected speculative acceptance of the depth-1 head)

A figure whose metrics no run logged is skipped (exact c and v2 need `diagnostics.exact_every`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf

from occ_exp.tracking import read_metrics

# file name -> (figure title, [(metric key, panel title)])
FIGURES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "lambda": ("MTP coefficient lambda_t", [("mtp/coef", "applied lambda_t"),
                                             ("diag/lambda_star", "lambda* = lambda_plus c / v2 (exact)")]),
    "corr": ("correlation c = <g_RL, g_MTP>", [("mtp/corr_proxy", "proxy c_hat"), ("diag/corr", "exact c")]),
    "penalty": ("penalty v2 = ||g_MTP||^2", [("mtp/penalty_proxy", "proxy v2_hat"), ("diag/penalty", "exact v2")]),
    "reward": ("training reward", [("reward/mean", "reward/mean")]),
    "accuracy": ("held-out accuracy (greedy)", [("eval/accuracy", "eval/accuracy")]),
    "acceptance": ("MTP head expected acceptance", [("mtp/acceptance", "sum_v min(p, q), depth 1")]),
}
SIGNED = ("mtp/coef", "diag/lambda_star", "mtp/corr_proxy", "diag/corr")  # drawn with a zero line
_IGNORED_OVERRIDES = ("seed=", "regime=", "trainer.", "logger", "hydra.", "paths.", "run_name")


def run_label(run_dir: Path) -> str:
    """The regime name plus the overrides that distinguish this run from its seed siblings."""
    hydra_dir = run_dir / ".hydra"
    cfg_path = hydra_dir / "config.yaml"
    if not cfg_path.exists():
        return run_dir.name
    name = str(OmegaConf.load(cfg_path).regime.name)
    over_path = hydra_dir / "overrides.yaml"
    extra = []
    if over_path.exists():
        extra = [o for o in OmegaConf.to_container(OmegaConf.load(over_path)) if not o.startswith(_IGNORED_OVERRIDES)]
        # a regime file other than the registry name (regime=occ_exact: name occ, estimator exact) labels the run
        name = next((o.split("=", 1)[1] for o in OmegaConf.to_container(OmegaConf.load(over_path))
                     if o.startswith("regime=")), name)
    return " ".join([name, *sorted(extra)])


def find_runs(root: Path) -> dict[str, list[list[dict]]]:
    """label -> list of runs (each a list of metric rows)."""
    runs: dict[str, list[list[dict]]] = defaultdict(list)
    for path in sorted(root.rglob("metrics.jsonl")):
        rows = read_metrics(path)
        if rows:
            runs[run_label(path.parent)].append(rows)
    return dict(runs)


def series(rows: list[dict], key: str) -> dict[int, float]:
    out = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[int(r["step"])] = float(v)
    return out


def aggregate(runs: list[list[dict]], key: str, smooth: int = 1):
    """Steps, mean, min and max over runs (each run's values first smoothed by a trailing mean)."""
    per_run = []
    for rows in runs:
        s = series(rows, key)
        if smooth > 1 and s:
            steps = sorted(s)
            vals = np.array([s[t] for t in steps])
            csum = np.cumsum(np.insert(vals, 0, 0.0))
            lo = np.maximum(np.arange(len(vals)) - smooth + 1, 0)
            s = dict(zip(steps, (csum[1:] - csum[lo]) / (np.arange(len(vals)) + 1 - lo)))
        per_run.append(s)
    steps = sorted(set().union(*per_run)) if per_run else []
    if not steps:
        return None
    vals = [[s[t] for s in per_run if t in s] for t in steps]
    return (np.array(steps), np.array([np.mean(v) for v in vals]), np.array([min(v) for v in vals]),
            np.array([max(v) for v in vals]))


def _set_scale(ax, key: str, per_label: list[np.ndarray]) -> None:
    """A log (signed: symlog) axis when the lines differ by more than 100x in typical size, e.g.
    occ's lambda_t of 1e-3 next to a fixed 0.1, which a linear axis would flatten to zero."""
    typical = [float(np.median(v[v > 0])) for v in per_label if (v > 0).any()]
    if not typical or max(float(v.max()) for v in per_label) <= 100 * min(typical):
        return
    if key in SIGNED:
        ax.set_yscale("symlog", linthresh=0.5 * min(typical))
    elif all((v > 0).all() for v in per_label):
        ax.set_yscale("log")


def plot_dir(root: str | Path, out: str | Path | None = None, smooth: int = 1) -> list[Path]:
    matplotlib.use("Agg")  # figures go to files: no display needed
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass a run directory or a multirun directory")
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl below {root}; pass the run (or multirun) directory of a training run")
    out = Path(out) if out else root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    labels = sorted(runs)
    colors = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    written = []
    for fname, (title, panels) in FIGURES.items():
        data = {(key, lab): aggregate(runs[lab], key, smooth) for key, _ in panels for lab in labels}
        panels = [(k, t) for k, t in panels if any(data[(k, lab)] is not None for lab in labels)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
        for ax, (key, ptitle) in zip(axes[0], panels):
            for lab in labels:
                d = data[(key, lab)]
                if d is None:
                    continue
                steps, mean, lo, hi = d
                n = len(runs[lab])
                ax.plot(steps, mean, color=colors[lab], label=lab + (f" (n={n})" if n > 1 else ""),
                        marker="o" if len(steps) < 30 else None, ms=3)
                if n > 1:
                    ax.fill_between(steps, lo, hi, color=colors[lab], alpha=0.2, lw=0)
            _set_scale(ax, key, [np.abs(data[(key, lab)][1]) for lab in labels if data[(key, lab)] is not None])
            if key in SIGNED:
                ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
            ax.set_title(ptitle, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title + (f" (trailing mean over {smooth} steps)" if smooth > 1 else ""))
        fig.tight_layout()
        path = out / f"{fname}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# -- the theory test's figures (scripts/reproduce.py; the numbers come from occ_exp.report) ----------
def _log_axis(ax, lams) -> None:
    ax.set_xscale("log")
    ax.set_xticks(lams)
    ax.set_xticklabels([f"{x:g}" for x in lams])
    ax.axhline(0.0, color="0.6", lw=0.7, zorder=0)
    ax.grid(alpha=0.3)


def _save(fig, title: str, path: str | Path) -> Path:
    """Title, layout, write the PNG, free the figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

def response_figure(measured: dict, predicted: dict, path: str | Path, title: str) -> Path:
    """Table 2 as curves against lambda (log axis), one line per regime: (a) the accuracy delta vs
    detach with its 95% paired-bootstrap interval, (b) the predicted per-step gain of the MTP term
    with its interval (the theory), (c) the head's final acceptance delta vs detach."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(sorted(set(measured) | set(predicted)))}
    lams_all = sorted({lam for m in measured.values() for lam in m["accuracy"]["lams"]})
    for lab, m in measured.items():
        for ax, key, scale in ((axes[0], "accuracy", 1.0), (axes[2], "acceptance", 1.0)):
            c = m.get(key)
            if not c:
                continue
            x, y = np.array(c["lams"]), np.array(c["delta"]) * scale
            err = np.array([y - np.array(c["lo"]) * scale, np.array(c["hi"]) * scale - y])
            ax.errorbar(x, y, yerr=err, color=colors[lab], marker="o", capsize=3, label=lab)
        be = m["accuracy"].get("break_even")
        if be and np.isfinite(be):
            axes[0].axvline(be, color=colors[lab], ls=":", lw=1)
    ticks = lams_all or sorted({x for p in predicted.values() if p for x in p["grid"][:: max(1, len(p["grid"]) // 5)]})
    xmin, xmax = (min(ticks) / 1.5, max(ticks) * 1.5) if ticks else (None, None)
    peak = []
    for lab, p in predicted.items():
        if not p or not p.get("gain"):
            continue
        x = np.array(p["grid"])
        keep = (x >= xmin) & (x <= xmax) if ticks else np.ones(len(x), bool)
        axes[1].plot(x[keep], np.array(p["gain"])[keep], color=colors[lab], label=f"{lab} (Lη={p['L_eta']:.2g})")
        axes[1].fill_between(x[keep], np.array(p["gain_lo"])[keep], np.array(p["gain_hi"])[keep], color=colors[lab],
                             alpha=0.15, lw=0)
        peak.append(float(np.nanmax(np.abs(np.array(p["gain"])[keep]))) if keep.any() else 0.0)
        if np.isfinite(p["lambda_0"]) and p["lambda_0"] > 0 and (not ticks or xmin <= p["lambda_0"] <= xmax):
            axes[1].axvline(p["lambda_0"], color=colors[lab], ls=":", lw=1)
    if peak and max(peak) > 0:  # the gain grows as lambda^2 past lambda_0: a signed log axis keeps the small-lambda part visible
        axes[1].set_yscale("symlog", linthresh=1e-3 * max(peak))
    for ax, t in zip(axes, ("accuracy − detach (points, 95% CI); dotted: measured break-even",
                            "predicted per-step gain ηλ(1−Lη)c − Lη²λ²v2/2 (symlog); dotted: λ0",
                            "final head acceptance − detach (95% CI)")):
        _log_axis(ax, ticks)
        if ticks:
            ax.set_xlim(xmin, xmax)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("λ (fixed λ; λ_plus for occ)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, title, path)


def proxy_figure(rows: list[dict], path: str | Path, title: str) -> Path:
    """Spearman correlation (solid) and sign agreement (dashed) of each estimator with the exact
    lambda*, by mini-batch index (left) and by phase of training (right), with 95% intervals."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    ests = sorted({r["estimator"] for r in rows})
    colors = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(ests)}
    for ax, by in zip(axes, ("mini-batch", "training")):
        groups = list(dict.fromkeys(r["group"] for r in rows if r["by"] == by))
        for j, e in enumerate(ests):
            sel = {r["group"]: r for r in rows if r["by"] == by and r["estimator"] == e}
            x = np.array([i + 0.08 * (j - 1) for i, g in enumerate(groups) if g in sel])
            for key, ls in (("rho", "-"), ("sign", "--")):
                y = np.array([sel[g][key] for g in groups if g in sel], dtype=float)
                lo = np.array([sel[g][key + "_lo"] for g in groups if g in sel], dtype=float)
                hi = np.array([sel[g][key + "_hi"] for g in groups if g in sel], dtype=float)
                if len(x):
                    ax.errorbar(x, y, yerr=[y - lo, hi - y], color=colors[e], ls=ls, marker="o", capsize=3,
                                label=f"{e} ({'Spearman ρ' if key == 'rho' else 'sign agreement'})")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g.split(" (")[0] for g in groups], fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.axhline(0.0, color="0.6", lw=0.7)
        ax.axhline(0.5, color="0.85", lw=0.7, ls=":")
        ax.set_xlabel("mini-batch index (1 = on-policy)" if by == "mini-batch" else "phase of training")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, title, path)


def figure4_analog(groups: dict[str, list[list[dict]]], path: str | Path, title: str, smooth: int = 5) -> Path:
    """lambda_t (applied, every step, trailing mean over `smooth`), exact c and exact v2 (diagnosed
    steps) against step, one line per label (mean over seeds, min-max band)."""
    matplotlib.use("Agg")  # figures go to files: no display needed
    panels = [("mtp/coef", "applied λ_t", smooth), ("diag/corr", "exact c = <g_RL, g_MTP>", 1),
              ("diag/penalty", "exact v2 = ||g_MTP||²", 1)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, t, sm) in zip(axes, panels):
        per_label = []
        for i, (lab, runs) in enumerate(sorted(groups.items())):
            d = aggregate(runs, key, smooth=sm)
            if d is None:
                continue
            steps, mean, lo, hi = d
            color = plt.get_cmap("tab10")(i % 10)
            ax.plot(steps, mean, color=color, label=f"{lab} (n={len(runs)})", marker="." if sm == 1 else None)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
            per_label.append(np.abs(mean))
        if per_label:
            _set_scale(ax, key, per_label)
        if key in SIGNED:
            ax.axhline(0.0, color="0.6", lw=0.7)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, title, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m occ_exp.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run directory (holding metrics.jsonl) or a multirun directory")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: <path>/plots)")
    p.add_argument("--smooth", type=int, default=1, help="trailing mean over N steps per run (default 1: none)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    try:
        written = plot_dir(args.path, args.out, args.smooth)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
