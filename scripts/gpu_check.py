"""The GPU check's two halves (scripts/gpu_check.sh runs them around `torchrun -m occ_exp.train`).

    python scripts/gpu_check.py make-model DIR [--toy]     # random-weight Qwen2 + 1 MTP layer, saved as an HF folder
    python scripts/gpu_check.py report OUT.md RUN_DIR...   # step time, peak memory, learner MFU per regime

The model: Qwen2.5-0.5B's architecture (hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings: 494 M parameters) plus one MTP layer,
random weights built in code (nothing downloaded), with the tiny byte-level tokenizer so that the
countdown task and its verifier run unchanged. `--toy` shrinks it for the CPU.

MFU of the learner phase = model FLOPs of the update (6 N + 12 L H S per token, PaLM's
convention; N = parameters a token multiplies through, including the MTP layer and both LM-head
passes) / (update seconds x the card's dense bf16 peak). Recomputation by activation
checkpointing, the no-grad log-prob pass and OCC's no-grad pre-pass are real work but not model
FLOPs, so they lower the MFU, as they should.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
               rope_theta=1_000_000.0)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=512,
           rope_theta=10_000.0)
# Dense bf16 peak (no sparsity), by the name torch reports. Unknown cards: MFU is left out.
PEAK_BF16 = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12}


def make_model(out: Path, toy: bool) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from occ_exp.models.loading import save_policy
    from occ_exp.models.policy import MTPPolicy
    from occ_exp.models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(**(TOY if toy else QWEN05B), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=0.02, use_cache=True)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(config)
    policy = MTPPolicy(lm, 1)
    policy.mtp_layers.apply(lm._init_weights)
    save_policy(policy, tok, out)
    n = sum(p.numel() for p in policy.parameters())
    print(f"random-weight Qwen2 + 1 MTP layer: {n / 1e6:.1f} M parameters -> {out}")


def _peak_flops() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "CPU (no CUDA device)", None
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return name, peak
    return name, None


def _run_summary(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from occ_exp.plan import model_config, model_size, train_flops_per_token

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) > 0]
    timed = steps[1:] or steps  # the first step pays compilation / allocator warm-up
    size = model_size(model_config(cfg.model)[0], cfg.model.num_mtp_layers)
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    seqs = cfg.data.prompts_per_step * cfg.algorithm.group_size
    tokens = med("rollout/tokens")
    flops = cfg.algorithm.ppo_epochs * tokens * train_flops_per_token(size, tokens / seqs)
    update = med("time/update_s")
    return {
        "regime": cfg.regime.name, "steps": len(steps), "timed": len(timed), "params": size.total,
        "step_s": med("time/step_s"), "rollout_s": med("time/rollout_s"), "logp_old_s": med("time/logp_old_s"),
        "update_s": update, "tokens": tokens, "flops": flops, "achieved": flops / update,
        "peak_update_gib": max((r.get("mem/update_peak_gib", float("nan")) for r in steps), default=float("nan")),
        "peak_rollout_gib": max((r.get("mem/rollout_peak_gib", float("nan")) for r in steps), default=float("nan")),
        "coef": steps[-1]["mtp/coef"], "world": cfg.distributed, "cfg": cfg,
    }


def report(out: Path, run_dirs: list[Path], toy: bool) -> None:
    card, peak = _peak_flops()
    runs = [_run_summary(d) for d in run_dirs]
    cfg = runs[0]["cfg"]
    a = cfg.algorithm
    lines = ["# GPU check", ""]
    if toy or card.startswith("CPU"):
        lines += ["**No GPU run happened for this file: no GPU was available to the session that wrote it.** "
                  "It comes from the CPU toy mode of `scripts/gpu_check.sh`",
                  "(`GPU_CHECK_TOY=1`, or no CUDA device), which proves that the script and its report run end to end;",
                  "its sizes are toy sizes and its times are CPU times, not GPU numbers. On a GPU machine run",
                  "`bash scripts/gpu_check.sh` (under 10 minutes on one H100 / H200) to replace it.", ""]
    lines += [f"- card: **{card}**" + (f" (dense bf16 peak {peak / 1e12:.0f} TFLOP/s)" if peak else ""),
              f"- torch {torch.__version__}, CUDA {torch.version.cuda}",
              f"- model: random-weight Qwen2 architecture, {runs[0]['params'] / 1e6:.1f} M parameters with one MTP layer "
              f"({'toy sizes' if toy else 'Qwen2.5-0.5B shape, vocabulary 151,936'}), built in code, nothing downloaded",
              "- learner: `torchrun --standalone --nproc_per_node=1 -m occ_exp.train`: FSDP2 (`fully_shard`) on one "
              f"device, fp32 master weights, {'bf16' if not card.startswith('CPU') else 'fp32'} compute, "
              f"activation checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, "
              f"micro-batches of at most {a.max_tokens_per_micro_batch} tokens",
              f"- batch: {cfg.data.prompts_per_step} prompts x {a.group_size} samples of the countdown task, up to "
              f"{cfg.rollout.max_new_tokens} new tokens, {a.num_mini_batches} optimiser steps per rollout; rewards are "
              "the real verifier's: a random model scores ~0, so advantages, RL gradients and OCC's lambda are ~0, "
              "which changes no cost (every forward, backward and collective runs)",
              "- rollouts: `rollout=hf` (transformers `generate` on the gathered weights). **vLLM is not installed on "
              "the GPU machine, so `rollout=vllm` is not measured here.**", "",
              f"Median over steps 2..N (step 1 is warm-up). MFU = learner model FLOPs / (update time x peak).", "",
              "| regime | steps | step s | rollout s | logp_old s | update s | tokens / step | learner TFLOP/s | "
              "learner MFU | peak mem update (GiB) | peak mem rollout (GiB) | lambda (last) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mfu = f"{100 * r['achieved'] / peak:.1f} %" if peak else "n/a"
        gib = lambda v: "n/a" if v != v else f"{v:.2f}"  # noqa: E731  (NaN: no CUDA memory stats)
        lines.append(f"| {r['regime']} | {r['steps']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['logp_old_s']:.2f} | "
                     f"{r['update_s']:.2f} | {r['tokens']:,.0f} | {r['achieved'] / 1e12:.3g} | {mfu} | "
                     f"{gib(r['peak_update_gib'])} | {gib(r['peak_rollout_gib'])} | {r['coef']:+.3e} |")
    lines += ["", "Command: `bash scripts/gpu_check.sh`" + (" with `GPU_CHECK_TOY=1`" if toy else ""), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("dir", type=Path)
    m.add_argument("--toy", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("out", type=Path)
    r.add_argument("runs", type=Path, nargs="+")
    r.add_argument("--toy", action="store_true")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(args.dir, args.toy)
    else:
        report(args.out, args.runs, args.toy)


if __name__ == "__main__":
    main()
