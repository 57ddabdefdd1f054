"""Hydra entry point: evaluate a model on benchmarks (the metrics: occ_exp.evaluation).

    python -m occ_exp.evaluate model.path=<run dir | checkpoints/step_N | model folder> \\
        benchmark=all eval.k=32 eval.temperature=0.6 eval.top_p=0.95 rollout=vllm
    python -m occ_exp.evaluate benchmark=tiny            # the warm-started tiny model, held-out split

Writes <run dir>/eval.json, <run dir>/eval.md (the paper's Table 1 layout) and, with
eval.save_samples, samples.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from occ_exp import builders
from occ_exp.checkpoint import latest_complete
from occ_exp.config import CONF_DIR, ConfigError, absolute_paths, register_configs
from occ_exp.data.benchmarks import DataError, load_benchmarks
from occ_exp.evaluation import Evaluator, Scorers, results_table, write_eval
from occ_exp.models.loading import CheckpointError, read_config_json
from occ_exp.reward.rewards import reward_kind
from occ_exp.rollout import build_rollout
from occ_exp.runtime import pick_device, seed_everything, set_threads
from occ_exp.validation import validate

register_configs()


# -- the command --------------------------------------------------------------------------------
def resolve_model_path(path: str, log=None) -> str:
    """A run dir (its newest complete checkpoint), a checkpoints/step_N dir or a model folder ->
    the model folder; anything else (a hub id) is returned unchanged for the loader."""
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    if (p / "checkpoints").is_dir():
        damaged: list = []
        ckpt = latest_complete(p, log, damaged)
        if ckpt is None:
            raise CheckpointError(f"{p}: no complete checkpoint under {p / 'checkpoints'}"
                                  + "".join(f"; {d.name}: {probs[0]}" for d, probs in damaged))
        return str(ckpt / "model")
    return path


def default_label(cfg) -> str:
    """`<run name> step_N` for a checkpoint of ours (the run config is saved next to the model
    folder), else the model folder's or the model's name."""
    if not cfg.model.path:
        return f"{cfg.model.name} (warm start)" if cfg.model.name == "tiny" else cfg.model.name
    folder = Path(cfg.model.path)
    saved = folder.parent / "config.yaml"
    if saved.is_file():
        try:
            return f"{OmegaConf.load(saved).run_name} {folder.parent.name}"
        except Exception:  # an older or foreign config: fall back to the folder name
            pass
    return folder.name or str(folder)


def run_evaluation(cfg: DictConfig, run_dir: str | Path, log=print) -> dict:
    """Evaluate `model.path` (or the warm-started tiny model) on `benchmark.names`; writes
    eval.json / eval.md (and samples.jsonl with eval.save_samples) in run_dir; returns the result."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = load_benchmarks(cfg.benchmark.names, cfg.paths.data_dir, cfg.data, limit=cfg.eval.max_problems)
    if cfg.model.path:
        cfg.model.path = resolve_model_path(cfg.model.path, log)
        saved = Path(cfg.model.path) / "config.json"
        if saved.is_file():  # evaluate the checkpoint as saved, whatever its number of MTP layers
            k = read_config_json(saved).get("num_nextn_predict_layers")
            if k:
                cfg.model.num_mtp_layers = int(k)
    device = pick_device(cfg.trainer.device)
    threads = set_threads(cfg.trainer.threads)
    seed_everything(cfg.seed)
    env = builders.build(cfg, device, log=log)
    log(str(threads))
    rollout = build_rollout(cfg.rollout, env.policy, env.tokenizer, device)
    evaluator = Evaluator(rollout, env.tokenizer, cfg.eval, cfg.model.chat_template,
                          Scorers({reward_kind(cfg.data): env.reward_fn}))
    try:
        log(f"evaluating on {', '.join(f'{b.name} ({len(b.problems)})' for b in benchmarks)}, k={cfg.eval.k}")
        result = evaluator.run(benchmarks, run_dir / "samples.jsonl" if cfg.eval.save_samples else None)
    finally:
        evaluator.close()
        rollout.close()
        env.reward_fn.close()
    result = {"label": cfg.eval.label or default_label(cfg), "model": cfg.model.path or cfg.model.name, **result,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    write_eval(result, run_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> dict | None:
    console = Console(stderr=True)
    absolute_paths(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_evaluation(cfg, run_dir, log=lambda m: console.print(m))
    except (ConfigError, DataError, CheckpointError) as e:
        console.print(f"[bold red]error[/] {escape(str(e))}")
        sys.exit(2)
    console.print(escape(results_table([result])))
    a = result["average"]
    console.print(f"[bold green]done[/] unparsable answers {a['unparsed']}, verifier timeouts {a['timeouts']}\n"
                  f"  results {run_dir / 'eval.json'}\n  table   {run_dir / 'eval.md'}")
    return result


if __name__ == "__main__":
    main()
