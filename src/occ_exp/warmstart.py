"""Warm start of the tiny model: supervised next-token + MTP cross-entropy on generated
demonstrations, a controlled share of which are honest failed attempts (`flaw_rate`), so the
warm policy solves some but not most held-out problems at temperature 1 and RL has room.

It trains on fresh problems every step (no data set to overfit), with a cosine schedule run to
its end (the plateau, not mid-rise), records the held-out accuracy along the way, and caches the
result under `<cache_dir>/warmstart/<key>/`, keyed by everything that shapes it (architecture,
K, task, warm-start settings). Concurrent runs (a multirun) wait on a file lock and reuse it.

The default configuration's warm start ships with the package (`occ_exp/assets/warmstart/<key>/`:
its weights, tokenizer, report and a MANIFEST of file hashes; `make warmstart` regenerates it with
`scripts/make_warmstart.py`), so a first run starts RL at once. It is used when the cache misses
and the key matches; any other recipe, architecture or task has another key and trains as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from occ_exp.checkpoint import atomic_write_text
from occ_exp.config import RolloutConfig
from occ_exp.data.prompts import format_prompts
from occ_exp.diagnostics import mtp_health
from occ_exp.models.loading import file_lock, load_policy_folder, save_policy
from occ_exp.rollout.hf import HFRollout

CACHE_VERSION = 2  # bump when the warm-start recipe changes (2: MTP reads the pre-norm trunk state)
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "warmstart"  # package data, one folder per key
MANIFEST = "MANIFEST.sha256"  # `<sha256>  <relative path>` per shipped file (sha256sum's format)


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
    problems = task.problems(n, seed=seed, split="test")
    # transformers.generate, the plain decoder: the shipped report's numbers were measured with it
    ro = HFRollout(RolloutConfig(max_new_tokens=max_new_tokens, static_cache=False), policy, tokenizer, device)
    res = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, greedy in (("greedy", True), ("t1", False)):
            b = ro.generate([p.prompt for p in problems], 1, greedy=greedy)
            r, _ = reward_fn(b.texts, problems)
            res[f"acc_{name}"] = float(r.mean())
    return res


def shipped_folder(key: str) -> Path | None:
    """The warm start shipped with the package under this key, if there is one."""
    folder = SHIPPED_DIR / key
    return folder if (folder / "report.json").is_file() else None


def manifest(folder: Path) -> list[str]:
    """`<sha256>  <path relative to folder>` for every file in `folder` but the manifest, by path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}" for p in files]


def _load(policy, folder: Path, device, log, where: str) -> dict:
    loaded, _ = load_policy_folder(folder / "model", expected_config=policy.config, device=device)
    policy.load_state_dict(loaded.state_dict())
    report = json.loads((folder / "report.json").read_text())
    log(f"warm start: {where} {folder} (held-out acc greedy {report['final']['acc_greedy']:.3f}, "
        f"T=1 {report['final']['acc_t1']:.3f})")
    return report


def warm_start(policy, tokenizer, task, model_cfg, data_cfg, cache_dir, device, reward_fn, log=print,
               use_shipped: bool = True) -> dict:
    """Load the warm start into `policy` in place from the cache, else from the package's shipped
    copy (same key; `use_shipped=False` skips it), else train and cache it; returns its report."""
    ws = model_cfg.warmstart
    key = cache_key(model_cfg, data_cfg)
    folder = Path(cache_dir) / "warmstart" / key
    report_path = folder / "report.json"
    with file_lock(Path(cache_dir) / "warmstart" / f"{key}.lock", log=log):
        if report_path.exists():
            return _load(policy, folder, device, log, "reusing")
        shipped = shipped_folder(key) if use_shipped else None
        if shipped is not None:
            return _load(policy, shipped, device, log, "shipped with the package,")
        report = _train(policy, tokenizer, task, ws, device, reward_fn, log)
        report["key"] = key
        save_policy(policy, tokenizer, folder / "model")
        atomic_write_text(report_path, json.dumps(report, indent=1))  # its presence marks the entry complete
        log(f"warm start: saved to {folder}")
        return report


# held-out problems of each learning-curve point (1/4, 1/2, 3/4 of the steps), at most the final
# evaluation's `eval_problems` (the default recipe's 500 gives 256, as in the shipped report)
CURVE_PROBLEMS = 256


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
            ev = evaluate_samples(policy, tokenizer, task, reward_fn, min(CURVE_PROBLEMS, ws.eval_problems), device,
                                  seed=ws.seed)
            history.append({"step": step + 1, "ce_main": ema, "ce_mtp": ce_mtp, **ev})
            policy.train()
    final = evaluate_samples(policy, tokenizer, task, reward_fn, ws.eval_problems, device, seed=ws.seed)
    history.append({"step": ws.steps, "ce_main": ema, **final})
    policy.eval()
    seconds = time.time() - t0
    log(f"warm start: {ws.steps} steps in {seconds:.0f} s, held-out acc greedy {final['acc_greedy']:.3f}, "
        f"T=1 {final['acc_t1']:.3f}")
    return {"final": final, "history": history, "seconds": seconds, "steps": ws.steps}


# -- MTP warm-up of fresh heads on real checkpoints ------------------------------------------------
def mtp_warmup(policy, tokenizer, task, model_cfg, layers: list[int], device, rollout=None, seed: int = 0,
               log=print) -> dict:
    """Train the fresh MTP layers `layers` alone before RL: detached MTP cross-entropy (regime
    detach's loss: no gradient reaches the trunk or the LM head, and only these layers step), for
    `model_cfg.mtp_warmup_steps` steps of `mtp_warmup_batch_size` sequences.

    Data (`model_cfg.mtp_warmup_source`): `reference` trains on the task's reference solutions
    (`task.solution`), `rollouts` on the policy's own samples from `rollout` at the rollout
    temperature; `auto` takes the reference solutions when the task has them. Training prompts are
    `task.sample(rng, "train")`, which the procedural task and a data file (data.path) both answer,
    formatted as RL formats them (`format_prompts`: the tokenizer's chat template where
    `model_cfg.chat_template` and the tokenizer has one)."""
    source = model_cfg.mtp_warmup_source
    if source == "auto":
        source = "reference" if hasattr(task, "solution") else "rollouts"
    if source == "reference" and not hasattr(task, "solution"):
        raise ValueError(f"model.mtp_warmup_source=reference: task {type(task).__name__} has no reference "
                         "solutions; use rollouts or auto")
    if source == "rollouts" and rollout is None:
        raise ValueError("model.mtp_warmup_source=rollouts needs a rollout engine")
    params = [p for i in layers for p in policy.mtp_layers[i].parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=model_cfg.mtp_warmup_lr, weight_decay=0.0)
    rng = random.Random(f"mtp-warmup-{seed}")
    n = model_cfg.mtp_warmup_batch_size

    def batch():
        if source == "reference":
            ids, attn, R = demo_batch(task, tokenizer, rng, n, 0.0, device)
            return ids, attn, R, attn[:, -R:].bool()
        problems = [task.sample(rng, "train") for _ in range(n)]
        b = rollout.generate(format_prompts(problems, tokenizer, model_cfg.chat_template), 1).compact().to(device)
        return b.input_ids, b.attention_mask, b.response_len, b.response_mask

    t0, history = time.time(), []
    policy.train()
    try:
        for step in range(model_cfg.mtp_warmup_steps):
            ids, attn, R, mask = batch()
            with torch.no_grad():
                trunk = policy.trunk_forward(ids, attn, R)
            _, logp = policy.mtp_forward(trunk, detach_trunk=True, detach_head=True)
            m = mask.to(logp[0].dtype)
            ces = [-(logp[i] * m).sum() / m.sum().clamp(min=1) for i in layers]
            loss = sum(ces) / len(ces)
            policy.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(loss.item())
    finally:
        policy.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    policy.eval()
    with torch.no_grad():
        ids, attn, R, mask = batch()
        out = policy(ids, attn, R)
        health = mtp_health(out, out.logp_main, mask)
    report = {"steps": len(history), "source": source, "layers": layers, "ce_first": history[0] if history else None,
              "ce_last": history[-1] if history else None, "acceptance": health.get("mtp/acceptance"),
              "seconds": time.time() - t0}
    if history:
        log(f"MTP warm-up of fresh layers {layers} on {source}: {len(history)} steps in {report['seconds']:.0f} s, "
            f"CE {history[0]:.3f} -> {history[-1]:.3f}, acceptance {report['acceptance']:.3f}")
    return report
