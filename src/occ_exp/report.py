"""Tables from finished runs: the paper's Table 1 / Table 2 layout, with seeds and intervals.

A run directory (one point of a Hydra multirun) holds `.hydra/config.yaml`, `metrics.jsonl` and
`eval.json` (the final evaluation, with per-problem correct counts). `collect_runs` reads them;
`regime_table` groups runs by a label (regime, or regime + lambda) and reports, per label:

- accuracy: mean and standard deviation over seeds of the final held-out accuracy;
- the difference to a reference label (detach) with a 95% bootstrap interval that resamples both
  seeds (paired by seed: runs with the same seed share their prompt stream) and problems (paired:
  every run is evaluated on the same held-out problems);
- the final MTP expected acceptance (mean of the last steps' `mtp/acceptance`), reward, and the
  mean applied lambda.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from occ_exp.tracking import read_metrics

# The paper's Table 1 (average over six benchmarks, avg@32) and Table 2 (fixed policy lambda).
PAPER_TABLE1 = {
    "MiMo-7B-RL + DAPO": {"detach": 58.9, "ce": 47.7, "policy": 57.4, "occ": 61.7},
    "MiMo-7B-RL + GSPO": {"detach": 57.8, "ce": 50.0, "policy": 56.2, "occ": 60.1},
    "GLM-4.5-Air + DAPO": {"detach": 65.9, "ce": 54.8, "policy": 64.4, "occ": 67.6},
}
PAPER_TABLE2_NOTE = ("the paper's Table 2 sweeps the policy regime's fixed lambda over 0.1, 0.2, 0.5 and 1.0 "
                     "(MiMo-7B-RL + DAPO); every value scores below occ")


@dataclass
class Run:
    path: Path
    regime: str
    seed: int
    coef: float
    estimator: str
    head_ce: float
    accuracy: float | None  # final held-out accuracy (avg@k of the first benchmark), in [0, 1]
    correct: np.ndarray | None  # per held-out problem: correct samples / k
    rows: list[dict] = field(repr=False, default_factory=list)
    lambda_plus: float = 1.0  # occ's lambda_plus (the swept value of the occ variants)
    num_mini_batches: int = 1  # optimiser steps per RL step (the unsuffixed diag/* are the last one's)
    total_steps: int = 0

    @property
    def finished(self) -> bool:
        return self.accuracy is not None

    def values(self, key: str) -> list[float]:
        """`key` over the steps that logged it with a finite number, in step order."""
        return [float(r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    def last_mean(self, key: str, n: int = 10) -> float | None:
        """Mean of `key` over the last `n` steps that logged it."""
        vals = self.values(key)[-n:]
        return float(np.mean(vals)) if vals else None


def load_run(path: str | Path) -> Run | None:
    path = Path(path)
    cfg_path = path / ".hydra" / "config.yaml"
    if not cfg_path.exists():
        return None
    cfg = OmegaConf.load(cfg_path)
    acc = correct = None
    ev = path / "eval.json"
    if ev.exists():
        result = json.loads(ev.read_text())
        bench = next(iter(result["benchmarks"].values()))
        acc = float(bench["avg@k"])
        correct = np.asarray(bench["correct"], dtype=float) / max(int(bench["k"]), 1)
    rows = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
    r = cfg.regime
    return Run(path, str(r.name), int(cfg.seed), float(r.coef), str(r.estimator), float(r.head_ce), acc, correct, rows,
               float(r.get("lambda_plus", 1.0)), int(OmegaConf.select(cfg, "algorithm.num_mini_batches", default=1)),
               int(OmegaConf.select(cfg, "trainer.total_steps", default=0)))


def collect_runs(root: str | Path) -> list[Run]:
    """Every run below `root` (a multirun directory or several)."""
    runs = []
    for cfg in sorted(Path(root).rglob(".hydra/config.yaml")):
        run = load_run(cfg.parent.parent)
        if run is not None:
            runs.append(run)
    return runs


def bootstrap_diff(a: dict[int, np.ndarray], b: dict[int, np.ndarray], n_boot: int = 2000, seed: int = 0):
    """Mean difference of per-problem scores a - b (seed -> [problems]) with a 95% interval from a
    bootstrap over seeds (paired where both have the seed) and problems (paired)."""
    rng = np.random.default_rng(seed)
    shared = sorted(set(a) & set(b))
    if shared:
        A = np.stack([a[s] for s in shared])
        B = np.stack([b[s] for s in shared])
        point = float((A - B).mean())
        n_s, n_p = A.shape
        diffs = np.empty(n_boot)
        for i in range(n_boot):
            si = rng.integers(0, n_s, n_s)
            pi = rng.integers(0, n_p, n_p)
            diffs[i] = (A[si][:, pi] - B[si][:, pi]).mean()
    else:  # unpaired seeds
        A, B = np.stack(list(a.values())), np.stack(list(b.values()))
        point = float(A.mean() - B.mean())
        n_p = A.shape[1]
        diffs = np.empty(n_boot)
        for i in range(n_boot):
            pi = rng.integers(0, n_p, n_p)
            diffs[i] = A[rng.integers(0, len(A), len(A))][:, pi].mean() - B[rng.integers(0, len(B), len(B))][:, pi].mean()
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return point, float(lo), float(hi)


def group_finished(runs: list[Run], label_fn) -> dict[str, list[Run]]:
    """The finished runs by label (unfinished runs have no final evaluation and stay out of tables)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.finished:
            groups.setdefault(label_fn(r), []).append(r)
    return groups


def regime_table(runs: list[Run], label_fn, order: list[str], reference: str = "detach", n_boot: int = 2000) -> list[dict]:
    """One row per label (in `order`): accuracy mean / std over seeds (in points), the difference
    to `reference` with its bootstrap interval, final acceptance, reward and lambda."""
    groups = group_finished(runs, label_fn)
    ref = {r.seed: r.correct for r in groups.get(reference, [])}
    table = []
    for label in order:
        rs = sorted(groups.get(label, []), key=lambda r: r.seed)
        if not rs:
            continue
        accs = np.array([r.accuracy for r in rs]) * 100
        row = {
            "label": label, "seeds": len(rs), "acc_mean": float(accs.mean()),
            "acc_std": float(accs.std(ddof=1)) if len(rs) > 1 else float("nan"),
            "acc_per_seed": [round(float(a), 1) for a in accs],
            "acceptance": _mean([r.last_mean("mtp/acceptance") for r in rs]),
            "reward": _mean([r.last_mean("reward/mean") for r in rs]),
            "lambda": _mean([r.last_mean("mtp/coef", n=10**9) for r in rs]),
        }
        if ref and label != reference:
            d, lo, hi = bootstrap_diff({r.seed: r.correct for r in rs}, ref, n_boot)
            row.update(diff=d * 100, diff_lo=lo * 100, diff_hi=hi * 100)
        table.append(row)
    return table


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _fmt(x, spec=".1f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_markdown(table: list[dict], reference: str = "detach", paper: dict[str, float] | None = None) -> str:
    head = ("| regime | seeds | accuracy (mean ± sd) | per seed | Δ vs " + reference + " [95% CI] | "
            "MTP acceptance | reward | mean λ |" + (" paper |" if paper else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        diff = (f"{r['diff']:+.1f} [{r['diff_lo']:+.1f}, {r['diff_hi']:+.1f}]" if "diff" in r else "(reference)")
        line = (f"| {r['label']} | {r['seeds']} | {_fmt(r['acc_mean'])} ± {_fmt(r['acc_std'])} | "
                f"{', '.join(map(str, r['acc_per_seed']))} | {diff} | {_fmt(r['acceptance'], '.3f')} | "
                f"{_fmt(r['reward'], '.3f')} | {_fmt(r['lambda'], '.2e')} |")
        if paper:
            line += f" {_fmt(paper.get(r['label']))} |"
        lines.append(line)
    return "\n".join(lines)


def mechanism_markdown(runs: list[Run], label_fn, order: list[str]) -> str:
    """The metrics that explain a Table 1: per label, over all steps of all its seeds, the exact
    terms on diagnosed steps (median lambda* = c / v2, share of steps with c > 0, median cosine)
    beside the proxy's (median applied lambda_t, share with c_hat > 0, median v2_hat), and the
    MTP head's acceptance at the first and last step."""
    groups = group_finished(runs, label_fn)

    def values(rs, key):
        return [x for r in rs for x in r.values(key)]

    def med(xs, spec):
        return _fmt(float(np.median(xs)), spec) if xs else "–"

    def pos(xs):
        xs = [x for x in xs if x != 0.0]
        return _fmt(float(np.mean([x > 0 for x in xs])), ".2f") if xs else "–"

    def edge(rs, key, last):
        xs = [v for v in (r.values(key) for r in rs) if v]
        return _fmt(float(np.mean([v[-1] if last else v[0] for v in xs])), ".3f") if xs else "–"

    head = ("| regime | exact λ* (median) | exact c > 0 | exact cosine (median) | applied λ_t (median) | "
            "proxy ĉ > 0 | proxy v̂2 (median) | acceptance first → last |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in order:
        rs = groups.get(label, [])
        if not rs:
            continue
        lines.append(f"| {label} | {med(values(rs, 'diag/lambda_star'), '.3g')} | {pos(values(rs, 'diag/corr'))} | "
                     f"{med(values(rs, 'diag/cosine'), '.3f')} | {med(values(rs, 'mtp/coef'), '.2e')} | "
                     f"{pos(values(rs, 'mtp/corr_proxy'))} | {med(values(rs, 'mtp/penalty_proxy'), '.3g')} | "
                     f"{edge(rs, 'mtp/acceptance', False)} → {edge(rs, 'mtp/acceptance', True)} |")
    return "\n".join(lines)


def ordering_verdict(table: list[dict]) -> str:
    """Whether the paper's Table 1 ordering (occ > detach > policy > ce) shows, from the intervals."""
    rows = {r["label"]: r for r in table}
    signs = {"occ": +1, "policy": -1, "ce": -1}  # the paper's direction of each regime against detach
    parts, agree = [], []
    for reg, sign in signs.items():
        r = rows.get(reg)
        if r is None or "diff" not in r:
            continue
        resolved = r["diff_lo"] > 0 or r["diff_hi"] < 0
        agree.append(resolved and (r["diff"] > 0) == (sign > 0))
        parts.append(f"{reg} − detach = {r['diff']:+.1f} [{r['diff_lo']:+.1f}, {r['diff_hi']:+.1f}]"
                     + (" (resolved)" if resolved else " (interval includes 0)"))
    if not parts:
        return ""
    verdict = ("**The paper's ordering appears at this scale**" if agree and all(agree) else
               "**The paper's ordering (occ above detach, policy and ce below) does not appear at this scale**")
    return (verdict + ": " + "; ".join(parts) + ". The mechanism table above shows what the coefficient "
            "policies did on these runs.")


def write_csv(table: list[dict], path: str | Path) -> None:
    keys = ["label", "seeds", "acc_mean", "acc_std", "diff", "diff_lo", "diff_hi", "acceptance", "reward", "lambda",
            "acc_per_seed"]
    keys += sorted({k for r in table for k in r} - set(keys))  # e.g. the paper's number beside
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in table:
            w.writerow({k: (";".join(map(str, r[k])) if k == "acc_per_seed" else r.get(k)) for k in keys})


# == the theory test (issue 16) ====================================================================
# Labels. The occ variants share regime.name=occ and differ by estimator; Table 2 adds the swept value.
OCC_VARIANTS = {"paper": "occ", "exact": "occ_exact", "reference_code": "occ_reference", "paper_in_clip": "occ_in_clip"}


def regime_label(run: Run) -> str:
    """The regime as the tables name it: occ runs by their estimator (occ, occ_exact, occ_reference)."""
    if run.regime == "occ":
        return OCC_VARIANTS.get(run.estimator, f"occ_{run.estimator}")
    return run.regime


def swept_lambda(run: Run) -> float:
    """The coefficient a lambda sweep varies: lambda_plus for the occ variants, the fixed lambda otherwise."""
    return run.lambda_plus if run.regime == "occ" else run.coef


def cell_label(run: Run) -> str:
    """Table 2's row: the regime and its swept lambda (detach has none: lambda does not reach the trunk)."""
    label = regime_label(run)
    return label if label == "detach" else f"{label} λ={swept_lambda(run):g}"


COLLAPSE_REWARD = 0.05  # a run whose batch reward stays under this to the end has collapsed


def collapsed_runs(runs: list[Run], label_fn) -> list[dict]:
    """The finished runs that collapsed: the mean batch reward of their last 10 steps is under
    COLLAPSE_REWARD (almost no sampled answer right), with the step from which every step's reward
    stayed under it."""
    out = []
    for r in runs:
        tail = r.last_mean("reward/mean")
        if not r.finished or tail is None or tail >= COLLAPSE_REWARD:
            continue
        steps = [(int(row["step"]), row["reward/mean"]) for row in r.rows if isinstance(row.get("reward/mean"), (int, float))]
        above = [step for step, v in steps if v >= COLLAPSE_REWARD]
        out.append({"label": label_fn(r), "seed": r.seed, "from_step": (max(above) + 1) if above else steps[0][0],
                    "final_accuracy": r.accuracy})
    return sorted(out, key=lambda c: (c["label"], c["seed"]))


def collapsed_markdown(collapsed: list[dict]) -> str:
    """One paragraph naming the collapsed runs (empty when none did)."""
    if not collapsed:
        return ""
    by: dict[str, list[str]] = {}
    for c in collapsed:
        by.setdefault(c["label"], []).append(f"seed {c['seed']} (from step {c['from_step']})")
    return (f"**{len(collapsed)} run(s) collapsed** (batch reward under {COLLAPSE_REWARD:g} from the step named to the "
            "end; their final accuracy counts in the cells as it is): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by.items()) + ".")


def missing_cells(runs: list[Run], expected: list[tuple[str, int]], label_fn) -> dict[str, list[int]]:
    """label -> seeds of the expected (label, seed) cells without a finished run (a sweep cut short)."""
    done = {(label_fn(r), r.seed) for r in runs if r.finished}
    out: dict[str, list[int]] = {}
    for label, seed in expected:
        if (label, seed) not in done:
            out.setdefault(label, []).append(seed)
    return out


def missing_markdown(missing: dict[str, list[int]]) -> str:
    if not missing:
        return "All cells finished."
    n = sum(map(len, missing.values()))
    return (f"**{n} cell(s) missing** (re-run the same command to finish them; finished runs are skipped): "
            + "; ".join(f"{k}: seed {', '.join(map(str, v))}" for k, v in missing.items()) + ".")


def _quantiles(x: np.ndarray) -> tuple[float, float]:
    """2.5% and 97.5% order statistics (no interpolation: values may be 0 or inf, i.e. off the grid)."""
    lo, hi = np.quantile(np.asarray(x, dtype=float), [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def break_even(lams, deltas) -> float:
    """The lambda at which `deltas` (ordered by lambda) turn from >= 0 to < 0 for the last time, by
    linear interpolation in log lambda; 0.0 when every delta is < 0 (below the grid), inf when the
    last one is >= 0 (above the grid)."""
    lams, d = np.asarray(lams, dtype=float), np.asarray(deltas, dtype=float)
    if d[-1] >= 0:
        return math.inf
    up = np.flatnonzero(d >= 0)
    if not up.size:
        return 0.0
    i = int(up[-1])
    t = d[i] / (d[i] - d[i + 1])
    return float(math.exp(math.log(lams[i]) + t * (math.log(lams[i + 1]) - math.log(lams[i]))))


def response_curve(cells: dict[float, dict[int, np.ndarray]], ref: dict[int, np.ndarray], n_boot: int = 2000,
                   seed: int = 0, min_seeds: int = 1) -> dict | None:
    """Delta = cell - reference (per-run score vectors: per-problem correctness, or one number) at
    each lambda, with 95% intervals from ONE paired bootstrap shared by all lambdas (the same seeds,
    same problems in each replicate), and the break-even lambda (`break_even`) with its interval
    from the same replicates. Seeds: those every cell on the curve and the reference have. A cell
    sharing fewer than `min_seeds` seeds with the reference (a sweep still running) stays off the
    curve, named in `left_out`, rather than cutting the other cells down to its seeds."""
    left_out = sorted(lam for lam in cells if len(set(cells[lam]) & set(ref)) < min_seeds)
    lams = sorted(lam for lam in cells if lam not in left_out)
    seeds = sorted(set(ref).intersection(*[set(cells[lam]) for lam in lams])) if lams else []
    if not seeds:
        return None
    A = np.stack([np.stack([np.atleast_1d(cells[lam][s]) for s in seeds]) for lam in lams])  # [lam, seed, problem]
    B = np.stack([np.atleast_1d(ref[s]) for s in seeds])
    D = A - B[None]
    point = D.mean(axis=(1, 2))
    rng = np.random.default_rng(seed)
    n_s, n_p = D.shape[1:]
    boots = np.empty((n_boot, len(lams)))
    for i in range(n_boot):
        si, pi = rng.integers(0, n_s, n_s), rng.integers(0, n_p, n_p)
        boots[i] = D[:, si][:, :, pi].mean(axis=(1, 2))
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    crossings = np.array([break_even(lams, b) for b in boots])
    be_lo, be_hi = _quantiles(crossings)
    return {"lams": lams, "seeds": seeds, "delta": point.tolist(), "lo": lo.tolist(), "hi": hi.tolist(),
            "break_even": break_even(lams, point), "break_even_lo": be_lo, "break_even_hi": be_hi, "left_out": left_out}


def measured_curves(runs: list[Run], regimes: list[str], reference: str = "detach", n_boot: int = 2000,
                    min_seeds: int = 1) -> dict:
    """Per regime: the accuracy delta (points) and the final head acceptance delta against
    `reference` over the regime's swept lambdas (`response_curve`; cells with fewer than `min_seeds`
    finished seeds stay off the curve)."""
    groups: dict[str, dict[float, list[Run]]] = {}
    for r in runs:
        if r.finished:
            groups.setdefault(regime_label(r), {}).setdefault(swept_lambda(r), []).append(r)
    ref = [r for rs in groups.get(reference, {}).values() for r in rs]
    out = {}
    for label in regimes:
        cells = groups.get(label)
        if not cells or not ref:
            continue
        acc = response_curve({lam: {r.seed: r.correct for r in rs} for lam, rs in cells.items()},
                             {r.seed: r.correct for r in ref}, n_boot, min_seeds=min_seeds)
        accept = {lam: {r.seed: np.array([r.last_mean("mtp/acceptance")]) for r in rs
                        if r.last_mean("mtp/acceptance") is not None} for lam, rs in cells.items()}
        ref_acc = {r.seed: np.array([r.last_mean("mtp/acceptance")]) for r in ref
                   if r.last_mean("mtp/acceptance") is not None}
        if acc is None:
            continue
        acc = {**acc, **{k: [100 * v for v in acc[k]] for k in ("delta", "lo", "hi")}}
        out[label] = {"accuracy": acc, "acceptance": response_curve(accept, ref_acc, n_boot, min_seeds=min_seeds),
                      "acceptance_abs": {lam: _mean([r.last_mean("mtp/acceptance") for r in rs])
                                         for lam, rs in sorted(cells.items())},
                      "acceptance_ref": _mean([r.last_mean("mtp/acceptance") for r in ref])}
    return out


# -- the prediction: L*eta from the Taylor check, exact c and v2 -----------------------------------
def diag_steps(run: Run) -> dict[str, np.ndarray]:
    """The diagnosed steps of a run (depth 1): exact c, v2, the applied lambda and its scale
    s = lambda_t / (swept lambda) (1 for a fixed lambda; the estimator's c/v2 ratio for occ), and,
    where the Taylor check ran, its curvature term q = (first - second order) / eta^2 = (g + u/2)^T H u
    and the theory's value of q / L: lambda*c + lambda^2*v2/2 (u = lambda * g_MTP, H = L*I)."""
    keys = ("diag/corr", "diag/penalty", "diag/lambda_applied")
    rows = [r for r in run.rows if all(isinstance(r.get(k), (int, float)) for k in keys)
            and all(math.isfinite(r[k]) for k in keys)]
    c = np.array([r["diag/corr"] for r in rows], dtype=float)
    v2 = np.array([r["diag/penalty"] for r in rows], dtype=float)
    lam = np.array([r["diag/lambda_applied"] for r in rows], dtype=float)
    scale = swept_lambda(run)
    s = lam / scale if scale else np.zeros_like(lam)
    tay = [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in
                                  ("diag/delta_mtp_predicted", "diag/delta_mtp_predicted2", "diag/taylor_eta"))]
    eta = np.array([r["diag/taylor_eta"] for r in tay], dtype=float)
    q = np.array([(r["diag/delta_mtp_predicted"] - r["diag/delta_mtp_predicted2"]) / r["diag/taylor_eta"] ** 2
                  for r in tay], dtype=float)
    den = np.array([r["diag/lambda_applied"] * r["diag/corr"] + r["diag/lambda_applied"] ** 2 * r["diag/penalty"] / 2
                    for r in tay], dtype=float)
    return {"c": c, "v2": v2, "s": s, "q": q, "den": den, "taylor_eta": eta}


def train_eta(run: Run) -> tuple[float | None, str]:
    """The step size the theory's eta stands for: the optimiser's effective step along the gradient,
    median of ||delta theta_trunk|| / ||g_trunk|| when the learner logs `train/trunk_update_norm`,
    else the Taylor check's SGD step (`diag/taylor_eta`, default optimizer.lr)."""
    ratios = [r["train/trunk_update_norm"] / r["train/trunk_grad_norm"] for r in run.rows
              if isinstance(r.get("train/trunk_update_norm"), (int, float)) and r.get("train/trunk_grad_norm")]
    if ratios:
        return float(np.median(ratios)), "update/gradient norm"
    etas = run.values("diag/taylor_eta")
    return (float(np.median(etas)), "taylor_eta") if etas else (None, "none")


def _predict(parts: list[dict[str, np.ndarray]], eta: float) -> dict:
    """Point prediction from pooled diagnosed steps: L = sum q / sum (q / L), then the paper's
    per-step gain and lambda_0 with the run's applied-lambda scale s:
    gain(lam) = eta * (lam*(1-L*eta)*mean(s*c) - L*eta*lam^2*mean(s^2*v2)/2),
    lambda_0 = 2*(1-L*eta)*mean(s*c) / (L*eta*mean(s^2*v2))."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("c", "v2", "s", "q", "den")}
    den = cat["den"].sum()
    L = float(cat["q"].sum() / den) if cat["q"].size and den != 0 else math.nan
    mc, mv = float(np.mean(cat["s"] * cat["c"])), float(np.mean(cat["s"] ** 2 * cat["v2"]))
    le = L * eta
    if not math.isfinite(le) or (le <= 0 and mc == 0):  # no data, or a gain of 0 at every lambda
        lam0 = math.nan
    elif le <= 0 or mv <= 0:  # no curvature cost: the gain grows with lambda while c > 0
        lam0 = math.inf if mc > 0 else 0.0
    else:
        lam0 = max(2 * (1 - le) * mc / (le * mv), 0.0)  # <= 0: the MTP term costs at every lambda > 0
    return {"L": L, "L_eta": le, "c": mc, "v2": mv, "lambda_0": lam0}


def predicted_curve(runs: list[Run], grid, eta: float | None = None, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The theory's prediction for one regime from its runs' diagnosed steps (all its lambdas
    pooled): L*eta, mean c and v2, lambda_0 and the per-step gain over `grid`, each with a 95%
    interval from a bootstrap over runs (seeds) and, within each, over diagnosed steps."""
    parts = [(diag_steps(r), r) for r in runs]
    parts = [(p, r) for p, r in parts if p["c"].size]
    if not parts:
        return None
    etas = [train_eta(r) for _, r in parts]
    source = "--eta" if eta is not None else etas[0][1]
    eta = eta if eta is not None else _mean([e for e, _ in etas])
    if eta is None:
        return None
    grid = np.asarray(grid, dtype=float)

    def gain(pred):
        le = pred["L_eta"]
        return eta * (grid * (1 - le) * pred["c"] - le * grid**2 * pred["v2"] / 2)

    point = _predict([p for p, _ in parts], eta)
    rng = np.random.default_rng(seed)
    lam0s, les, gains = [], [], []
    for _ in range(n_boot):
        sample = []
        for j in rng.integers(0, len(parts), len(parts)):
            p = parts[j][0]
            ix = rng.integers(0, p["c"].size, p["c"].size)
            jx = rng.integers(0, p["q"].size, p["q"].size) if p["q"].size else np.array([], dtype=int)
            sample.append({**{k: p[k][ix] for k in ("c", "v2", "s")}, "q": p["q"][jx], "den": p["den"][jx]})
        b = _predict(sample, eta)
        lam0s.append(b["lambda_0"])
        les.append(b["L_eta"])
        gains.append(gain(b))
    finite = [x for x in lam0s if not math.isnan(x)]
    lo, hi = _quantiles(finite) if finite else (math.nan, math.nan)
    g = np.array(gains)
    le_ok = [x for x in les if math.isfinite(x)]
    return {**point, "eta": eta, "eta_source": source, "runs": len(parts),
            "steps": int(sum(p["c"].size for p, _ in parts)), "taylor_steps": int(sum(p["q"].size for p, _ in parts)),
            "lambda_0_lo": lo, "lambda_0_hi": hi,
            "L_eta_lo": _quantiles(le_ok)[0] if le_ok else math.nan, "L_eta_hi": _quantiles(le_ok)[1] if le_ok else math.nan,
            "grid": grid.tolist(), "gain": gain(point).tolist() if math.isfinite(point["L_eta"]) else [],
            "gain_lo": np.nanpercentile(g, 2.5, axis=0).tolist() if math.isfinite(point["L_eta"]) else [],
            "gain_hi": np.nanpercentile(g, 97.5, axis=0).tolist() if math.isfinite(point["L_eta"]) else []}


def _interval_on_grid(lo: float, hi: float, grid) -> tuple[float, float]:
    """A break-even interval with its off-grid ends made concrete: 'below the grid' (0) reaches up
    to the smallest lambda, 'above the grid' (inf) down to the largest."""
    return (max(grid) if lo == math.inf else lo), (min(grid) if hi == 0.0 else hi)


def fmt_lambda(x: float, grid) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"< {min(grid):g}" if x == 0.0 else f"> {max(grid):g}" if x == math.inf else f"{x:.3g}"


def theory_verdict(measured: dict | None, predicted: dict | None, grid) -> tuple[str, str]:
    """(status, sentence): does the measured break-even lambda (accuracy delta vs detach crossing 0)
    agree with the predicted lambda_0 within their 95% intervals? status is agree, disagree,
    untestable (the measured deltas do not place a break-even inside the grid) or no data."""
    if not measured or not predicted or math.isnan(predicted.get("lambda_0", math.nan)) \
            or math.isnan(predicted.get("lambda_0_lo", math.nan)):
        return "no data", "not enough data (needs finished runs at several lambdas and Taylor-check steps)"
    m_lo, m_hi = _interval_on_grid(measured["break_even_lo"], measured["break_even_hi"], grid)
    p_lo, p_hi = _interval_on_grid(predicted["lambda_0_lo"], predicted["lambda_0_hi"], grid)
    m = (f"measured break-even {fmt_lambda(measured['break_even'], grid)} [{fmt_lambda(measured['break_even_lo'], grid)}, "
         f"{fmt_lambda(measured['break_even_hi'], grid)}]")
    p = (f"predicted λ0 {fmt_lambda(predicted['lambda_0'], grid)} [{fmt_lambda(predicted['lambda_0_lo'], grid)}, "
         f"{fmt_lambda(predicted['lambda_0_hi'], grid)}]")
    if measured["break_even_lo"] == 0.0 and measured["break_even_hi"] == math.inf:
        return "untestable", f"{m}: the accuracy deltas do not place a break-even inside the grid; {p}"
    if max(m_lo, p_lo) <= min(m_hi, p_hi):
        return "agree", f"{m} and {p} overlap"
    return "disagree", f"{m} and {p} do not overlap"


def _sign(lo: float, hi: float) -> str:
    return "+" if lo > 0 else "−" if hi < 0 else "0"


def sign_check(measured: dict | None, predicted: dict | None) -> list[dict]:
    """At each measured lambda inside the prediction's grid: the sign of the measured accuracy delta
    and of the predicted per-step gain (log-linear interpolation on the grid), each '+' / '−' where
    its 95% interval excludes 0 and '0' where it does not. status: agree (both resolved, same sign),
    disagree (both resolved, opposite signs) or unresolved. The break-even verdict tests one crossing;
    this tests the curve's sign wherever it was measured."""
    if not measured or not predicted or not predicted.get("gain"):
        return []
    grid = np.log(np.asarray(predicted["grid"], dtype=float))
    rows = []
    for lam, lo, hi in zip(measured["lams"], measured["lo"], measured["hi"]):
        x = math.log(lam)
        if not grid[0] <= x <= grid[-1]:
            continue
        g, g_lo, g_hi = (float(np.interp(x, grid, predicted[k])) for k in ("gain", "gain_lo", "gain_hi"))
        m, p = _sign(lo, hi), _sign(g_lo, g_hi)
        status = "unresolved" if "0" in (m, p) else "agree" if m == p else "disagree"
        rows.append({"lam": lam, "measured": m, "predicted": p, "point": _sign(g, g), "gain": g, "gain_lo": g_lo,
                     "gain_hi": g_hi, "status": status})
    return rows


def sign_markdown(rows: list[dict]) -> str:
    """'; signs ...' for a verdict sentence ('' without rows)."""
    if not rows:
        return ""
    by = {s: ", ".join(f"{r['lam']:g}" for r in rows if r["status"] == s) for s in ("agree", "disagree", "unresolved")}
    resolved = [r for r in rows if r["measured"] != "0"]
    return ("; signs by λ, measured/predicted ('0': its 95% interval includes 0; the predicted point's sign in "
            "brackets): " + ", ".join(f"{r['lam']:g} {r['measured']}/{r['predicted']}({r['point']})" for r in rows)
            + " — " + "; ".join(f"{s} at λ = {v}" for s, v in by.items() if v)
            + (f"; the predicted point has the measured sign at {sum(r['point'] == r['measured'] for r in resolved)} of "
               f"the {len(resolved)} λ with a resolved measurement" if resolved else ""))


# -- the proxy under the microscope ----------------------------------------------------------------
# estimator -> the diag/ metric holding its lambda on a diagnosed mini-batch
ESTIMATOR_METRICS = {"paper": "diag/lambda_proxy", "reference_code": "diag/lambda_reference_code",
                     "paper_in_clip": "diag/lambda_paper_in_clip"}


def proxy_observations(runs: list[Run], regimes=("policy", "occ", "occ_exact")) -> list[dict]:
    """One observation per diagnosed (run, step, mini-batch): lambda* and each estimator's lambda,
    all divided by the run's lambda_plus. Per-mini-batch metrics `diag/<name>_mb<i>` (i from 0)
    are used when the learner logs them; otherwise the unsuffixed diag/* are the step's last
    mini-batch (index num_mini_batches - 1). Only regimes whose MTP term is the policy loss (the
    quantity the proxy estimates) count: ce's lambda* belongs to another loss."""
    obs = []
    for run in runs:
        if regime_label(run) not in regimes:
            continue
        scale = run.lambda_plus or 1.0
        for row in run.rows:
            mbs = sorted(int(k.rsplit("_mb", 1)[1]) for k in row if k.startswith("diag/lambda_star_mb"))
            suffixes = [(i, f"_mb{i}") for i in mbs] or ([(run.num_mini_batches - 1, "")] if "diag/lambda_star" in row else [])
            for i, sfx in suffixes:
                star = row.get("diag/lambda_star" + sfx)
                if not isinstance(star, (int, float)) or not math.isfinite(star):
                    continue
                o = {"regime": regime_label(run), "seed": run.seed, "step": int(row["step"]), "mb": i,
                     "progress": int(row["step"]) / max(run.total_steps, int(row["step"]), 1), "star": star / scale}
                for est, key in ESTIMATOR_METRICS.items():
                    v = row.get(key + sfx)
                    o[est] = v / scale if isinstance(v, (int, float)) and math.isfinite(v) else None
                obs.append(o)
    return obs


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def agreement(est, star, n_boot: int = 500, seed: int = 0) -> dict:
    """Sign agreement of an estimator with lambda* (over observations with lambda* != 0; an
    estimate of exactly 0 counts as a disagreement) and the Spearman rank correlation, each with
    a 95% bootstrap interval over observations; `zero` is the share of estimates that are exactly 0."""
    est, star = np.asarray(est, dtype=float), np.asarray(star, dtype=float)
    keep = star != 0
    est, star = est[keep], star[keep]
    n = len(est)
    if n == 0:
        return {"n": 0}
    sign = np.sign(est) == np.sign(star)
    rng = np.random.default_rng(seed)
    sb, rb = [], []
    for _ in range(n_boot):
        ix = rng.integers(0, n, n)
        sb.append(sign[ix].mean())
        rb.append(spearman(est[ix], star[ix]))
    rb = [r for r in rb if not math.isnan(r)]
    rho_lo, rho_hi = (np.percentile(rb, [2.5, 97.5]).tolist() if rb else [math.nan, math.nan])
    s_lo, s_hi = np.percentile(sb, [2.5, 97.5]).tolist()
    return {"n": n, "sign": float(sign.mean()), "sign_lo": s_lo, "sign_hi": s_hi, "rho": spearman(est, star),
            "rho_lo": rho_lo, "rho_hi": rho_hi, "zero": float(np.mean(est == 0))}


def proxy_table(obs: list[dict], phases: int = 4, n_boot: int = 500) -> list[dict]:
    """Agreement of each estimator with lambda*, by mini-batch index (all steps) and by phase of
    training (quantiles of step / total steps, all mini-batches)."""
    rows = []
    groups: list[tuple[str, str, list[dict]]] = []
    for i in sorted({o["mb"] for o in obs}):
        groups.append(("mini-batch", f"{i + 1}" + (" (on-policy: d_rl = 0)" if i == 0 else ""),
                       [o for o in obs if o["mb"] == i]))
    edges = np.linspace(0, 1, phases + 1)
    for j in range(phases):
        lo, hi = edges[j], edges[j + 1]
        groups.append(("training", f"{100 * lo:.0f}-{100 * hi:.0f}% of steps",
                       [o for o in obs if lo < o["progress"] <= hi or (j == 0 and o["progress"] == 0)]))
    for kind, name, sel in groups:
        for est in ESTIMATOR_METRICS:
            pairs = [(o[est], o["star"]) for o in sel if o[est] is not None]
            if not pairs:
                continue
            a = agreement([p[0] for p in pairs], [p[1] for p in pairs], n_boot)
            if a["n"]:
                rows.append({"by": kind, "group": name, "estimator": est, **a})
    return rows


def proxy_markdown(rows: list[dict]) -> str:
    head = "| by | group | estimator | n | sign agreement [95% CI] | Spearman ρ [95% CI] | exactly 0 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['by']} | {r['group']} | {r['estimator']} | {r['n']} | {r['sign']:.2f} "
                     f"[{r['sign_lo']:.2f}, {r['sign_hi']:.2f}] | {_fmt(r['rho'], '+.2f')} [{_fmt(r['rho_lo'], '+.2f')}, "
                     f"{_fmt(r['rho_hi'], '+.2f')}] | {r['zero']:.2f} |")
    return "\n".join(lines)


# -- the compute plan ------------------------------------------------------------------------------
def seconds_per_step(root: str | Path) -> dict[str, float]:
    """Measured wall seconds per RL step (`time/step_s`, evaluations included) of every run below
    `root`, by regime label, plus '*' over all runs; {} when there are none."""
    per: dict[str, list[float]] = {}
    root = Path(root)
    for run in (collect_runs(root) if root.exists() else []):
        xs = run.values("time/step_s")
        if xs:
            per.setdefault(regime_label(run), []).extend(xs)
            per.setdefault("*", []).extend(xs)
    return {k: float(np.mean(v)) for k, v in per.items()}


def steps_done(runs: list[Run]) -> dict[tuple[str, int], int]:
    """(label, seed) -> last logged step (label: `cell_label`), to plan what a resumed sweep still runs."""
    out = {}
    for r in runs:
        steps = [int(x["step"]) for x in r.rows if "step" in x]
        out[(cell_label(r), r.seed)] = r.total_steps if r.finished else (max(steps) if steps else 0)
    return out


# -- FINDINGS.md ------------------------------------------------------------------------------------
def _ci(d: dict, key: str, spec: str = "+.1f") -> str:
    return f"{d[key]:{spec}} [{d[key + '_lo']:{spec}}, {d[key + '_hi']:{spec}}]"


def _resolved(lo: float, hi: float) -> str:
    return "above 0" if lo > 0 else "below 0" if hi < 0 else "interval includes 0"


def findings_markdown(t1: dict | None, t2: dict | None, proxy: dict | None, command: str, commit: str) -> str:
    """results/FINDINGS.md from the JSON summaries the table / proxy commands write (every number
    here comes from them; a missing summary is said to be missing)."""
    out = ["# Findings at the tiny scale", "",
           f"Generated by `{command}` at commit `{commit}` from the summaries "
           + ", ".join(f"`{s['file']}` (`{s['command']}`, commit `{s['commit']}`)" for s in (t1, t2, proxy) if s)
           + ". Read this first; the tables and figures are in the files it names.", ""]
    out += ["## What reproduces (Table 1)", ""]
    if t1:
        rows = {r["label"]: r for r in t1["rows"]}
        ref = rows.get("detach")
        have = sorted({r.get("seeds", 0) for r in rows.values()})
        seeds = f"{have[0]}" if len(have) == 1 else f"{have[0]}-{have[-1]}"
        if have and have[-1] < t1["seeds"]:
            seeds += f" of the {t1['seeds']} planned"
        out.append(f"{seeds} seeds x {t1['steps']} RL steps per regime; final accuracy on the held-out problems "
                   f"(points); Δ = regime − detach with a paired 95% bootstrap interval; the paper's Δ (MiMo-7B-RL + DAPO) beside.")
        out.append("")
        for label, r in rows.items():
            if "diff" not in r:
                continue
            paper = t1["paper"].get(label)
            pd = f"; paper: {paper - t1['paper']['detach']:+.1f}" if paper is not None and ref else ""
            head = ""
            if r.get("acceptance") is not None and ref and ref.get("acceptance") is not None:
                head = f"; head acceptance {r['acceptance']:.3f} vs detach {ref['acceptance']:.3f}"
            out.append(f"- **{label}**: Δ = {_ci(r, 'diff')} ({_resolved(r['diff_lo'], r['diff_hi'])}){pd}{head}")
        out += ["", t1.get("verdict") or "", ""]
        if t1.get("collapsed"):
            out += [collapsed_markdown(t1["collapsed"]), ""]
        if t1.get("missing"):
            out += [missing_markdown(t1["missing"]), ""]
    else:
        out += ["Table 1 has not been run (`python scripts/reproduce.py table1`).", ""]
    out += ["## The theory's prediction against the outcome (Table 2)", ""]
    verdicts = (t2 or {}).get("verdicts", {})
    if t2 and verdicts:
        out.append("Per regime: L·η from the Taylor check's second-order term, exact c and v2 on the diagnosed "
                   "steps, the predicted break-even λ0 = 2(1−Lη)c/(Lη·v2) (λ_plus for occ) and the measured "
                   "one (where the accuracy delta vs detach crosses 0), both with 95% bootstrap intervals.")
        out.append("")
        for label, (status, text) in verdicts.items():
            p = t2["predicted"].get(label) or {}  # a regime without runs: None
            m = (t2["measured"].get(label) or {}).get("accuracy")
            lead = f"- **{label}** ({status}): {text}"
            if p:
                lead += (f"; L·η = {p['L_eta']:.3g} [{p['L_eta_lo']:.3g}, {p['L_eta_hi']:.3g}] (η from "
                         f"{p['eta_source']}), mean c = {p['c']:.3g}, mean v2 = {p['v2']:.3g} over {p['steps']} "
                         f"diagnosed steps")
            if m:
                lead += "; Δ accuracy by λ: " + ", ".join(f"{lam:g}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for lam, d, lo, hi
                                                          in zip(m["lams"], m["delta"], m["lo"], m["hi"]))
            out.append(lead + ".")
        if any(p and p.get("eta_source") == "taylor_eta" for p in t2["predicted"].values()):
            out.append("- Caveat: η here is the Taylor check's SGD step (`diagnostics.taylor_eta`, default optimizer.lr), "
                       "not AdamW's effective step along the gradient, which is what the training runs took; λ0 scales "
                       "as 1/(Lη), so the prediction is only as good as η (the learner's `train/trunk_update_norm` gives "
                       "the effective step; `--eta` sets it by hand). The theory is also about the raw gradient "
                       "direction, while Adam preconditions it.")
        counts = {s: sum(1 for v in verdicts.values() if v[0] == s) for s in ("agree", "disagree", "untestable", "no data")}
        summary_line = "Summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."
        signs = [r for rows in (t2.get("signs") or {}).values() for r in rows]
        if signs:  # the curve's sign wherever it was measured (sign_check)
            n = {s: sum(r["status"] == s for r in signs) for s in ("agree", "disagree", "unresolved")}
            summary_line += (f" Sign check over the {len(signs)} measured (regime, λ) cells: {n['agree']} agree, "
                             f"{n['disagree']} disagree, {n['unresolved']} unresolved (the measured delta or the "
                             "predicted gain has a 95% interval that includes 0).")
        out += ["", summary_line, ""]
        if t2.get("collapsed"):
            out += [collapsed_markdown(t2["collapsed"]), ""]
        if t2.get("missing"):
            out += [missing_markdown(t2["missing"]), ""]
    else:
        out += ["Table 2 has not been run (`python scripts/reproduce.py table2`).", ""]
    out += ["## The paper's proxy against the exact λ*", ""]
    best = None
    if proxy and proxy.get("rows"):
        last = max(int(r["group"].split()[0]) for r in proxy["rows"] if r["by"] == "mini-batch")
        for r in proxy["rows"]:
            if r["by"] == "mini-batch" and int(r["group"].split()[0]) in (1, last):
                out.append(f"- {r['estimator']}, mini-batch {r['group']}: sign agreement {_ci(r, 'sign', '.2f')}, "
                           f"Spearman ρ {_ci(r, 'rho', '+.2f')} (n = {r['n']})")
        cands = [r for r in proxy["rows"] if r["by"] == "mini-batch" and int(r["group"].split()[0]) == last
                 and not math.isnan(r["rho"])]
        best = max(cands, key=lambda r: r["rho"]) if cands else None
        if not proxy.get("per_mini_batch"):
            out.append("- Only the last mini-batch of each diagnosed step is logged; the by-mini-batch comparison "
                       "needs the learner's per-mini-batch diagnostics (`diag/<name>_mb<i>`).")
        out.append("")
    else:
        out += ["The proxy comparison has not been run (`python scripts/reproduce.py proxy`).", ""]
    out += ["## Suggestion for a real-scale run", ""]
    n_before = len(out)
    if best is not None:
        if best["rho_lo"] > 0:
            out.append(f"- Estimator: `{best['estimator']}` ranks mini-batches most like the exact λ* (ρ = "
                       f"{_ci(best, 'rho', '+.2f')}); try it first.")
        else:
            out.append(f"- Estimator: no cheap estimator's rank correlation with λ* is resolved above 0 (best: "
                       f"`{best['estimator']}`, ρ = {_ci(best, 'rho', '+.2f')}); only the oracle (`estimator=exact`) "
                       "follows λ*: try it first where two extra backward passes per mini-batch are affordable.")
    occ = (t2 or {}).get("measured", {}).get("occ", {}).get("accuracy")
    if occ:
        i = int(np.argmax(occ["delta"]))
        if occ["lo"][i] > 0:
            out.append(f"- λ_plus: {occ['lams'][i]:g}, the best measured (Δ = {occ['delta'][i]:+.1f} "
                       f"[{occ['lo'][i]:+.1f}, {occ['hi'][i]:+.1f}]).")
        else:
            pred = [(lab, p) for lab, p in (t2.get("predicted") or {}).items() if lab in ("occ_exact", "occ") and p
                    and math.isfinite(p.get("lambda_0", math.nan)) and 0 < p["lambda_0"]]
            if pred:
                lab, p = pred[0]
                opt = (f"λ0/2 = {p['lambda_0'] / 2:.2g} [{p['lambda_0_lo'] / 2:.2g}, {p['lambda_0_hi'] / 2:.2g}]")
                if 0 < p["lambda_0_lo"] and math.isfinite(p["lambda_0_hi"]):
                    out.append(f"- λ_plus: no measured value is resolved above detach; the theory's optimum from {lab}'s "
                               f"terms is {opt}: start there.")
                else:  # an interval reaching 0 or infinity is no guidance
                    out.append(f"- λ_plus: no measured value is resolved above detach, and the theory's optimum from "
                               f"{lab}'s terms is not resolved ({opt}): keep the paper's.")
            else:
                out.append("- λ_plus: neither the measured curve nor the theory places an optimum; keep the paper's.")
    if len(out) == n_before:
        out.append("- Not enough results for a suggestion yet.")
    return "\n".join(out).rstrip() + "\n"
