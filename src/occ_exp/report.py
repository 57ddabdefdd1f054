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
    from omegaconf import OmegaConf

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
    return Run(path, str(r.name), int(cfg.seed), float(r.coef), str(r.estimator), float(r.head_ce), acc, correct, rows)


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


def regime_table(runs: list[Run], label_fn, order: list[str], reference: str = "detach") -> list[dict]:
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
            d, lo, hi = bootstrap_diff({r.seed: r.correct for r in rs}, ref)
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
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in table:
            w.writerow({k: (";".join(map(str, r[k])) if k == "acc_per_seed" else r.get(k)) for k in keys})


def run_summary(run_dir: str | Path) -> list[str]:
    """A few lines on one finished run for the end of `python -m occ_exp.train`: held-out accuracy
    before (step 0) and after (the final evaluation), the applied lambda_t, the MTP head's
    expected acceptance first and last, and the exact c and v2 where steps were diagnosed."""
    run = load_run(run_dir)
    rows = run.rows if run is not None else (read_metrics(Path(run_dir) / "metrics.jsonl")
                                             if (Path(run_dir) / "metrics.jsonl").exists() else [])
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"held-out accuracy {first['eval/accuracy']:.3f} (step {first['step']}, n={first.get('eval/n')}) -> "
                     f"{last['eval/accuracy']:.3f} (step {last['step']}, n={last.get('eval/n')})")
    probe = run or Run(Path(run_dir), "", 0, 0.0, "", 0.0, None, None, rows)
    coefs, accept = probe.values("mtp/coef"), probe.values("mtp/acceptance")
    if coefs:
        lines.append(f"lambda_t mean {np.mean(coefs):+.3g}, last {coefs[-1]:+.3g} ({len(coefs)} steps)")
    if accept:
        lines.append(f"MTP acceptance {accept[0]:.3f} -> {accept[-1]:.3f}")
    corr, pen = probe.values("diag/corr"), probe.values("diag/penalty")
    if corr and pen:
        lines.append(f"exact c mean {np.mean(corr):+.3g}, v2 mean {np.mean(pen):.3g} ({len(corr)} diagnosed steps)")
    return lines
