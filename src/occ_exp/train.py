"""Hydra entry point: `python -m occ_exp.train [group=option ...] [key=value ...]`.

    python -m occ_exp.train                                  # tiny model, regime=occ
    python -m occ_exp.train regime=detach trainer.total_steps=200
    python -m occ_exp.train -m regime=detach,ce,policy,occ seed=0,1
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from occ_exp.config import CONF_DIR, ConfigError, absolute_paths, register_configs
from occ_exp.data.jsonl import DataError
from occ_exp.learner import NonFiniteError
from occ_exp.locks import RunDirLocked
from occ_exp.models.loading import CheckpointError
from occ_exp.plan import check_resources, print_plan
from occ_exp.rollout.dynamic_sampling import NoInformativeGroups
from occ_exp.tracking import run_summary
from occ_exp.runtime import JOBS_ENV
from occ_exp.trainer import train

register_configs()

_ERROR_KIND = {"ConfigError": "config", "CheckpointError": "checkpoint", "DataError": "data", "RunDirLocked": "run dir"}


def _note_parallel_jobs() -> None:
    """A joblib multirun runs hydra.launcher.n_jobs trainers at once on this machine: tell the
    thread policy (occ_exp.runtime) through the environment, as scripts/reproduce.py --jobs does."""
    hc = HydraConfig.get()
    n = hc.launcher.get("n_jobs") if hc.mode == RunMode.MULTIRUN else None
    if isinstance(n, int) and n != 0:  # joblib: -1 = all cores, -2 = all but one, ...
        os.environ.setdefault(JOBS_ENV, str(n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    console = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) != 0)  # rank 0 speaks
    absolute_paths(cfg)
    _note_parallel_jobs()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.trainer.dry_run:
            print_plan(cfg, console)
            return None
        if (problem := check_resources(cfg)) is not None:  # too few GPUs: say so before loading weights
            raise ConfigError(problem)
        console.print(f"[bold]occ-exp[/] run dir: {run_dir}")
        summary = train(cfg, run_dir, log=lambda m: console.print(m))
    except (ConfigError, CheckpointError, DataError, RunDirLocked) as e:  # bad input: one line, before work starts
        console.print(f"[bold red]{_ERROR_KIND[type(e).__name__]} error[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    except NonFiniteError as e:
        console.print(f"[bold red]numerical error[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    except NoInformativeGroups as e:
        console.print(f"[bold red]dynamic sampling error[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    if summary["stopped_at_step"] is not None:
        console.print(f"[bold yellow]stopped[/] after step {summary['stopped_at_step']} (SIGTERM); "
                      f"checkpoint {summary['checkpoint']}; resume with the same command and hydra.run.dir={run_dir}")
        return summary
    if summary["final/accuracy"] is None:  # trainer.total_steps=0 (e.g. only fill the warm-start cache)
        console.print("[bold green]done[/] no RL steps to run")
        return summary
    console.print(f"[bold green]done[/] final held-out accuracy {summary['final/accuracy']:.3f} "
                  f"(n={summary['final/n']}), MTP acceptance {summary['final/acceptance']:.3f}")
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports
        return summary
    for line in run_summary(summary["metrics"]):
        console.print(f"  {escape(line)}")
    # the plot command itself (entry points do not import each other): its figures go to <run dir>/plots;
    # OCC_EXP_PLOTS=0 skips it (the test suite sets it: a matplotlib start per run adds up)
    figures = 0
    if os.environ.get("OCC_EXP_PLOTS", "1") != "0":
        plot = subprocess.run([sys.executable, "-m", "occ_exp.plot", str(run_dir)], capture_output=True, text=True)
        figures = len(plot.stdout.split()) if plot.returncode == 0 else 0
    console.print(f"  metrics    {summary['metrics']}\n"
                  f"  checkpoint {summary['checkpoint']}\n"
                  f"  plots      {run_dir / 'plots'} ({figures} figures; python -m occ_exp.plot {run_dir})")
    return summary


if __name__ == "__main__":
    main()
