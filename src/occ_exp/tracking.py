"""Metrics go to `<run dir>/metrics.jsonl` (one JSON object per step, always) and, with
logger=wandb, to Weights & Biases (offline by default: `wandb sync <run dir>/wandb/...` uploads
later). logger=none keeps only the console summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class Tracker:
    def __init__(self, cfg, run_dir: str | os.PathLike, config_dict: dict | None = None, resume_step: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        if cfg.name == "none":
            self.metrics_path = None
        if self.metrics_path is not None and resume_step is not None:
            self._truncate_after(resume_step)
        if cfg.name == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.mode)
            id_file = self.run_dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.run_dir), id=run_id,
                resume="allow", config=config_dict, tags=list(cfg.tags) or None, name=self.run_dir.name,
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (no duplicated steps)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.metrics_path.write_text("".join(l + "\n" for l in keep))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
