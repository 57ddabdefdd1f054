"""Reproduce the paper's Table 1, Table 2 and Figure 4 at the tiny scale, and test its theory.

    python scripts/reproduce.py table1   [--seeds 4] [--steps 400] [--jobs 2]   # 6 regimes x seeds
    python scripts/reproduce.py table2   [--seeds 3] [--steps 400] [--jobs 2]   # lambda-response curves + theory
    python scripts/reproduce.py proxy    # the paper's proxy vs the exact lambda* (from the runs above)
    python scripts/reproduce.py figure4  # lambda_t, c, v2 against step for occ and occ_exact
    python scripts/reproduce.py findings # results/FINDINGS.md from the summaries the commands above wrote
    python scripts/reproduce.py all      # all of it, in that order
    ... --plan                           # print runs x steps x s/step = wall time at --jobs N, run nothing
    ... --report-only                    # rebuild the results files from the runs there, run nothing
    ... --regimes detach,occ             # run only these regimes' cells (the reports keep every cell)
    ... --values 3,1                     # run only the cells at these λ / λ_plus, one value after another
    python scripts/reproduce.py table1 --scale mimo7b [--launch]                # real scale: the plan / Slurm

Every table is one or more Hydra multiruns of `python -m occ_exp.train` (experiment=theory_tiny:
table1_tiny's settings with exact c / v2 and the Taylor check on every 10th step) run side by side
through the joblib launcher from ONE shared warm start; --jobs is passed down (OCC_EXP_PARALLEL_JOBS)
so that each run's default threads are its share of the available cores (occ_exp.runtime). Runs of the same seed see the same prompts at every step
(paired), and every run ends with an evaluation (avg@4, sampled) on 1,000 held-out problems
(`<run>/eval.json`). Runs live under results/runs/<table>[_suffix]/, committed without their
checkpoints (.gitignore), so finished runs outlive the session that ran them (resumable: re-running
the command skips finished runs and continues unfinished ones from their checkpoints); Table 2 reuses
Table 1's runs for the cells they share (detach, policy and ce at 0.1, occ at lambda_plus 1). The
results go to results/ (`table1_tiny.{md,csv,json}`, `table2_tiny.{md,csv,json,png}`,
`proxy_tiny.{md,json,png}`, `figure4_tiny.png`, `FINDINGS.md`) with the command, commit, wall time
and the cells still missing. `--steps N` other than 400 (or --quick) writes to its own folders and
result names (`_<N>steps`); `--out-suffix ''` forces the plain names.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from occ_exp.plot import figure4_analog, plot_dir, proxy_figure, response_figure  # noqa: E402
from occ_exp.report import (  # noqa: E402
    PAPER_TABLE1, cell_label, collapsed_markdown, collapsed_runs, collect_runs, findings_markdown, fmt_lambda,
    measured_curves, mechanism_markdown, missing_cells, missing_markdown, ordering_verdict, predicted_curve,
    proxy_markdown, proxy_observations, proxy_table, regime_label, regime_table, seconds_per_step, steps_done,
    sign_check, sign_markdown, table_markdown, theory_verdict, write_csv,
)
from occ_exp.runtime import JOBS_ENV, choose_threads, code_commit  # noqa: E402

DEFAULT_STEPS = 400
PAPER_REGIMES = ["detach", "ce", "policy", "occ"]  # the paper's Table 1
TABLE1_REGIMES = [*PAPER_REGIMES, "occ_exact", "occ_reference"]
# Extra overrides of a regime's cells, applied after --override: occ_reference applies lambda to the
# advantages (the reference code), which the exact-gradient diagnostics do not support (they need
# lambda on the loss).
REGIME_OVERRIDES = {"occ_reference": ["diagnostics.exact_every=0", "diagnostics.taylor_check=false"]}
FIXED_LAMBDAS = [0.03, 0.1, 0.3, 1.0, 3.0]  # Table 2: policy and ce
OCC_LAMBDA_PLUS = [0.1, 1.0, 10.0]  # Table 2: occ
TABLE1_FIXED, TABLE1_LAMBDA_PLUS = 0.1, 1.0  # what Table 1's runs use (experiment table1_tiny), reused by Table 2
THEORY_GRID = np.geomspace(0.01, 30, 61)  # lambda grid of the predicted gain curves
PAPER_ROW = "MiMo-7B-RL + DAPO"
RESULTS = ROOT / "results"
RUNS = ROOT / "results" / "runs"  # committed, less checkpoints/ (.gitignore)
OPTS = argparse.Namespace(report_only=False, plan=False, overrides=[], jobs=2, warm=False, regimes=None, values=None)


def sh(cmd: list[str], **kw) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def experiment(quick: bool) -> str:
    return "theory_tiny_quick" if quick else "theory_tiny"


# -- sweeps ---------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """One Hydra multirun: regime group options x swept parameter values x seeds, into `folder`.
    `label` names a cell as the tables do (occ_exp.report.cell_label of its runs)."""

    folder: str
    regimes: list[str]
    seeds: int
    param: str | None = None  # e.g. regime.coef
    values: list[float] = field(default_factory=list)

    def overrides(self, done: set[tuple[str, int]] = frozenset()) -> list[list[str]]:
        """One override list per multirun (regimes with extra overrides run on their own). A regime
        without its conf/regime file here is left out (its cells show as missing). `done`: the
        (label, seed) cells with a finished run here; once any is, each (regime, value) left runs
        over the seeds it lacks, in one multirun with the other regimes (at the same value) that
        lack the same seeds, so that --jobs N keeps N runs going (finished runs need no checkpoint)."""
        out = []
        regimes = [r for r in self.regimes if (ROOT / "conf" / "regime" / f"{r}.yaml").exists()]
        for r in sorted(set(self.regimes) - set(regimes)):
            print(f"note: conf/regime/{r}.yaml is not in this checkout; its cells are skipped", flush=True)
        seeds = range(self.seeds)
        if done:
            groups: dict[tuple, list[str]] = {}  # (value, seeds left, own-overrides regime) -> regimes
            for v in self.values or [None]:
                for reg in regimes:
                    todo = tuple(s for s in seeds if (self.label(reg, v), s) not in done)
                    if todo:
                        groups.setdefault((v, todo, reg if reg in REGIME_OVERRIDES else ""), []).append(reg)
            for (v, todo, _), regs in groups.items():
                o = ["regime=" + ",".join(regs), "seed=" + ",".join(map(str, todo))]
                out.append(o + ([f"{self.param}={v:g}"] if self.param else []))
            return out
        plain = [r for r in regimes if r not in REGIME_OVERRIDES]
        groups = ([plain] if plain else []) + [[r] for r in regimes if r in REGIME_OVERRIDES]
        for regs in groups:
            o = ["regime=" + ",".join(regs), "seed=" + ",".join(str(s) for s in seeds)]
            if self.param:
                o.append(f"{self.param}=" + ",".join(f"{v:g}" for v in self.values))
            out.append(o)
        return out

    @staticmethod
    def label(reg: str, v: float | None) -> str:
        """A cell's label as occ_exp.report.cell_label names its runs."""
        lam = v if v is not None else (TABLE1_LAMBDA_PLUS if reg.startswith("occ") else TABLE1_FIXED)
        return reg if reg == "detach" else f"{reg} λ={lam:g}"

    def cells(self) -> list[tuple[str, int]]:
        return [(self.label(reg, v), s) for reg in self.regimes for v in self.values or [None] for s in range(self.seeds)]


def selected(sweeps: list[Sweep]) -> list[Sweep]:
    """The sweeps' cells of the regimes --regimes names, and, under --values, of those λ / λ_plus only,
    one sweep per value in the order given (so a sweep spread over sessions runs the values that
    matter first). Without either option, every sweep whole."""
    out = []
    for sw in sweeps:
        sw = replace(sw, regimes=[r for r in sw.regimes if OPTS.regimes is None or r in OPTS.regimes])
        if OPTS.values is None:
            out.append(sw)
        elif sw.param:
            out += [replace(sw, values=[v]) for v in OPTS.values if v in sw.values]
        else:  # a sweep at Table 1's fixed values: its regimes whose value was named (detach has none)
            out.append(replace(sw, regimes=[r for r in sw.regimes if r != "detach" and
                                            float(sw.label(r, None).split("λ=")[1]) in OPTS.values]))
    return out


def table1_sweep(args) -> Sweep:
    return Sweep("table1" + args.run_suffix, TABLE1_REGIMES, args.seeds1)


def table2_sweeps(args) -> list[Sweep]:
    """Table 1's shared cells (run there, reused), the other fixed lambdas, the other lambda_plus."""
    return [Sweep("table1" + args.run_suffix, ["detach", "policy", "ce", "occ"], args.seeds2),
            Sweep("table2" + args.run_suffix, ["policy", "ce"], args.seeds2, "regime.coef",
                  [v for v in FIXED_LAMBDAS if v != TABLE1_FIXED]),
            Sweep("table2" + args.run_suffix, ["occ"], args.seeds2, "regime.lambda_plus",
                  [v for v in OCC_LAMBDA_PLUS if v != TABLE1_LAMBDA_PLUS])]


def warm_start(args) -> None:
    """Fill the shared warm-start cache once, before the parallel runs (they would otherwise queue
    on its lock): a zero-step run builds the model, which warm-starts it."""
    sh([sys.executable, "-m", "occ_exp.train", f"experiment={experiment(args.quick)}", "trainer.total_steps=0",
        "trainer.eval_before_train=false", "trainer.threads=0", "logger=none", *OPTS.overrides,
        f"hydra.run.dir={RUNS / 'warmstart'}"])


def run_sweeps(sweeps: list[Sweep], args) -> None:
    """Each sweep's multiruns (resumable: each point continues from its newest checkpoint), adding
    their wall time to the folder's wall.json. Nothing runs under --report-only."""
    if OPTS.report_only:
        return
    todo = [(sw, over) for sw in selected(sweeps)
            for over in sw.overrides({(cell_label(r), r.seed) for r in load([sw.folder])})]  # less the finished runs
    if not todo:
        print(f"every run is finished: {', '.join(dict.fromkeys(sw.folder for sw in selected(sweeps)))}", flush=True)
        return
    if not OPTS.warm:  # once per invocation (`all` runs several tables)
        warm_start(args)
        OPTS.warm = True
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           JOBS_ENV: str(args.jobs)}  # each run's default threads: its share of the cores (occ_exp.runtime)
    steps = [f"trainer.total_steps={args.steps}"]
    for sw, over in todo:
        out = RUNS / sw.folder
        t0 = time.time()
        try:
            regime = over[0].removeprefix("regime=")  # one regime when it has REGIME_OVERRIDES
            sh([sys.executable, "-m", "occ_exp.train", "-m", f"experiment={experiment(args.quick)}", *over, *steps,
                *OPTS.overrides, *REGIME_OVERRIDES.get(regime, []),  # last: they win over --override
                "hydra/launcher=parallel",
                f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={out}",
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(dirname_excluded())}]"],
               env=env)
        finally:  # wall time over every invocation (a resumed sweep adds to it; finished runs cost seconds)
            out.mkdir(parents=True, exist_ok=True)
            (out / "wall.json").write_text(json.dumps({"seconds": run_seconds(out) + time.time() - t0}))


def dirname_excluded() -> list[str]:
    """Overrides left out of the run folders' names: the thread count and every --override (they
    apply to every run of the invocation; --out-suffix keeps sweeps with other settings apart)."""
    return ["trainer.progress", "hydra.launcher.n_jobs", "trainer.threads",
            *dict.fromkeys(o.split("=", 1)[0].lstrip("+~") for o in OPTS.overrides)]


def run_seconds(out: Path) -> float:
    """Wall time the sweep in `out` has taken so far, over all invocations (0 if never recorded)."""
    f = out / "wall.json"
    return float(json.loads(f.read_text())["seconds"]) if f.exists() else 0.0


def load(folders: list[str], finished: bool = True) -> list:
    """The runs in these sweep folders; the reports read finished runs only (a run still training has
    diagnosed steps but no final evaluation: a report must not depend on when it was built), the
    plan every run (how far each has got)."""
    return [r for f in dict.fromkeys(folders) if (RUNS / f).exists() for r in collect_runs(RUNS / f)
            if r.finished or not finished]


def header(title: str, args, folders: list[str]) -> str:
    seconds = sum(run_seconds(RUNS / f) for f in dict.fromkeys(folders))
    where = ", ".join(f"`{(RUNS / f).relative_to(ROOT) if (RUNS / f).is_relative_to(ROOT) else RUNS / f}/`"
                      for f in dict.fromkeys(folders))
    took = (f"the runs took {seconds / 60:.1f} min of wall time" if seconds else
            "the sweep's wall time is not recorded yet (its command writes it when it finishes)")
    tracked = all(subprocess.run(["git", "ls-files", "--error-unmatch", str(RUNS / f)], cwd=ROOT, capture_output=True).returncode == 0
                  for f in dict.fromkeys(folders) if (RUNS / f).exists())
    return (f"# {title}\n\n"
            f"Produced by `{args.command}` (tables built at commit `{code_commit(ROOT)}`); {took} on {platform.machine()} "
            f"({os.cpu_count()} CPU cores, torch {importlib.metadata.version('torch')}); runs under {where} "
            f"({'committed without their checkpoints' if tracked else 'not committed'}); {run_commits(folders)}.\n")


def run_commits(folders: list[str]) -> str:
    """The commits the runs were made at (each run's provenance.jsonl names the commit of every start and
    resume), with how many runs each made part of."""
    counts: dict[str, int] = {}
    unrecorded = 0
    for f in dict.fromkeys(folders):
        for run in sorted(p for p in (RUNS / f).iterdir() if (p / ".hydra").is_dir()) if (RUNS / f).exists() else []:
            prov = run / "provenance.jsonl"
            if not prov.exists():
                unrecorded += 1
                continue
            for c in dict.fromkeys(json.loads(line)["commit"] for line in prov.read_text().splitlines() if line.strip()):
                counts[c] = counts.get(c, 0) + 1
    plural = lambda n: f"{n} run" + ("s" if n != 1 else "")  # noqa: E731
    parts = (["runs made at commit " + ", ".join(f"`{c}` ({plural(n)})" for c, n in counts.items())] if counts else []) + \
        ([f"{plural(unrecorded)} from before runs recorded their commit"] if unrecorded else [])
    return "; ".join(parts) or "no runs yet"


def write_json(obj: dict, path: Path) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return "inf" if x == math.inf else "-inf" if x == -math.inf else "nan"  # null stays "no value"
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.floating, np.integer)):
            return clean(x.item())
        return x

    path.write_text(json.dumps(clean(obj), indent=1, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict | None:
    def back(x):
        if x == "inf":
            return math.inf
        if x == "-inf":
            return -math.inf
        if x == "nan":
            return math.nan
        if isinstance(x, dict):
            return {k: back(v) for k, v in x.items()}
        if isinstance(x, list):
            return [back(v) for v in x]
        return x

    return back(json.loads(path.read_text())) if path.exists() else None


def summary(args, name: str, seeds: int, **extra) -> dict:
    return {"file": f"results/{name}", "command": args.command, "commit": code_commit(ROOT), "steps": args.steps,
            "seeds": seeds, **extra}


# -- Table 1 ------------------------------------------------------------------------------------
def table1(args) -> None:
    if args.scale != "tiny":
        return plan_real(args)
    sweep = table1_sweep(args)
    if OPTS.plan:
        return plan([sweep], args)
    run_sweeps([sweep], args)
    runs = [r for r in load([sweep.folder]) if r.seed < args.seeds1]
    table = regime_table(runs, regime_label, TABLE1_REGIMES, n_boot=args.boot)
    paper = PAPER_TABLE1[PAPER_ROW]
    for row in table:
        row["paper"] = paper.get(row["label"])
    missing = missing_cells(runs, [(lab.split(" λ=")[0], s) for lab, s in sweep.cells()], regime_label)
    verdict = ordering_verdict(table)
    collapsed = collapsed_runs(runs, regime_label)
    name = "table1_tiny" + args.out_suffix
    md = [header("Table 1 at the tiny scale" + (" (quick)" if args.quick else ""), args, [sweep.folder]),
          missing_markdown(missing), "", *([collapsed_markdown(collapsed), ""] if collapsed else []),
          "Final accuracy on the held-out countdown problems (points; avg@k of sampled answers, the paper's avg@32 at a "
          "smaller k), mean ± standard deviation over seeds; Δ vs detach with a 95% bootstrap interval over seeds "
          "(paired) and problems (paired); MTP acceptance = expected speculative acceptance of the depth-1 head over the "
          f"last 10 steps; paper = the paper's {PAPER_ROW} average over six benchmarks (another scale). occ_exact: "
          "λ_t from the exact c and v2 of the same mini-batch (an oracle); occ_reference: the reference code's "
          "estimator.\n",
          table_markdown(table, paper=paper), "", "## Mechanism", "",
          "Over all steps of all seeds: the exact terms on the diagnosed steps (λ* = λ_plus·c / v2, c = <g_RL, g_MTP> "
          "on the trunk) beside the proxy's. detach's exact terms are 0 by construction.", "",
          mechanism_markdown(runs, regime_label, TABLE1_REGIMES), "", verdict, "",
          "## The paper (for comparison; a different scale, not reproduced here)", "",
          "| setting | detach | ce | policy | occ |", "|---|---|---|---|---|",
          *[f"| {k} | " + " | ".join(f"{v[r]:.1f}" for r in ["detach", "ce", "policy", "occ"]) + " |"
            for k, v in PAPER_TABLE1.items()], ""]
    (args.results / f"{name}.md").write_text("\n".join(md) + "\n")
    write_csv(table, args.results / f"{name}.csv")
    write_json(summary(args, f"{name}.md", args.seeds1, rows=table, missing=missing, verdict=verdict, paper=paper,
                       collapsed=collapsed),
               args.results / f"{name}.json")
    if any(r.rows for r in runs):
        plot_dir(RUNS / sweep.folder, out=args.results / f"figures{args.out_suffix}", smooth=5)
    print("\n".join(md))


# -- Table 2: lambda-response curves and the theory ----------------------------------------------
TABLE2_REGIMES = ["policy", "ce", "occ"]


def table2(args) -> None:
    sweeps = table2_sweeps(args)
    if OPTS.plan:
        return plan(sweeps, args)
    run_sweeps(sweeps, args)
    folders = [sw.folder for sw in sweeps]
    runs = [r for r in load(folders) if r.seed < args.seeds2 and regime_label(r) in ["detach", *TABLE2_REGIMES]]
    order = ["detach"] + [f"{g} λ={v:g}" for g in ("policy", "ce") for v in FIXED_LAMBDAS] + \
            [f"occ λ={v:g}" for v in OCC_LAMBDA_PLUS]
    table = regime_table(runs, cell_label, order, n_boot=args.boot)
    missing = missing_cells(runs, [c for sw in sweeps for c in sw.cells()], cell_label)
    collapsed = collapsed_runs(runs, cell_label)
    measured = measured_curves(runs, TABLE2_REGIMES, n_boot=args.boot, min_seeds=args.seeds2)
    off_curve = [f"{lab} λ={lam:g}" for lab, m in measured.items() for lam in m["accuracy"].get("left_out", [])]
    # the prediction for occ_exact too (its diagnosed steps are in Table 1's runs), beside occ's
    theory_runs = runs + [r for r in load([sweeps[0].folder]) if r.seed < args.seeds2 and regime_label(r) == "occ_exact"]
    predicted = {lab: predicted_curve([r for r in theory_runs if regime_label(r) == lab], THEORY_GRID, args.eta,
                                  n_boot=args.boot // 2)
                 for lab in [*TABLE2_REGIMES, "occ_exact"]}
    grids = {"policy": FIXED_LAMBDAS, "ce": FIXED_LAMBDAS, "occ": OCC_LAMBDA_PLUS}
    signs = {lab: sign_check(measured.get(lab, {}).get("accuracy"), predicted.get(lab)) for lab in TABLE2_REGIMES}
    verdicts = {}
    for lab in TABLE2_REGIMES:  # the break-even verdict, then the sign at each measured lambda
        status, text = theory_verdict(measured.get(lab, {}).get("accuracy"), predicted.get(lab), grids[lab])
        verdicts[lab] = (status, text + sign_markdown(signs[lab]))
    name = "table2_tiny" + args.out_suffix
    fig = response_figure(measured, {k: v for k, v in predicted.items() if v}, args.results / f"{name}.png",
                          "Table 2 at the tiny scale: response to λ (one line per regime)")
    theory_rows = ["| regime | diagnosed steps (Taylor) | η (source) | L·η [95% CI] | mean c | mean v2 | predicted λ0 [95% CI] "
                   "| predicted optimum λ0/2 | measured break-even [95% CI] | verdict |", "|" + "---|" * 10]
    for lab in [*TABLE2_REGIMES, "occ_exact"]:
        p, m = predicted.get(lab), measured.get(lab, {}).get("accuracy")
        g = grids.get(lab, OCC_LAMBDA_PLUS)
        from_p = (f"{p['steps']} ({p['taylor_steps']}) | {p['eta']:.2g} ({p['eta_source']}) | {p['L_eta']:.3g} "
                  f"[{p['L_eta_lo']:.3g}, {p['L_eta_hi']:.3g}] | {p['c']:.3g} | {p['v2']:.3g} | "
                  f"{fmt(p['lambda_0'], g)} [{fmt(p['lambda_0_lo'], g)}, {fmt(p['lambda_0_hi'], g)}] | "
                  f"{fmt(p['lambda_0'] / 2, g)}") if p else "– | – | – | – | – | – | –"
        from_m = (f"{fmt(m['break_even'], g)} [{fmt(m['break_even_lo'], g)}, {fmt(m['break_even_hi'], g)}]" if m else "–")
        theory_rows.append(f"| {lab} | {from_p} | {from_m} | {verdicts.get(lab, ('–',))[0]} |")
    md = [header("Table 2 at the tiny scale: the response to λ, and the theory's prediction", args, folders),
          missing_markdown(missing), "", *([collapsed_markdown(collapsed), ""] if collapsed else []),
          *([f"Cells with fewer than {args.seeds2} finished seeds stay off the curves, the figure and the measured "
             f"break-even until they finish (they are in the table): {', '.join(off_curve)}.", ""] if off_curve else []),
          "Policy and ce at fixed λ ∈ {" + ", ".join(f"{v:g}" for v in FIXED_LAMBDAS) + "}, occ at λ_plus ∈ {"
          + ", ".join(f"{v:g}" for v in OCC_LAMBDA_PLUS) + "}, each against detach of the same seeds (same prompts per "
          "step; Table 1's runs reused where the settings match). Δ vs detach with a 95% bootstrap interval over seeds "
          "and problems (paired).\n", table_markdown(table), "",
          f"![{fig.stem}]({fig.name})", "", "## The prediction beside the measurement", "",
          "The theory: the MTP term's contribution to one step is ηλ(1−Lη)c − (Lη²λ²/2)·v2, positive below "
          "λ0 = 2(1−Lη)c/(Lη·v2) and largest at λ0/2. Here c = <g_RL, g_MTP> and v2 = ||g_MTP||² are the exact "
          "values on the diagnosed steps of each regime's runs (all its λ pooled; for occ the applied λ_t = λ_plus·s_t "
          "enters as mean(s·c) and mean(s²·v2)); L comes from the Taylor check's second-order term, "
          "(first − second order)/η² = (g + u/2)ᵀHu ≈ L(λc + λ²v2/2), pooled over steps; η is the optimiser's effective "
          "step (source in the table). Intervals: bootstrap over seeds and, within each, diagnosed steps. The measured "
          "break-even is where the accuracy delta crosses 0 (log-linear interpolation; '<' / '>' = outside the grid), "
          "its interval from the same paired bootstrap as the deltas. The sign check tests the curve wherever it was "
          "measured: at each λ, the sign of the measured delta against that of the predicted per-step gain, each "
          "resolved only where its 95% interval excludes 0 (the predicted point's sign in brackets).", "", "\n".join(theory_rows), "",
          *[f"- **{lab}**: {status}: {text}." for lab, (status, text) in verdicts.items()], ""]
    (args.results / f"{name}.md").write_text("\n".join(md) + "\n")
    write_csv(table, args.results / f"{name}.csv")
    write_json(summary(args, f"{name}.md", args.seeds1, rows=table, missing=missing, collapsed=collapsed, measured=measured,
                       predicted=predicted, verdicts=verdicts, signs=signs), args.results / f"{name}.json")
    print("\n".join(md))


def fmt(x, grid) -> str:
    return fmt_lambda(x, grid)


# -- the proxy under the microscope ----------------------------------------------------------------
def proxy(args) -> None:
    folders = ["table1" + args.run_suffix, "table2" + args.run_suffix]
    if OPTS.plan:
        return plan(table2_sweeps(args) + [table1_sweep(args)], args)
    runs = [r for r in load(folders) if r.seed < max(args.seeds1, args.seeds2)]
    obs = proxy_observations(runs)
    rows = proxy_table(obs, n_boot=min(args.boot, 500))
    per_mb = len({o["mb"] for o in obs}) > 1
    name = "proxy_tiny" + args.out_suffix
    fig = proxy_figure(rows, args.results / f"{name}.png", "The paper's proxy, the reference estimator and paper_in_clip "
                       "against the exact λ*") if rows else None
    md = [header("The proxy under the microscope", args, folders),
          f"{len(obs)} diagnosed mini-batches of the policy, occ and occ_exact runs (λ* = c/v2 exact; every value divided "
          "by the run's λ_plus). Sign agreement counts an estimate of exactly 0 as a disagreement; intervals: bootstrap "
          "over mini-batches. The first mini-batch of a step is on-policy (d_rl = 0, so the paper's ĉ is 0 by "
          "construction).", "",
          proxy_markdown(rows) if rows else "No diagnosed mini-batches yet.", ""]
    if not per_mb:
        md.append("Only one mini-batch index is logged per diagnosed step (the last: the learner's unsuffixed diag/*); "
                  "the by-mini-batch rows need `diag/<name>_mb<i>` per mini-batch (see the report for the coordinator).")
    if fig:
        md += ["", f"![{fig.stem}]({fig.name})"]
    (args.results / f"{name}.md").write_text("\n".join(md) + "\n")
    write_json(summary(args, f"{name}.md", max(args.seeds1, args.seeds2), rows=rows, per_mini_batch=per_mb, n_obs=len(obs)),
               args.results / f"{name}.json")
    print("\n".join(md))


# -- Figure 4 -------------------------------------------------------------------------------------
def figure4(args) -> None:
    sweep = table1_sweep(args)
    if OPTS.plan:
        return plan([sweep], args)
    runs = [r for r in load([sweep.folder]) if r.seed < args.seeds1 and regime_label(r) in ("occ", "occ_exact")]
    if not runs:
        raise SystemExit(f"no occ / occ_exact runs under {RUNS / sweep.folder}: run `reproduce.py table1` first")
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(regime_label(r), []).append(r.rows)
    path = figure4_analog(groups, args.results / f"figure4_tiny{args.out_suffix}.png",
                          "Figure 4 at the tiny scale: λ_t, c and v2 against step (mean over seeds, min-max band)")
    print(f"wrote {path}")


def findings(args) -> None:
    if OPTS.plan:
        return None
    s = args.out_suffix
    md = findings_markdown(read_json(args.results / f"table1_tiny{s}.json"), read_json(args.results / f"table2_tiny{s}.json"),
                           read_json(args.results / f"proxy_tiny{s}.json"), args.command, code_commit(ROOT))
    (args.results / f"FINDINGS{s}.md").write_text(md)
    print(md)


def run_all(args) -> None:
    if OPTS.plan:
        return plan(list({id(s): s for s in [table1_sweep(args), *table2_sweeps(args)[1:]]}.values()), args)
    for fn in (table1, table2, proxy, figure4, findings):
        fn(args)


# -- the compute plan --------------------------------------------------------------------------------
def plan(sweeps: list[Sweep], args) -> None:
    """Runs x steps x measured s/step = wall time at --jobs N (what a resumed sweep still has to do)."""
    measured = seconds_per_step(RUNS)
    cells, seen = [], set()
    for sw in selected(sweeps):
        done = steps_done(load([sw.folder], finished=False))
        for label, seed in sw.cells():
            if (sw.folder, label, seed) in seen:
                continue
            seen.add((sw.folder, label, seed))
            cells.append((label, seed, max(args.steps - done.get((label, seed), 0), 0)))
    lines = [f"Plan for `{args.command}` at --jobs {args.jobs} ({choose_threads(0, jobs=(args.jobs, '')).threads} torch thread(s) each, "
             f"{os.cpu_count()} cores):", "", "| cell | runs | steps left | s/step (source) | run-seconds |", "|---|---|---|---|---|"]
    total = 0.0
    by_label: dict[str, list[int]] = {}
    for label, _, left in cells:
        by_label.setdefault(label, []).append(left)
    for label, lefts in by_label.items():
        reg = label.split(" λ=")[0]
        if reg in measured:
            sps, src = measured[reg], "measured"
        elif "*" in measured:
            sps, src = measured["*"], "measured, all regimes"
        elif args.sec_per_step:
            sps, src = args.sec_per_step, "--sec-per-step"
        else:
            raise SystemExit(f"no metrics under {RUNS} to measure seconds per step: pass --sec-per-step S "
                             "(e.g. from a short run: python scripts/reproduce.py table1 --steps 5 --seeds 1)")
        cost = sum(lefts) * sps
        total += cost
        lines.append(f"| {label} | {len(lefts)} | {sum(lefts)} | {sps:.2f} ({src}) | {cost:.0f} |")
    par = min(args.jobs, max(len(cells), 1))
    slow = max(1.0, args.jobs / (os.cpu_count() or 1))  # more jobs than cores share them
    wall = total / par * slow
    lines += ["", f"{len(cells)} runs, {sum(c[2] for c in cells)} steps left, {total / 3600:.2f} run-hours; at --jobs "
              f"{args.jobs}: about {wall / 3600:.2f} h of wall time" + (f" (x{slow:.1f}: more jobs than cores)" if slow > 1 else "")
              + " (plus the warm start if its cache is empty)."]
    print("\n".join(lines))
    return None


# -- real scale: compose and plan -----------------------------------------------------------------
def plan_real(args) -> None:
    presets = {"mimo7b": ["mimo7b_dapo", "mimo7b_gspo"], "glm": []}[args.scale]
    if not presets:
        print("GLM-4.5-Air (the paper's third setting) is a 106B mixture-of-experts model with its own MTP layout; "
              "occ-exp's MTP layer is built from dense decoder-layer classes (Qwen2 / MiMo, Llama), so this setting "
              "is not runnable here. It stays on paper: the paper's numbers are in results/table1_tiny.md.")
        return
    for preset in presets:
        for regime in PAPER_REGIMES:
            sh([sys.executable, "-m", "occ_exp.train", f"experiment={preset}", f"regime={regime}", "trainer.dry_run=true"],
               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    launch = [[sys.executable, "-m", "occ_exp.train", "-m", "hydra/launcher=slurm", f"experiment={p}",
               "regime=" + ",".join(PAPER_REGIMES), "seed=0"] for p in presets]
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
    ap.add_argument("what", choices=["table1", "table2", "proxy", "figure4", "findings", "all"])
    ap.add_argument("--quick", action="store_true", help="the ~5-minute version (12 steps, 1 seed: CI, first look)")
    ap.add_argument("--scale", default="tiny", choices=["tiny", "mimo7b", "glm"])
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (torch threads each: available cores // jobs)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: Table 1's cells 4, Table 2's 3; quick: 1)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"RL steps per run (default {DEFAULT_STEPS}; quick: 12); another value gets a _<N>steps suffix")
    ap.add_argument("--out-suffix", default=None, help="suffix of the run folders and result names (default: from "
                                                        "--quick / --steps; '' = the plain names)")
    ap.add_argument("--plan", action="store_true", help="print runs x steps x s/step = wall time at --jobs, run nothing")
    ap.add_argument("--sec-per-step", type=float, default=None, help="--plan: seconds per RL step when no runs measured it")
    ap.add_argument("--eta", type=float, default=None, help="the theory's step size eta (default: from the runs' metrics)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates of the intervals (default 2000)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for every run (repeatable; not part of the run folders' names: "
                         "use --out-suffix for a sweep with other settings)")
    ap.add_argument("--regimes", default=None, metavar="A,B",
                    help="run only these regimes' cells (default: every regime of the table); reports keep them all")
    ap.add_argument("--values", default=None, metavar="V,W",
                    help="run only the cells at these swept values (Table 2's λ of policy/ce, λ_plus of occ), "
                         "one value after another in this order; reports keep every cell")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the results files go (default results/)")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs live (default results/runs/)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the results files from the runs there, run nothing")
    ap.add_argument("--launch", action="store_true", help="real scale: submit the runs (default: print the plan)")
    args = ap.parse_args(argv)
    for key in ("jobs", "seeds", "steps", "boot"):
        v = getattr(args, key)
        if v is not None and v < 1:
            ap.error(f"--{key} must be >= 1, got {v}")
    known = [*TABLE1_REGIMES, *TABLE2_REGIMES]
    args.regimes = args.regimes.split(",") if args.regimes else None
    for r in args.regimes or []:
        if r not in known:
            ap.error(f"--regimes: unknown regime {r!r}; the tables' regimes are {', '.join(dict.fromkeys(known))}")
    grid = sorted(set(FIXED_LAMBDAS) | set(OCC_LAMBDA_PLUS))
    try:
        args.values = [float(v) for v in args.values.split(",")] if args.values else None
    except ValueError:
        ap.error(f"--values: {args.values!r} is not a comma-separated list of numbers; Table 2's values are "
                 + ", ".join(f"{v:g}" for v in grid))
    for v in args.values or []:
        if v not in grid:
            ap.error(f"--values: {v:g} is not a value Table 2 sweeps; its values are " + ", ".join(f"{v:g}" for v in grid))
    # seeds per cell: Table 1's (default 4) and Table 2's (default 3; its shared cells are Table 1's runs)
    args.seeds1 = args.seeds or (1 if args.quick else 4)
    args.seeds2 = args.seeds or (1 if args.quick else 3)
    if args.steps is None:
        args.steps = 12 if args.quick else DEFAULT_STEPS
    suffix = ("_quick" if args.quick else "") + (f"_{args.steps}steps" if args.steps != (12 if args.quick else DEFAULT_STEPS)
                                                 else "")
    args.out_suffix = suffix if args.out_suffix is None else args.out_suffix
    args.run_suffix = args.out_suffix
    global RUNS
    if args.runs is not None:
        RUNS = args.runs.resolve()
    OPTS.report_only, OPTS.plan, OPTS.overrides, OPTS.jobs = args.report_only, args.plan, args.override, args.jobs
    OPTS.regimes, OPTS.values = args.regimes, args.values
    # the command that ran the runs (a --report-only rebuild names the sweep's own command)
    args.command = "python scripts/reproduce.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report-only", "--plan"))
    args.results.mkdir(parents=True, exist_ok=True)
    {"table1": table1, "table2": table2, "proxy": proxy, "figure4": figure4, "findings": findings,
     "all": run_all}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
