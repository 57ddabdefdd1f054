"""Where the default RL step's time goes, against what the CPU can do: the learner update's matmul
FLOPs and the rate they run at (against this core's fp32 matmul peak), and the decode loop's
attention, which reads the KV cache (against this core's copy bandwidth). Same work as the TRL
comparison in scripts/bench.py (16 prompts x 8 samples x 64 tokens, regime=frozen, as shipped).

    python scripts/profile_step.py [--threads 1] [--reps 3]   # -> results/step_profile.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench as B  # noqa: E402  (the comparison's work and helpers)

from occ_exp.builders import build_task  # noqa: E402
from occ_exp.data.prompts import PromptStream  # noqa: E402
from occ_exp.learner import learner_update  # noqa: E402
from occ_exp.models.loading import build_tiny_policy  # noqa: E402
from occ_exp.rollout import build_rollout  # noqa: E402
from occ_exp.runtime import code_commit  # noqa: E402

MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def timings(fn, reps: int) -> list[float]:
    """Wall seconds of `reps` calls of `fn`."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(reps: int) -> float:
    """Bytes read + written per second by a 128 MiB copy (the best of `reps`, as a peak)."""
    src, dst = torch.randn(32 << 20), torch.empty(32 << 20)
    dst.copy_(src)
    return 2 * src.numel() * 4 / min(timings(lambda: dst.copy_(src), reps))


def self_seconds(prof, names) -> float:
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in names) / 1e6


def kv_bytes_read(prompt_len: int, new_tokens: int, rows: int, cfg) -> int:
    """Keys + values the decode steps read, fp32: each step attends to its window (the newest
    slot rounded up to a multiple of 16, occ_exp.rollout.decode) in every layer."""
    per_slot = rows * cfg.num_key_value_heads * cfg.head_dim * 4 * 2 * cfg.num_hidden_layers
    return sum(per_slot * ((prompt_len + t + 15) // 16 * 16) for t in range(1, new_tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "step_profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = B.compose(B.SAME_WORK + ["regime=frozen"])
    policy, tok = build_tiny_policy(cfg.model, seed=0)

    # the learner update on one rollout batch of the comparison's shape
    batch = B.learner_batch(policy, tok, cfg, B.PROMPTS * B.GROUP, B.NEW_TOKENS)
    learner = B.make_learner(cfg, policy, "frozen")

    def update():
        learner_update(*learner[:4], batch, cfg, learner[4], torch.Generator().manual_seed(0))

    update()
    update_s = B.median(timings(update, args.reps))  # before the counter's pass
    counter = FlopCounterMode(display=False)
    with counter:
        update()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update()
    mm_s = self_seconds(prof, MM_OPS)
    flops = counter.get_total_flops()

    # the decode loop (rollout as shipped: the static-cache loop, eager)
    prompts = [p.prompt for p in PromptStream(build_task(cfg.data), 0).next(B.PROMPTS)]
    ro = build_rollout(cfg.rollout, policy, tok, "cpu")
    ro.generate(prompts, B.GROUP)
    rollout_s = B.median(timings(lambda: ro.generate(prompts, B.GROUP), args.reps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        b = ro.generate(prompts, B.GROUP)
    attn_s = self_seconds(prof, ATTENTION_OPS)
    prompt_len = b.input_ids.shape[1] - b.response_len
    kv = kv_bytes_read(prompt_len, B.NEW_TOKENS, B.PROMPTS * B.GROUP, policy.lm.config)

    peak, bandwidth = B.matmul_peak(2048, args.reps)["flop_per_s"], copy_bandwidth(args.reps)
    res = {
        "command": "python scripts/profile_step.py " + " ".join(sys.argv[1:]), "commit": code_commit(REPO),
        "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "load_avg": list(os.getloadavg()),
        "cpu": B.cpu_model(), "work": f"{B.PROMPTS} prompts x {B.GROUP} samples x {B.NEW_TOKENS} tokens, regime=frozen",
        "matmul_peak_flop_s": peak, "copy_bandwidth_byte_s": bandwidth,
        "update_s": update_s, "update_flop": flops, "update_mm_s": mm_s, "update_mm_share": mm_s / update_s,
        "update_mm_flop_s": flops / mm_s, "update_mm_of_peak": flops / mm_s / peak,
        "update_floor_s": flops / peak, "rollout_s": rollout_s, "rollout_attention_s": attn_s,
        "rollout_attention_share": attn_s / rollout_s, "rollout_kv_bytes": kv,
        "rollout_attention_byte_s": kv / attn_s, "rollout_attention_of_bandwidth": kv / attn_s / bandwidth,
    }
    res["summary"] = (f"update {update_s:.2f} s: {flops / 1e9:.1f} GFLOP of matmuls at {res['update_mm_of_peak']:.0%} of "
                      f"the {peak / 1e9:.0f} GFLOP/s peak ({res['update_mm_share']:.0%} of the update; at peak alone "
                      f"{res['update_floor_s']:.2f} s); rollout {rollout_s:.2f} s: attention {res['rollout_attention_share']:.0%} "
                      f"of it, reading {kv / 2**20:.0f} MiB of cache at {res['rollout_attention_of_bandwidth']:.0%} of the "
                      f"{bandwidth / 1e9:.1f} GB/s copy bandwidth")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(
        f"# Where the default step's time goes\n\nCommand: `{res['command']}` at commit `{res['commit']}` ({res['date']}, "
        f"{res['cpu']}, threads {args.threads}, load {res['load_avg'][0]:.1f}). Work: {res['work']}, as shipped "
        f"(eager, the static-cache decode loop, shared prompts).\n\n{res['summary']}.\n")
    print(res["summary"])


if __name__ == "__main__":
    main()
