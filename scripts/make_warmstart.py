#!/usr/bin/env python
"""Regenerate the warm start shipped with the package (`make warmstart`).

Trains the default configuration's warm start (occ_exp.warmstart, never the shipped copy)
in a cache folder, then copies its weights, tokenizer and report into
`src/occ_exp/assets/warmstart/<key>/` with a MANIFEST of sha256 hashes, and removes the folders of
other keys. `--from-cache DIR` copies an already trained cache entry (`DIR/warmstart/<key>/`)
instead of training; `--threads` pins torch's CPU threads (the recipe is seeded).

    python scripts/make_warmstart.py                       # ~8 min on an idle 2-core machine
    python scripts/make_warmstart.py --from-cache .cache   # copy the entry a run already trained
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's code, whatever else is installed

import torch  # noqa: E402

from occ_exp.warmstart import MANIFEST, SHIPPED_DIR, cache_key, manifest, warm_start  # noqa: E402


def compose_default(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from occ_exp.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train_entry(cfg, cache: Path) -> Path:
    from occ_exp.builders import build_task
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.reward.rewards import build_reward

    policy, tok = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)
    reward_fn = build_reward(cfg.data)
    try:
        warm_start(policy, tok, build_task(cfg.data), cfg.model, cfg.data, cache, torch.device("cpu"), reward_fn,
                   use_shipped=False)
    finally:
        reward_fn.close()
    return cache / "warmstart" / cache_key(cfg.model, cfg.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-cache", default=None, help="copy DIR/warmstart/<key>/ instead of training")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("overrides", nargs="*", help="config overrides (the shipped copy is the default config's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_default(args.overrides)
    key = cache_key(cfg.model, cfg.data)
    with tempfile.TemporaryDirectory(prefix="occ-warmstart-") as tmp:
        src = Path(args.from_cache) / "warmstart" / key if args.from_cache else train_entry(cfg, Path(tmp))
        if not (src / "report.json").is_file():
            sys.exit(f"{src}: no report.json; train it first (python -m occ_exp.train trainer.total_steps=0 "
                     f"paths.cache_dir={args.from_cache}) or run without --from-cache")
        dest = SHIPPED_DIR / key
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copytree(src / "model", dest / "model")
        shutil.copy2(src / "report.json", dest / "report.json")
    (dest / MANIFEST).write_text("\n".join(manifest(dest)) + "\n")
    for other in SHIPPED_DIR.iterdir():
        if other.is_dir() and other.name != key:
            shutil.rmtree(other)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"shipped warm start {key}: {dest} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
