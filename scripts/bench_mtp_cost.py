"""What the MTP coefficient costs: learner-update time of occ vs detach, and of a diagnosed step.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/bench_mtp_cost.py [--reps 7] [--threads 1] [override ...]

One process, one synthetic rollout batch in the tiny config's shape (prompts_per_step x group_size
sequences, responses of random length up to rollout.max_new_tokens), the same initial weights for
every measurement. Each repetition runs every variant once, in rotating order, from the same
weights and a fresh optimiser; the figure per variant is the median over repetitions. The timed
region is `learner_update` (all mini-batches of one RL step): rollout, reward and logp_old are the
same under every regime, so the ratio of whole steps is closer to 1 than the ratio reported here.

Each ratio is reported three ways (of the medians, of the minima, median of per-repetition ratios);
on a loaded machine the minima are the least disturbed.

    occ / detach       the proxy's cost (paper: 8.07 s vs 8.11 s per step, <= 1.02 wanted)
    diagnosed / plain  occ with diagnostics.exact_every=1 (exact c, v2 on the step's last
                       mini-batch) over plain occ (<= 2 wanted; the paper's full gradient: 5.6x)
    exact / paper      occ with regime.estimator=exact (probe on every mini-batch) over occ

Writes results/mtp_cost.json and results/mtp_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = {  # name -> (overrides, diagnose)
    "detach": (["regime=detach"], False),
    "occ": (["regime=occ"], False),
    "occ+diag": (["regime=occ", "diagnostics.exact_every=1"], True),
    "occ exact": (["regime=occ", "regime.estimator=exact"], False),
}


def compose(overrides):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from occ_exp.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def synthetic_batch(cfg, vocab: int, prompt_len: int, seed: int = 0):
    """A rollout batch in the learner's layout with random tokens and response lengths."""
    from occ_exp.algo.advantages import ADVANTAGES
    from occ_exp.rollout.base import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    a, R = cfg.algorithm, cfg.rollout.max_new_tokens
    B = cfg.data.prompts_per_step * a.group_size
    ids = torch.randint(4, vocab, (B, prompt_len + R), generator=g)
    attn = torch.ones_like(ids)
    lengths = torch.randint(R // 3, R + 1, (B,), generator=g)
    resp_mask = torch.arange(R)[None] < lengths[:, None]
    attn[:, prompt_len:] = resp_mask.long()
    rewards = (torch.rand(B, generator=g) < 0.4).float()
    batch = RolloutBatch(ids, attn, resp_mask, torch.zeros(B, R), prompt_len, [""] * B,
                         torch.arange(B) // a.group_size, lengths >= R)
    batch.rewards = rewards
    batch.advantages = ADVANTAGES[a.advantage](rewards, a.group_size, a.adv_eps)
    return batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--out", default=str(ROOT / "results" / "mtp_cost"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every variant (e.g. data.prompts_per_step=8)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from occ_exp.algo.coefficient import CoefficientState
    from occ_exp.algo.regimes import get_regime
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.learner import build_optimizer, learner_update, recompute_logp_old

    base = compose(args.overrides)
    policy, _ = build_tiny_policy(base.model, seed=0)
    init = {k: v.clone() for k, v in policy.state_dict().items()}
    batch = synthetic_batch(base, policy.config.vocab_size, args.prompt_len)
    batch.logp_old = recompute_logp_old(policy, batch, chunk=64)
    cfgs = {name: compose(args.overrides + ov) for name, (ov, _) in VARIANTS.items()}

    def run(name: str) -> float:
        cfg, diagnose = cfgs[name], VARIANTS[name][1]
        policy.load_state_dict(init)
        for q in policy.parameters():
            q.requires_grad_(True)
        regime = get_regime(cfg.regime.name)
        opt, sched = build_optimizer(cfg.optimizer, policy, regime)
        states = [CoefficientState(cfg.regime.ema, cfg.regime.clip) for _ in range(policy.num_mtp_layers)]
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        learner_update(policy, opt, sched, regime, batch, cfg, states, gen, diagnose=diagnose)
        return time.perf_counter() - t0

    names = list(VARIANTS)
    load_before = os.getloadavg()
    for n in names:  # warm-up (allocator, lazy inits)
        run(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            times[n].append(run(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    pairs = {"occ/detach": ("occ", "detach"), "diagnosed/plain": ("occ+diag", "occ"), "exact/paper": ("occ exact", "occ")}
    # three summaries of each ratio: of the medians, of the minima (least disturbed by other load),
    # and the median of per-repetition ratios (each repetition runs both variants back to back)
    ratios = {name: {"of_medians": med[a] / med[b], "of_minima": min(times[a]) / min(times[b]),
                     "median_paired": statistics.median(x / y for x, y in zip(times[a], times[b]))}
              for name, (a, b) in pairs.items()}
    # the proxy itself, timed alone on one mini-batch's tensors: a bound on its share that does not
    # rest on the difference of two noisy step times
    from occ_exp.algo.coefficient import occ_coefficient

    a = base.algorithm
    mb = batch.select(torch.arange(batch.input_ids.shape[0] // a.num_mini_batches)).compact()
    lp_main, lp_mtp = mb.logp_old + 0.01, mb.logp_old - 0.3
    n_calls = 200
    t0 = time.perf_counter()
    for _ in range(n_calls):
        occ_coefficient(lp_main, lp_mtp, mb.logp_old, mb.response_mask)
    proxy_s = (time.perf_counter() - t0) / n_calls
    proxy_share = proxy_s * a.num_mini_batches * a.ppo_epochs / med["occ"]
    info = {
        "command": "OMP_NUM_THREADS=%s PYTHONPATH=src python scripts/bench_mtp_cost.py --reps %d --threads %d %s"
                   % (os.environ.get("OMP_NUM_THREADS", "?"), args.reps, args.threads, " ".join(args.overrides)),
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "load_avg_before_after": [load_before, os.getloadavg()], "torch": torch.__version__,
        "sequences": int(batch.input_ids.shape[0]), "mini_batches": a.num_mini_batches,
        "prompt_len": args.prompt_len, "max_response_len": base.rollout.max_new_tokens,
        "response_tokens": int(batch.response_mask.sum()), "num_mtp_layers": policy.num_mtp_layers,
        "reps": args.reps, "median_s": med, "all_s": times, "ratios": ratios,
        "proxy_call_s": proxy_s, "proxy_share_of_occ_update": proxy_share,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        "# MTP coefficient cost (learner update of one RL step, tiny model, CPU)",
        "",
        f"`{info['command']}`",
        "",
        f"{info['sequences']} sequences ({info['response_tokens']} response tokens), {a.num_mini_batches} mini-batches, "
        f"K={policy.num_mtp_layers}, torch threads {info['torch_threads']}, {args.reps} repetitions (median), "
        f"torch {torch.__version__}, {platform.platform()}; 1-min load average before / after: "
        f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.",
        "",
        "| variant | median s | min s | max s |",
        "|---|---|---|---|",
        *[f"| {n} | {med[n]:.3f} | {min(times[n]):.3f} | {max(times[n]):.3f} |" for n in names],
        "",
        "| ratio | of medians | of minima | median of paired | wanted |",
        "|---|---|---|---|---|",
        *[f"| {label} | {ratios[k]['of_medians']:.3f} | {ratios[k]['of_minima']:.3f} | {ratios[k]['median_paired']:.3f} "
          f"| {want} |" for k, label, want in (("occ/detach", "occ / detach", "<= 1.02"),
                                               ("diagnosed/plain", "diagnosed step / plain step (occ)", "<= 2"),
                                               ("exact/paper", "exact estimator (every mini-batch) / paper", "(the oracle)"))],
        "",
        f"The proxy alone (`occ_coefficient` on one mini-batch's [{mb.response_mask.shape[0]}, {mb.response_len}] "
        f"log-probs, mean of {n_calls} calls): {proxy_s * 1e3:.3f} ms, {a.num_mini_batches * a.ppo_epochs} calls per step = "
        f"{100 * proxy_share:.3f}% of the occ update. occ and detach otherwise differ in where the MTP gradient "
        "goes (trunk or not), not in how many passes run.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
