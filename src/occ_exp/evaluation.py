"""Evaluation on benchmarks: k sampled answers per problem, each scored by the verifier, aggregated
into avg@k (the paper's metric) and unbiased pass@k. The trainer's in-loop evaluation and the
command line (occ_exp.evaluate) use this one code path.

A benchmark is a list of Problem(prompt, answer) (occ_exp.data.benchmarks); prompts are formatted
for the model (occ_exp.data.prompts), sampled through the rollout interface and scored by the
reward function of the benchmark (math-verify; the countdown task adds its number-usage check).
Per benchmark, with s_ij the score of sample j of problem i (N problems, k samples):

    avg@k  = 1/N sum_i 1/k sum_j s_ij                    (mean accuracy over the k samples)
    pass@m = 1/N sum_i [1 - C(k - c_i, m) / C(k, m)]     (unbiased; c_i correct samples of problem i)

`write_eval` writes <run dir>/eval.json (per benchmark and averaged: avg@k, pass@m, unparsable
answers, verifier timeouts, response length) and <run dir>/eval.md, a table in the layout of the
paper's Table 1; `table_from_files` puts several eval.json files (one row per model or regime) in one.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from occ_exp.data.benchmarks import BENCHMARKS, Benchmark, DataError
from occ_exp.data.prompts import format_prompts
from occ_exp.reward.rewards import REWARDS
from occ_exp.reward.verifier import extract_answer
from occ_exp.rollout.base import sampling


# -- metrics ------------------------------------------------------------------------------------
def avg_at_k(scores) -> float:
    """Mean accuracy over the k samples, averaged over problems; `scores` is [N problems, k]."""
    s = np.asarray(scores, dtype=float)
    return float(s.mean()) if s.size else 0.0


def pass_at_k(scores, m: int) -> float:
    """Unbiased pass@m from k >= m samples per problem (Chen et al., 2021): the chance that at
    least one of m samples drawn without replacement from the k is correct, averaged over problems."""
    s = np.asarray(scores) > 0.5
    n_problems, k = s.shape
    if not 1 <= m <= k:
        raise ValueError(f"pass@{m} needs 1 <= m <= k={k}")
    out = []
    for c in s.sum(1):
        # 1 - C(k-c, m)/C(k, m) = 1 - prod_{i=k-c+1}^{k} (1 - m/i), stable for large k
        out.append(1.0 if k - c < m else 1.0 - float(np.prod(1.0 - m / np.arange(k - c + 1, k + 1))))
    return float(np.mean(out)) if out else 0.0


def pass_ks(k: int) -> list[int]:
    """The m reported for pass@m: powers of two below k, and k."""
    return sorted({2**i for i in range(int(math.log2(k)) + 1) if 2**i < k} | {k})


# -- scoring ------------------------------------------------------------------------------------
class Scorers:
    """The reward function of each kind a benchmark asks for ("math", "countdown"); kinds not
    given are built on demand, sharing the first reward's verifier pool. Closes only what it built."""

    def __init__(self, rewards: dict | None = None):
        self.rewards = dict(rewards or {})
        self._built: list = []

    def __getitem__(self, kind: str):
        if kind not in self.rewards:
            shared = next(iter(self.rewards.values()), None)
            fn = REWARDS[kind](verifier=shared.verifier) if shared is not None else REWARDS[kind]()
            self.rewards[kind] = fn
            self._built.append(fn)
        return self.rewards[kind]

    def close(self) -> None:
        for fn in reversed(self._built):  # borrowers before an owner of the shared pool
            fn.close()
        self._built.clear()


class Evaluator:
    """Answers every problem of each benchmark eval.k times and scores the answers."""

    def __init__(self, rollout, tokenizer, eval_cfg, chat_template: bool = True, scorers: Scorers | None = None,
                 dist=None):
        """Under several ranks (`dist`), each rank answers every world_size-th problem and the
        score matrices and counts are summed, so every rank returns the same result."""
        self.dist = dist
        self.rollout = rollout
        self.tokenizer = tokenizer
        self.cfg = eval_cfg
        self.chat_template = chat_template
        self.scorers = scorers or Scorers()

    def run(self, benchmarks: Sequence[Benchmark], samples_path: str | Path | None = None) -> dict:
        """Metrics per benchmark and their average (eval.json's layout). Sampling is seeded by
        eval.seed inside a forked RNG, so evaluating never changes a training run's random stream."""
        c = self.cfg
        greedy = c.temperature == 0
        overrides = {"top_p": c.top_p}
        if not greedy:
            overrides["temperature"] = c.temperature
        if c.max_new_tokens:
            overrides["max_new_tokens"] = c.max_new_tokens
        out: dict = {"k": c.k, "temperature": c.temperature, "top_p": c.top_p,
                     "max_new_tokens": c.max_new_tokens or int(self.rollout.cfg.max_new_tokens), "benchmarks": {}}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(c.seed)
            stack.enter_context(sampling(self.rollout, **overrides))
            samples = stack.enter_context(open(samples_path, "w")) if samples_path else None
            for bench in benchmarks:
                out["benchmarks"][bench.name] = self._benchmark(bench, greedy, samples)
        out["average"] = average(out["benchmarks"])
        return out

    def _benchmark(self, bench: Benchmark, greedy: bool, samples) -> dict:
        k, bs = self.cfg.k, self.cfg.batch_size
        reward = self.scorers[bench.reward]
        problems = bench.problems
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        mine = list(range(rank, len(problems), world))
        scores = np.zeros((len(problems), k))
        lengths, truncated = [], []
        unparsed = timeouts = 0
        t0 = time.perf_counter()
        for start in range(0, len(mine), bs):
            rows = mine[start : start + bs]
            chunk = [problems[i] for i in rows]
            batch = self.rollout.generate(format_prompts(chunk, self.tokenizer, self.chat_template), k, greedy=greedy)
            owner = batch.prompt_index.tolist()
            r, stats = reward(batch.texts, [chunk[i] for i in owner])
            unparsed += int(stats.get("reward/unparsed", 0))
            timeouts += int(stats.get("reward/timeouts", 0))
            lengths += batch.response_mask.sum(-1).tolist()
            truncated += batch.truncated.tolist()
            slot = [0] * len(chunk)
            for row, (i, score) in enumerate(zip(owner, r.tolist())):
                scores[rows[i], slot[i]] = score
                if samples is not None:
                    samples.write(json.dumps({"benchmark": bench.name, "problem": rows[i], "sample": slot[i],
                                              "response": batch.texts[row], "extracted": extract_answer(batch.texts[row]),
                                              "answer": chunk[i].answer, "score": score}) + "\n")
                slot[i] += 1
        n_len, sum_len, sum_trunc = len(lengths), float(np.sum(lengths)), float(np.sum(truncated))
        if world > 1:  # every rank filled its own rows: sum them
            scores = self.dist.all_reduce(torch.from_numpy(scores)).numpy()
            unparsed, timeouts = int(self.dist.sum(unparsed)), int(self.dist.sum(timeouts))
            n_len, sum_len, sum_trunc = self.dist.sum(n_len), self.dist.sum(sum_len), self.dist.sum(sum_trunc)
        return {
            "title": BENCHMARKS[bench.name], "n": len(problems), "k": k,
            "avg@k": avg_at_k(scores),
            "pass@k": {str(m): pass_at_k(scores, m) for m in pass_ks(k)},
            "unparsed": unparsed, "timeouts": timeouts,
            "response_len": sum_len / n_len if n_len else 0.0,
            "truncated": sum_trunc / n_len if n_len else 0.0,
            "seconds": time.perf_counter() - t0,
            "correct": (scores > 0.5).sum(1).astype(int).tolist(),  # per problem, out of k (paired comparisons)
        }

    def close(self) -> None:
        self.scorers.close()


def average(per_benchmark: dict) -> dict:
    """The table's Avg column: the unweighted mean over benchmarks (as in the paper's Table 1);
    counts are summed."""
    rows = list(per_benchmark.values())
    if not rows:
        return {}
    n_samples = sum(r["n"] * r["k"] for r in rows)
    return {
        "avg@k": float(np.mean([r["avg@k"] for r in rows])),
        "pass@k": {m: float(np.mean([r["pass@k"][m] for r in rows])) for m in rows[0]["pass@k"]},
        "n": sum(r["n"] for r in rows),
        "unparsed": sum(r["unparsed"] for r in rows),
        "timeouts": sum(r["timeouts"] for r in rows),
        "response_len": sum(r["response_len"] * r["n"] * r["k"] for r in rows) / max(n_samples, 1),
    }


def eval_metrics(result: dict) -> dict:
    """eval.json's numbers as metrics.jsonl keys: `eval/accuracy` is the Avg of avg@k over the
    benchmarks; `eval/<benchmark>/accuracy` per benchmark; pass@m when k > 1."""
    avg, k = result["average"], result["k"]
    m = {"eval/accuracy": avg["avg@k"], "eval/n": avg["n"], "eval/response_len": avg["response_len"],
         "eval/unparsed": avg["unparsed"], "eval/timeouts": avg["timeouts"]}
    for name, b in result["benchmarks"].items():
        m[f"eval/{name}/accuracy"] = b["avg@k"]
        if k > 1:
            m[f"eval/{name}/pass@{k}"] = b["pass@k"][str(k)]
    if k > 1:
        m.update({f"eval/pass@{j}": v for j, v in avg["pass@k"].items()})
    return m


# -- tables -------------------------------------------------------------------------------------
def results_table(results: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    """A Markdown table in the layout of the paper's Table 1: one row per result (a model or a
    regime), one column per benchmark in the paper's order, then Avg; avg@k in percent."""
    if not results:
        raise ValueError("results_table needs at least one evaluation result")
    labels = list(labels) if labels is not None else [r.get("label") or f"run {i + 1}" for i, r in enumerate(results)]
    cols = [b for b in BENCHMARKS if any(b in r["benchmarks"] for r in results)]
    lines = ["| Model | " + " | ".join(BENCHMARKS[c] for c in cols) + " | Avg |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for label, r in zip(labels, results):
        cells = [f"{100 * r['benchmarks'][c]['avg@k']:.1f}" if c in r["benchmarks"] else "–" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * r['average']['avg@k']:.1f} |")
    settings = sorted({(r["k"], r["temperature"], r.get("top_p", 1.0)) for r in results})
    desc = "; ".join(f"k={k}, " + ("greedy" if t == 0 else f"temperature {t}, top-p {p}") for k, t, p in settings)
    lines += ["", f"avg@k in % (accuracy averaged over the k samples of each problem, then over problems): {desc}. "
                  "Avg is the unweighted mean over the row's benchmarks."]
    return "\n".join(lines) + "\n"


def table_from_files(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> str:
    """`results_table` over eval.json files (labels default to each file's label, else its folder)."""
    results = []
    for p in map(Path, paths):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: cannot read an eval.json ({e})") from None
        r.setdefault("label", p.parent.name)
        results.append(r)
    return results_table(results, labels)


def write_eval(result: dict, run_dir: str | Path) -> Path:
    """<run dir>/eval.json and <run dir>/eval.md (this run's one-row table)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "eval.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    (run_dir / "eval.md").write_text(results_table([result]))
    return path
