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
