"""Reproduce the paper's Table 1, Table 2 and Figure 4 (`make reproduce-table1` etc.).

    python scripts/reproduce.py table1  [--quick] [--scale tiny|mimo7b|glm] [--jobs 2] [--seeds 4] [--steps N]
    python scripts/reproduce.py table2  [--quick] [--jobs 2] [--seeds 4]
    python scripts/reproduce.py figure4 [--quick]

At the tiny scale (default) every table is a Hydra multirun of `python -m occ_exp.train` over
regimes x seeds (experiment=table1_tiny: the paper's ratios at small size), run side by side
through the joblib launcher from ONE shared warm start, each run ending with an evaluation (avg@4, sampled)
on 1,000 held-out problems (`<run>/eval.json`). The runs live under outputs/reproduce/ (resumable:
re-running the command continues unfinished runs from their checkpoints and skips finished ones);
the aggregated tables and figures go to results/ with the command, commit and wall time.

At real scale (`--scale mimo7b`) the script composes the paper's presets, prints each run's plan
(`trainer.dry_run=true`: world size, memory per GPU, tokens per step, no weights loaded) and the
commands that launch them locally with torchrun or on Slurm; `--launch` submits them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from occ_exp.report import (  # noqa: E402
    PAPER_TABLE1, PAPER_TABLE2_NOTE, collect_runs, mechanism_markdown, ordering_verdict, regime_table, table_markdown,
    write_csv,
)
from occ_exp.threads import JOBS_ENV  # noqa: E402

REGIMES = ["detach", "ce", "policy", "occ"]
TABLE2_LAMBDAS = [0.1, 0.2, 0.5, 1.0]
RESULTS = ROOT / "results"
RUNS = ROOT / "outputs" / "reproduce"
REPORT_ONLY = False  # --report-only: tables and figures from the runs already under RUNS


def sh(cmd: list[str], **kw) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def experiment(quick: bool) -> str:
    return "table1_tiny_quick" if quick else "table1_tiny"


def warm_start(quick: bool) -> None:
    """Fill the shared warm-start cache once, before the parallel runs (they would otherwise queue
    on its lock): a zero-step run builds the model, which warm-starts it."""
    if REPORT_ONLY:
        return
    sh([sys.executable, "-m", "occ_exp.train", f"experiment={experiment(quick)}", "trainer.total_steps=0",
        "trainer.eval_before_train=false", "trainer.threads=0", "logger=none",
        f"hydra.run.dir={RUNS / 'warmstart'}"])


def multirun(name: str, sweep: list[str], quick: bool, jobs: int, steps: int | None = None) -> Path:
    """One Hydra multirun (resumable: each point continues from its newest checkpoint)."""
    out = RUNS / name
    if REPORT_ONLY:  # aggregate what is there, run nothing
        if not out.exists():
            raise SystemExit(f"--report-only: no runs under {out}; run the command without --report-only first")
        return out
    if steps:  # a shorter (or longer) run than the experiment's, in its own folder
        sweep = [*sweep, f"trainer.total_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           JOBS_ENV: str(jobs)}  # the runs' thread policy divides the cores among the jobs (occ_exp.threads)
    t0 = time.time()
    sh([sys.executable, "-m", "occ_exp.train", "-m", f"experiment={experiment(quick)}", *sweep,
        "hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={out}"], env=env)
    # Wall time over every invocation (a resumed or re-run sweep adds to it; finished runs cost seconds)
    total = run_seconds(out) + time.time() - t0
    (out / "wall.json").write_text(json.dumps({"seconds": total}))
    return out


def run_seconds(out: Path) -> float:
    """Wall time the sweep in `out` has taken so far, over all invocations (0 if never recorded)."""
    f = out / "wall.json"
    return float(json.loads(f.read_text())["seconds"]) if f.exists() else 0.0


def header(title: str, cmd: str, seconds: float, runs: Path) -> str:
    import torch

    return (f"# {title}\n\n"
            f"Produced by `{cmd}` (tables built at commit `{git_commit()}`); the runs took {seconds / 60:.1f} min of wall time on "
            f"{platform.machine()} ({os.cpu_count()} CPU cores, torch {torch.__version__}); runs under "
            f"`{runs.relative_to(ROOT)}/` (not committed).\n")


def seeds_arg(n: int) -> str:
    return "seed=" + ",".join(str(s) for s in range(n))


# -- Table 1 ------------------------------------------------------------------------------------
def table1(args) -> None:
    if args.scale != "tiny":
        return plan_real(args)
    warm_start(args.quick)
    root = multirun("table1" + args.suffix, ["regime=" + ",".join(REGIMES), seeds_arg(args.seeds)],
                    args.quick, args.jobs, args.steps)
    runs = [r for r in collect_runs(root) if r.coef == 0.1 or r.regime in ("detach", "occ")]
    table = regime_table(runs, lambda r: r.regime, REGIMES)
    suffix = args.suffix
    md = [header("Table 1 at the tiny scale" + (" (quick)" if args.quick else ""), args.command,
                 run_seconds(root), root),
          "Final accuracy on 1,000 held-out countdown problems (points; avg@4 of sampled answers at temperature "
          "1.0, the paper's avg@32 at a smaller k), mean ± standard deviation over "
          "seeds; Δ vs detach with a 95% bootstrap interval over seeds (paired) and problems (paired); MTP "
          "acceptance = expected speculative acceptance of the depth-1 head over the last 10 steps.\n",
          table_markdown(table), "", "## Mechanism", "",
          "Over all steps of all seeds: the exact terms on the diagnosed steps (every "
          "`diagnostics.exact_every` steps, on the trunk: λ* = c / v2, c = <g_RL, g_MTP>) beside the proxy's "
          "(occ's applied λ_t = ĉ / v̂2; logged, not applied, for the other regimes). detach's exact terms are 0 "
          "by construction (no MTP gradient reaches the trunk).", "",
          mechanism_markdown(runs, lambda r: r.regime, REGIMES), "",
          ordering_verdict(table), "",
          "## The paper (for comparison; a different scale, not reproduced here)", "",
          "Average over six math benchmarks, avg@32:", "",
          "| setting | detach | ce | policy | occ |", "|---|---|---|---|---|",
          *[f"| {k} | " + " | ".join(f"{v[r]:.1f}" for r in REGIMES) + " |" for k, v in PAPER_TABLE1.items()], ""]
    figures = make_figures(root, suffix)
    md += [f"![{p.stem}]({p.name})" for p in figures]
    (RESULTS / f"table1_tiny{suffix}.md").write_text("\n".join(md) + "\n")
    write_csv(table, RESULTS / f"table1_tiny{suffix}.csv")
    print("\n".join(md))


# -- Table 2 ------------------------------------------------------------------------------------
def table2(args) -> None:
    warm_start(args.quick)
    suffix = args.suffix
    # lambda = 0.1 of policy and ce, detach and occ are Table 1's runs (same experiment): run the rest
    t1 = multirun("table1" + suffix, ["regime=" + ",".join(REGIMES), seeds_arg(args.seeds)], args.quick, args.jobs,
                  args.steps)
    t2 = multirun("table2" + suffix, ["regime=policy,ce", "regime.coef=" + ",".join(map(str, TABLE2_LAMBDAS[1:])),
                                      seeds_arg(args.seeds)], args.quick, args.jobs, args.steps)
    runs = [r for r in collect_runs(t1) + collect_runs(t2) if r.seed < args.seeds]

    def label(r):
        return r.regime if r.regime in ("detach", "occ") else f"{r.regime} λ={r.coef:g}"

    order = ["detach", "occ"] + [f"{g} λ={c:g}" for g in ("policy", "ce") for c in TABLE2_LAMBDAS]
    table = regime_table(runs, label, order)
    md = [header("Table 2 at the tiny scale: fixed lambda" + (" (quick)" if args.quick else ""), args.command,
                 run_seconds(t1) + run_seconds(t2), RUNS),
          "Where does the joint MTP term start to cost accuracy? Fixed-lambda sweeps of the policy and ce regimes "
          "with occ and detach as reference rows (same layout as Table 1).\n", table_markdown(table), "",
          f"For comparison: {PAPER_TABLE2_NOTE}."]
    (RESULTS / f"table2_tiny{suffix}.md").write_text("\n".join(md) + "\n")
    write_csv(table, RESULTS / f"table2_tiny{suffix}.csv")
    print("\n".join(md))


# -- Figure 4 -----------------------------------------------------------------------------------
def make_figures(root: Path, suffix: str) -> list[Path]:
    """Figure 4 (lambda_t, c, v2: proxy and exact, for policy and occ) plus the per-metric plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from occ_exp.plot import aggregate, find_runs, plot_dir

    plot_dir(root, out=RESULTS / f"figures{suffix}", smooth=5)
    runs = find_runs(root)
    panels = [("mtp/coef", "diag/lambda_star", "lambda_t (proxy, applied) and lambda* (exact)"),
              ("mtp/corr_proxy", "diag/corr", "c: proxy c_hat and exact <g_RL, g_MTP>"),
              ("mtp/penalty_proxy", "diag/penalty", "v2: proxy v2_hat and exact ||g_MTP||^2")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    for col, (proxy, exact, title) in enumerate(panels):
        for row, key in enumerate((proxy, exact)):
            ax = axes[row][col]
            for label in sorted(runs):
                if not label.split()[0] in ("policy", "occ"):
                    continue
                x, mean, lo, hi = aggregate(runs[label], key, smooth=5 if row == 0 else 1)
                if len(x):
                    ax.plot(x, mean, label=label, marker="" if row == 0 else ".")
                    ax.fill_between(x, lo, hi, alpha=0.15)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_title(("proxy: " if row == 0 else "exact: ") + title.split(":")[0], fontsize=10)
            ax.legend(fontsize=8)
            if row == 1:
                ax.set_xlabel("RL step")
    fig.suptitle("Figure 4 at the tiny scale: lambda_t, c and v2 against step (mean over seeds, min-max band)")
    fig.tight_layout()
    path = RESULTS / f"figure4_tiny{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def figure4(args) -> None:
    suffix = args.suffix
    root = RUNS / ("table1" + suffix)
    if not any(root.rglob("eval.json")):
        warm_start(args.quick)
        root = multirun("table1" + suffix, ["regime=policy,occ", "seed=0"], args.quick, args.jobs, args.steps)
    for p in make_figures(root, suffix):
        print(f"wrote {p}")


# -- real scale: compose and plan -----------------------------------------------------------------
def plan_real(args) -> None:
    presets = {"mimo7b": ["mimo7b_dapo", "mimo7b_gspo"], "glm": []}[args.scale]
    if not presets:
        print("GLM-4.5-Air (the paper's third setting) is a 106B mixture-of-experts model with its own MTP layout; "
              "occ-exp's MTP layer is built from dense decoder-layer classes (Qwen2 / MiMo, Llama), so this setting "
              "is not runnable here. It stays on paper: the paper's numbers are in results/table1_tiny.md.")
        return
    for preset in presets:
        for regime in REGIMES:
            sh([sys.executable, "-m", "occ_exp.train", f"experiment={preset}", f"regime={regime}", "trainer.dry_run=true"],
               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    launch = [[sys.executable, "-m", "occ_exp.train", "-m", "hydra/launcher=slurm", f"experiment={p}",
               "regime=" + ",".join(REGIMES), "seed=0"] for p in presets]
    print("\nLaunch on Slurm (one job per regime; each job runs torchrun over its nodes):")
    for cmd in launch:
        print("  " + shlex.join(cmd))
    print("Or on one node: torchrun --standalone --nproc_per_node=8 -m occ_exp.train experiment=mimo7b_dapo regime=occ")
    print("Then evaluate each final checkpoint: python -m occ_exp.evaluate model.path=<run dir> benchmark=all eval.k=32 "
          "eval.temperature=1.0 rollout=vllm")
    if args.launch:
        for cmd in launch:
            sh(cmd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["table1", "table2", "figure4"])
    ap.add_argument("--quick", action="store_true", help="the ~5-minute version (CI, first look)")
    ap.add_argument("--scale", default="tiny", choices=["tiny", "mimo7b", "glm"])
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one CPU thread each)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 4; quick: 1)")
    ap.add_argument("--steps", type=int, default=None,
                    help="RL steps per run instead of the experiment's (400; quick: 12); results get a _<N>steps suffix")
    ap.add_argument("--report-only", action="store_true", help="rebuild the results files from finished runs, run nothing")
    ap.add_argument("--launch", action="store_true", help="real scale: submit the runs (default: print the plan)")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 4
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    args.suffix = "_quick" if args.quick else ""
    if args.steps:
        args.suffix += f"_{args.steps}steps"
    # the command that ran the runs (a --report-only rebuild names the sweep's own command)
    args.command = "python scripts/reproduce.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only")
    RESULTS.mkdir(exist_ok=True)
    {"table1": table1, "table2": table2, "figure4": figure4}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
