"""Warm start of the tiny model: supervised next-token + MTP cross-entropy on generated
demonstrations, a controlled share of which are honest failed attempts (`flaw_rate`), so the
warm policy solves some but not most held-out problems at temperature 1 and RL has room.

It trains on fresh problems every step (no data set to overfit), with a cosine schedule run to
its end (the plateau, not mid-rise), records the held-out accuracy along the way, and caches the
result under `<cache_dir>/warmstart/<key>/`, keyed by everything that shapes it (architecture,
K, task, warm-start settings). Concurrent runs (a multirun) wait on a file lock and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from occ_exp.models.loading import load_policy_folder, save_policy

CACHE_VERSION = 1  # bump when the warm-start recipe changes


def cache_key(model_cfg, data_cfg) -> str:
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "arch": OmegaConf.to_container(model_cfg.arch),
            "k": model_cfg.num_mtp_layers,
            "ws": OmegaConf.to_container(model_cfg.warmstart),
            "task": {k: data_cfg[k] for k in ("num_numbers", "max_number", "min_target", "max_target", "test_fraction")},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def encode_demos(tokenizer, prompts: list[str], responses: list[str], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts + right-padded responses (+EOS), the learner's layout."""
    p = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    r_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    R = max(len(x) for x in r_ids)
    resp = torch.full((len(r_ids), R), tokenizer.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(r_ids), R), dtype=torch.long)
    for i, x in enumerate(r_ids):
        resp[i, : len(x)] = torch.tensor(x)
        rmask[i, : len(x)] = 1
    ids = torch.cat([p["input_ids"], resp], 1).to(device)
    attn = torch.cat([p["attention_mask"], rmask], 1).to(device)
    return ids, attn, R


def demo_batch(task, tokenizer, rng: random.Random, n: int, flaw_rate: float, device):
    problems = [task.sample(rng, "train") for _ in range(n)]
    sols = [task.solution(p, rng, flawed=rng.random() < flaw_rate) for p in problems]
    return encode_demos(tokenizer, [p.prompt for p in problems], sols, device)


def sft_loss(policy, ids, attn, R, mtp_weight: float, detach_mtp: bool = False):
    out = policy(ids, attn, R, detach_trunk=detach_mtp, detach_head=detach_mtp)
    mask = attn[:, -R:].float()
    denom = mask.sum().clamp(min=1)
    ce_main = -(out.logp_main * mask).sum() / denom
    ce_mtp = [-(lp * mask).sum() / denom for lp in out.logp_mtp]
    mtp = sum(ce_mtp) / max(len(ce_mtp), 1)
    return ce_main + mtp_weight * mtp, ce_main.item(), [x.item() for x in ce_mtp]


def evaluate_samples(policy, tokenizer, task, reward_fn, n: int, device, seed: int = 0, max_new_tokens: int = 96) -> dict:
    """Held-out accuracy greedy and at temperature 1 (one sample per problem)."""
    from occ_exp.config import RolloutConfig
    from occ_exp.rollout.hf import HFRollout

    problems = task.problems(n, seed=seed, split="test")
    ro = HFRollout(RolloutConfig(max_new_tokens=max_new_tokens), policy, tokenizer, device)
    res = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, greedy in (("greedy", True), ("t1", False)):
            b = ro.generate([p.prompt for p in problems], 1, greedy=greedy)
            r, _ = reward_fn(b.texts, problems)
            res[f"acc_{name}"] = float(r.mean())
    return res


def warm_start(policy, tokenizer, task, model_cfg, data_cfg, cache_dir, device, reward_fn, log=print) -> dict:
    """Train (or load from cache) the warm start into `policy` in place; returns its report."""
    ws = model_cfg.warmstart
    key = cache_key(model_cfg, data_cfg)
    folder = Path(cache_dir) / "warmstart" / key
    report_path = folder / "report.json"
    with _file_lock(Path(cache_dir) / "warmstart" / f"{key}.lock"):
        if report_path.exists():
            loaded, _ = load_policy_folder(folder / "model", expected_config=policy.config, device=device)
            policy.load_state_dict(loaded.state_dict())
            report = json.loads(report_path.read_text())
            log(f"warm start: reusing {folder} (held-out acc greedy {report['final']['acc_greedy']:.3f}, "
                f"T=1 {report['final']['acc_t1']:.3f})")
            return report
        report = _train(policy, tokenizer, task, ws, device, reward_fn, log)
        report["key"] = key
        save_policy(policy, tokenizer, folder / "model")
        report_path.write_text(json.dumps(report, indent=1))
        log(f"warm start: saved to {folder}")
        return report


def _train(policy, tokenizer, task, ws, device, reward_fn, log) -> dict:
    rng = random.Random(ws.seed)
    torch.manual_seed(ws.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=ws.lr, weight_decay=ws.weight_decay, betas=(0.9, 0.98))

    def lr_at(step):
        if step < ws.warmup_steps:
            return (step + 1) / ws.warmup_steps
        prog = (step - ws.warmup_steps) / max(1, ws.steps - ws.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history, t0, ema = [], time.time(), None
    checkpoints = {int(ws.steps * f) for f in (0.25, 0.5, 0.75)}
    policy.train()
    from tqdm import tqdm

    bar = tqdm(range(ws.steps), desc="warm start", leave=False, mininterval=2.0)
    for step in bar:
        ids, attn, R = demo_batch(task, tokenizer, rng, ws.batch_size, ws.flaw_rate, device)
        loss, ce_main, ce_mtp = sft_loss(policy, ids, attn, R, ws.mtp_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = ce_main if ema is None else 0.98 * ema + 0.02 * ce_main
        bar.set_postfix(ce=f"{ema:.3f}", mtp=f"{ce_mtp[0]:.3f}")
        if step + 1 in checkpoints:
            ev = evaluate_samples(policy, tokenizer, task, reward_fn, 256, device, seed=ws.seed)
            history.append({"step": step + 1, "ce_main": ema, "ce_mtp": ce_mtp, **ev})
            policy.train()
    final = evaluate_samples(policy, tokenizer, task, reward_fn, ws.eval_problems, device, seed=ws.seed)
    history.append({"step": ws.steps, "ce_main": ema, **final})
    policy.eval()
    seconds = time.time() - t0
    log(f"warm start: {ws.steps} steps in {seconds:.0f} s, held-out acc greedy {final['acc_greedy']:.3f}, "
        f"T=1 {final['acc_t1']:.3f}")
    return {"final": final, "history": history, "seconds": seconds, "steps": ws.steps}
