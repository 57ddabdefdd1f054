"""First RL step of two checkouts, side by side: wall seconds from `python -m occ_exp.train` (the
default experiment, threads pinned) to its first RL step's metrics row, the two checkouts' code
alternated round by round in this environment (PYTHONPATH=<checkout>/src), each with its own
warm-start cache. Prints one line per launch and a JSON summary.

    git worktree add ../before <rev>
    python scripts/ab_first_rl_step.py ../before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _first_metrics_row  # noqa: E402  (scripts/bench.py: the same measurement as first_rl_step_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="checkout A (its src/ is put first on PYTHONPATH)")
    ap.add_argument("after", type=Path, help="checkout B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "src" / "occ_exp" / "train.py").is_file():
            sys.exit(f"error: {tree} is not an occ-exp checkout (no src/occ_exp/train.py); give two checkouts")
    work = Path(tempfile.mkdtemp(prefix="ab_first_step_"))
    out: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree / "src"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
            run = work / f"{name}-{r}"
            cmd = [sys.executable, "-m", "occ_exp.train", f"trainer.threads={args.threads}",
                   f"paths.cache_dir={work / ('cache-' + name)}", f"hydra.run.dir={run}"]
            seconds = _first_metrics_row(cmd, run, env, timeout=args.timeout)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip().endswith("}")] \
                if (run / "metrics.jsonl").exists() else []
            first = next((x for x in rows if x.get("step", 0) >= 1), {})
            out[name].append({"first_rl_step_s": seconds, "step_s": first.get("time/step_s"),
                              "reward_s": first.get("time/reward_s"), "load": os.getloadavg()[0]})
            print(f"{name} round {r}: {out[name][-1]}", flush=True)
    summary = {k: statistics.median(x["first_rl_step_s"] for x in v if x["first_rl_step_s"] is not None)
               for k, v in out.items()}
    print(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "median_first_rl_step_s": summary,
                      "runs": out}, indent=1))


if __name__ == "__main__":
    main()
