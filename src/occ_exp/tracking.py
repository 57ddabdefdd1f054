"""Metrics go to `<run dir>/metrics.jsonl` (one JSON object per step, always) and, with
logger=wandb, to Weights & Biases (offline by default: `wandb sync <run dir>/wandb/...` uploads
later). logger=none keeps only the console summary.

Resuming (see `Tracker(resume_step=...)`): metrics.jsonl keeps the rows up to the resumed step and
drops the rest (the steps are re-run, so no step appears twice); the W&B run id lives in
`<run dir>/wandb_run_id.txt`, so the resumed run logs into the same W&B run, and steps that W&B
already received before the interruption are not sent again (W&B refuses a step lower than one it
has: no step goes backwards)."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from occ_exp.checkpoint import atomic_write_text


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class Tracker:
    def __init__(self, cfg, run_dir: str | os.PathLike, config_dict: dict | None = None, resume_step: int | None = None,
                 run_id: str | None = None):
        """`run_id`: the W&B run to continue when the run dir has no wandb_run_id.txt (a checkpoint's)."""
        self.cfg = cfg
        self.run_id: str | None = None  # the W&B run's id (logger=wandb), saved in checkpoints
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.last_row: dict = {}  # the newest row kept on resume (a finished run's summary)
        self.wandb_logged_through = -1  # W&B already has the steps up to here (from before a resume)
        if cfg.name == "none":
            self.metrics_path = None
        if self.metrics_path is not None and resume_step is not None:
            self._truncate_after(resume_step)
        if cfg.name == "wandb":
            import wandb  # optional heavy dependency: imported only for logger=wandb

            os.environ.setdefault("WANDB_MODE", cfg.mode)
            id_file = self.run_dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else (run_id or uuid.uuid4().hex[:12])
            atomic_write_text(id_file, run_id)
            self.run_id = run_id
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.run_dir), id=run_id,
                resume="allow", config=config_dict, tags=list(cfg.tags) or None, name=self.run_dir.name,
            )

    def _truncate_after(self, step: int) -> None:
        """Keep the rows of steps 1..`step` (and step 0's evaluation when `step` > 0): the run goes on
        from `step`, so later rows are re-logged; `step` 0 is a fresh start, which keeps nothing.
        The file is replaced atomically, so a kill here loses nothing."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                s = int(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut by a kill
            self.wandb_logged_through = max(self.wandb_logged_through, s)
            if step > 0 and s <= step:
                keep.append(line)
                self.last_row = row
        atomic_write_text(self.metrics_path, "".join(l + "\n" for l in keep))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        # W&B first: if a kill falls between the two writes, W&B has this step and the file does
        # not; the resumed run sends the step again at the same step number, which W&B accepts.
        if self.wandb_run is not None and step > self.wandb_logged_through:
            self.wandb_run.log(metrics, step=step)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        if self.wandb_run is not None:
            import wandb  # optional heavy dependency (logger=wandb)

            self.wandb_run.finish()
            self.wandb_run = None
            # finish() leaves W&B's service process (wandb-core) running until interpreter exit;
            # a run owns its process, so stop it here (the next init starts a fresh one).
            wandb.teardown()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
