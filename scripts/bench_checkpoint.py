"""What one checkpoint save costs under FSDP2: bytes written by each rank and rank 0's peak host
memory, for the tiny model (or a wider one) on CPU ranks (gloo).

    torchrun --standalone --nproc_per_node=2 scripts/bench_checkpoint.py OUT.json [--source bf16] \
        [model.arch.hidden_size=512 ...]

Each rank builds the policy, shards it with FSDP2, gives every parameter a gradient and takes one
AdamW step (so the optimiser holds its two float32 moments), then saves one checkpoint through the
trainer's own writer (`builders.save_run_checkpoint`; on a tree without it, the writer that was
there before: rank 0 gathered the model and the optimiser in full and wrote trainer_state.pt).
`--source bf16` makes the model folder bf16 while the run trains float32 (a real bf16 checkpoint
such as MiMo-7B): then the float32 master weights are kept too.

Measured per rank: the bytes of the files it wrote (rank r writes dcp/__r_*.distcp; rank 0 also
the model folder, trainer_state.pt, config.yaml, dcp/.metadata and the manifest), and the rise of
its resident memory's high-water mark (Linux VmHWM, reset just before the save) over its resident
memory just before. Run it with PYTHONPATH pointing at the tree to measure (before / after).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from occ_exp import builders
from occ_exp import distributed as D
from occ_exp import runtime as occ_runtime
from occ_exp.algo.coefficient import CoefficientState
from occ_exp.algo.regimes import get_regime
from occ_exp.checkpoint import save_checkpoint
from occ_exp.config import register_configs
from occ_exp.learner import NonFiniteGuard, build_optimizer
from occ_exp.models.loading import build_tiny_policy, save_policy
from occ_exp.rollout.base import Rollout
from occ_exp.runtime import peak_rss_gib, reset_peak_rss

CONF = Path(__file__).resolve().parents[1] / "conf"


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


class _NoPrompts:
    def state_dict(self):
        return {}


def save(run_dir: Path, policy, tok, opt, sched, cs, dist) -> Path | None:
    args = (policy, tok, opt, sched, cs, _NoPrompts(), torch.Generator(), dist, NonFiniteGuard(3), Rollout(), None)
    if hasattr(builders, "save_run_checkpoint"):  # this tree
        return builders.save_run_checkpoint(run_dir, 1, *args, "{}", 2)
    # the tree before: everything gathered on rank 0
    model_sd = D.full_model_state_dict(policy, dist)
    state = builders.capture_state(1, policy, opt, sched, cs, _NoPrompts(), torch.Generator(), dist, NonFiniteGuard(3),
                                   Rollout(), None, model_sd)
    path = None
    if dist.is_main:
        path = save_checkpoint(run_dir, 1, partial(save_policy, policy, tok, state_dict=model_sd), state, "{}", 2)
    dist.barrier()
    return path


def bytes_per_rank(ckpt: Path, world: int) -> list[int]:
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    out = [0] * world
    for rel, info in files.items():
        name = Path(rel).name
        rank = int(name[2:].split("_")[0]) if rel.startswith("dcp/__") and name.endswith(".distcp") else 0
        out[rank] += info["bytes"]
    out[0] += (ckpt / "manifest.json").stat().st_size
    return out


def main(out: str, source: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.device=cpu", *overrides])
    dist = D.init_distributed(cfg.distributed, "cpu")
    policy, tok = build_tiny_policy(cfg.model, seed=0)
    policy = D.shard_policy(policy, dist, cfg.distributed)
    if source == "bf16":
        policy.source_format["dtype"] = torch.bfloat16
    opt, sched = build_optimizer(cfg.optimizer, policy, get_regime("occ"))
    loss = sum((p.float() ** 2).sum() for p in policy.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    n_params = sum(p.numel() for p in policy.parameters())
    cs = [CoefficientState() for _ in range(policy.num_mtp_layers)]
    run_dir = Path(dist.all_gather_object(tempfile.mkdtemp(prefix="bench_ckpt_"))[0])
    gc.collect()
    dist.barrier()
    base = rss_gib()
    reset_peak_rss()
    t0 = time.perf_counter()
    ckpt = save(run_dir, policy, tok, opt, sched, cs, dist)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    mem = dist.all_gather_object({"rss_before_gib": base, "peak_gib": peak, "peak_rise_mib": (peak - base) * 1024})
    if dist.is_main:
        # package_commit is looked up only without BENCH_COMMIT: an older tree benched through PYTHONPATH
        # (results/checkpoint_scale.md, "before") predates it and names its commit in BENCH_COMMIT
        commit = os.environ.get("BENCH_COMMIT") or occ_runtime.package_commit()
        row = {"tree": str(Path(builders.__file__).parents[2]), "commit": commit,
               "format": "dcp" if (ckpt / "dcp").is_dir() else "trainer_state.pt (gathered on rank 0)",
               "world_size": dist.world_size, "source_dtype": source, "parameters": n_params,
               "overrides": overrides, "save_s": round(seconds, 2), "bytes_per_rank": bytes_per_rank(ckpt, dist.world_size),
               "memory_per_rank": mem,
               "command": "torchrun --standalone --nproc_per_node=2 scripts/bench_checkpoint.py " + " ".join(sys.argv[1:])}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=1))
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:]
    src = "fp32"
    if "--source" in args:
        i = args.index("--source")
        src = args[i + 1]
        del args[i : i + 2]
    main(args[0], src, args[1:])
