"""The GPU check: one prepared script for a lent one-GPU machine (scripts/gpu_check.sh runs it).

    python scripts/gpu_check.py run                  # every part; results/gpu_check.md (+ results/gpu_check/)
    python scripts/gpu_check.py make-model DIR [--toy]
    python scripts/gpu_check.py peak                 # the measured matmul peak, as JSON
    python scripts/gpu_check.py wheels [DIR]         # are the carried wheels complete? (make gpu-wheels)

Parts, each in its own processes with a hard time limit, each with its own status in the report
(a part that fails or runs out of time leaves its error's last line there, and the others still run;
one out of time first gets SIGABRT, so that under PYTHONFAULTHANDLER=1 each of its Python processes writes
its threads' stacks into the part's log, kept in gpu_check/logs.txt without NCCL's heartbeat noise):

- setup: where hydra / omegaconf / math-verify come from (the carried wheels), torch, the random
  model: Qwen2.5-0.5B's architecture (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
  4864, vocabulary 151,936, tied embeddings: 494 M parameters) plus one MTP layer, random weights
  built in code (nothing downloaded), with the tiny byte-level tokenizer so that the countdown task
  and its verifier run unchanged.
- peak: a bf16 8192^3 matmul's rate on this card, the MFU denominator.
- (a) learner: `torchrun --nproc_per_node=1 -m occ_exp.train` (FSDP2, world size 1, fp32 master
  weights, bf16 compute) with gradient checkpointing, shared prompts and 8k-token micro-batches
  (the switches of the real presets, the path of issue 12's first-update crash): step time, peak
  memory, learner MFU.
- (b) exact c / v2 diagnostics at that size (one process: exact gradients need one whole
  mini-batch), alternating diagnosed and plain steps: their cost ratio.
- (c) save and resume: N steps straight, twice (run-to-run determinism), and N/2 + resume from the
  first run's checkpoint, under deterministic kernels: metrics and weights compared bit for bit.
- (d) the tiny task's RL loop with real rewards on the GPU (experiment=table1_tiny: warm start, then
  detach / ce / policy / occ x seeds, as many steps as the time left allows): a tiny Table 1.
- (e) what the check cannot prove on that machine.

MFU of the learner = model FLOPs of the update (6 N + 12 L H S per token, occ_exp.plan; the tokens
the learner runs: each group's prompt once, as shared prompts do, plus every response) / (update
seconds x the measured matmul peak). Recomputation (checkpointing), the no-grad log-prob pass and
OCC's no-grad pre-pass are real work but not model FLOPs, so they lower the MFU, as they should.

Sizes are GPU sizes on a CUDA machine, toy sizes without one or with GPU_CHECK_TOY=1 (the whole
check in about a minute on a CPU; its report says that no GPU run happened). Environment:
GPU_CHECK_RESULTS (results), GPU_CHECK_DIR (work folder, default a temporary one),
GPU_CHECK_BUDGET_S (wall budget from GPU_CHECK_T0), GPU_CHECK_PARTS (a subset, e.g. "a,c"),
GPU_CHECK_FAIL (parts to fail on purpose, e.g. "b": the report must still be written),
GPU_CHECK_TINY_SEEDS / GPU_CHECK_TINY_MAX_STEPS ((d)'s seeds, its step cap), GPU_CHECK_COMMIT (the commit, where the tree has no .git), GPU_CHECK_OVERRIDES
(Hydra overrides appended to (a)-(c)'s runs, e.g. "model.share_prompts=false"; the report shows them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS_FILE = ROOT / "scripts" / "gpu_check_wheels.txt"
DEVICE_COMMAND = "GPU_CHECK_RESULTS=$OUT GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_check.sh"
DEVICE_CARRY = '[".gpu_wheels"]'
RUN_CALL = f"run(command={DEVICE_COMMAND!r}, carry={DEVICE_CARRY}, timeout_s=600)"

QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
               rope_theta=1_000_000.0)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=512,
           rope_theta=10_000.0)
# Datasheet dense bf16 peaks (no sparsity), by the name torch reports; shown beside the measured one.
PEAK_BF16 = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12}
REGIMES = ["detach", "ce", "policy", "occ"]
PARTS = ["setup", "peak", "a", "b", "c", "d", "e"]
TITLES = {
    "setup": "setup: carried wheels, machine, random 0.5B-shape model",
    "peak": "measured matmul peak (MFU denominator)",
    "a": "(a) FSDP2 learner steps: checkpointing + shared prompts + 8k-token micro-batches",
    "b": "(b) exact c / v2 diagnostics: cost vs a plain step",
    "c": "(c) save and bit-exact resume",
    "d": "(d) tiny task, full RL loop with real rewards: a tiny Table 1",
    "e": "(e) what this check cannot prove here",
}
CANNOT_PROVE = [
    "**vLLM on CUDA** (`rollout=vllm`, MTP speculative drafting, sleep mode, weight sync into the engine): vLLM's "
    "CUDA build is not installed on the lent machine and is far larger than the 64 MiB a call can carry; every "
    "rollout here is `rollout=hf` (the static-KV-cache decode loop).",
    "**NCCL across GPUs**: one GPU, world size 1. FSDP2's sharding, reduce-scatter / all-gather over several "
    "ranks, `gather_rollouts`, and a checkpoint written on N ranks and resumed on M are not exercised here "
    "(the CPU tests run them on 2 gloo ranks).",
    "**A real checkpoint** (Qwen2.5-0.5B, MiMo-7B): nothing can be downloaded there, so (a)-(c) use random weights "
    "of the same shape; their rewards are ~0, so RL advantages are ~0 (every forward, backward and collective "
    "still runs, so costs are real, learning is not). Real-reward learning is shown only by (d)'s tiny model.",
    "**Real scale**: 7B models, 128-GPU plans, multi-node / Slurm launches, long responses (4k-16k tokens), "
    "the six math benchmarks (their files are not in the repository) and DAPO-Math data.",
    "**The project's pinned stack**: this runs the machine's torch 2.11 (cu130) and transformers 5.17, not "
    "pyproject's torch 2.13.0; W&B (not installed there; `logger=jsonl`).",
]


# -- sizes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Every size the check uses, in one place (GPU and toy)."""

    toy: bool
    budget_s: float  # the whole check, from GPU_CHECK_T0
    threads: int  # torch CPU threads of the big runs
    timeout: dict  # hard limit per part (seconds; also cut to what the budget has left)
    a: dict  # prompts, group, mini, new_tokens, micro, steps, final_eval
    b: dict
    c: dict
    tiny_seeds: int
    tiny_max_steps: int
    tiny_pilot_steps: int
    tiny_overrides: tuple = ()
    peak_n: int = 8192
    control: bool = True  # (c): a second straight run, for the GPU's run-to-run determinism


GPU = Sizes(toy=False, budget_s=440, threads=8,
            timeout={"setup": 120, "peak": 60, "a": 140, "b": 100, "c": 170, "d": 450},
            a=dict(prompts=32, group=8, mini=4, new_tokens=512, micro=8192, steps=5, final_eval=16),
            b=dict(prompts=16, group=8, mini=4, new_tokens=256, micro=0, steps=5, final_eval=8),
            c=dict(prompts=4, group=4, mini=2, new_tokens=64, micro=8192, steps=4, final_eval=8),
            tiny_seeds=2, tiny_max_steps=400, tiny_pilot_steps=6)
# Toy: about a minute of CPU time per part; the budget allows for a loaded 2-core CI machine, where
# one Python start-up importing torch and transformers can take 10-40 s.
TOY_SIZES = Sizes(toy=True, budget_s=900, threads=1,
                  timeout={"setup": 200, "peak": 60, "a": 200, "b": 200, "c": 300, "d": 900},
                  a=dict(prompts=4, group=4, mini=2, new_tokens=16, micro=256, steps=3, final_eval=4),
                  b=dict(prompts=4, group=4, mini=2, new_tokens=16, micro=0, steps=3, final_eval=4),
                  c=dict(prompts=4, group=4, mini=2, new_tokens=16, micro=256, steps=4, final_eval=4),
                  tiny_seeds=1, tiny_max_steps=2, tiny_pilot_steps=1,
                  tiny_overrides=("data.prompts_per_step=4", "algorithm.group_size=4", "algorithm.num_mini_batches=2",
                                  "rollout.max_new_tokens=24", "trainer.eval_every=0", "trainer.eval_problems=8",
                                  "trainer.final_eval_problems=16", "eval.k=2", "diagnostics.exact_every=1",
                                  "model.warmstart.steps=10", "model.warmstart.batch_size=8",
                                  "model.warmstart.eval_problems=8"),
                  peak_n=512, control=False)


# -- the random model ----------------------------------------------------------------------------
def make_model(out: Path, toy: bool) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
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


# -- the measured peak ---------------------------------------------------------------------------
def measure_peak(n: int) -> dict:
    """Rate of an n^3 matmul (bf16 on a GPU, fp32 on the CPU): mean of 10 after 3 warm-ups."""
    import torch

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:
        n = min(n, 512)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    dt = time.perf_counter() - t0
    info = {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * n**3 * reps / dt,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                    sheet=next((v for k, v in PEAK_BF16.items() if k in p.name), None))
    else:
        info.update(card=f"CPU ({os.cpu_count()} cores, no CUDA device)", sheet=None)
    return info


# -- the carried wheels ----------------------------------------------------------------------------
# What the lent machine already has (KINDS.md's package list): never carried, never reinstalled.
DEVICE_PROVIDES = {"torch", "transformers", "numpy", "sympy", "mpmath", "pyyaml", "packaging", "rich", "tqdm",
                   "safetensors", "tokenizers", "huggingface-hub", "psutil", "importlib-resources", "dataclasses",
                   "typing-extensions"}  # torch needs it


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins() -> list[tuple[str, str]]:
    """(name, version) of each wheel the check carries (scripts/gpu_check_wheels.txt)."""
    pins = []
    for line in WHEELS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins.append((name.strip(), version.strip()))
    return pins


def check_wheels(folder: Path, python: str = "3.12") -> list[str]:
    """Problems with the wheels in `folder` (empty: complete): each pin has its wheel, one version
    of each, and every requirement of every wheel (for CPython `python` on Linux, no extras) is met
    by another carried wheel or by a package the lent machine has."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    wheels = {}
    problems = []
    for whl in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(whl.name)
        if not any(t.interpreter in ("py3", f"cp{python.replace('.', '')}") for t in tags):
            problems.append(f"{whl.name}: not for CPython {python}")
        if _norm(name) in wheels:
            problems.append(f"two versions of {name}: pip install would stop")
        wheels[_norm(name)] = (version, whl)
    for name, version in wheel_pins():
        have = wheels.get(_norm(name))
        if have is None:
            problems.append(f"no wheel for {name}=={version} (run `make gpu-wheels`)")
        elif str(have[0]) != version:
            problems.append(f"{name}: wheel {have[0]}, pinned {version} (run `make gpu-wheels`)")
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "platform_machine": "x86_64", "extra": ""}
    for version, whl in wheels.values():
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = wheels.get(_norm(req.name))
            if dep is not None:
                if not req.specifier.contains(dep[0], prereleases=True):
                    problems.append(f"{whl.name} needs {req}, the carried wheel is {dep[0]}")
            elif _norm(req.name) not in DEVICE_PROVIDES:
                problems.append(f"{whl.name} needs {req}: neither carried nor on the lent machine")
    return problems


# -- processes -----------------------------------------------------------------------------------
def child_env(threads: int, extra: dict | None = None) -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}  # SIGABRT at a time-out: every Python process writes its threads' stacks
    env.update(extra or {})
    return env


LAUNCHED: list[subprocess.Popen] = []  # every process the check started; none outlives it (see main)


def launch(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("+ " + shlex.join(cmd) + "\n").encode())
        f.flush()
        # its own process group: a time-out ends it with everything it started (torchrun's
        # workers, the verifier's forkserver)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    LAUNCHED.append(p)
    return p


def signal_groups(procs: list[subprocess.Popen], sig: int) -> list[subprocess.Popen]:
    """`sig` to the process group of each live process (launch() gives each its own); the live ones."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    return live


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM to each process group at once (a run finishes its step and checkpoints), SIGKILL
    to what is left after `grace` seconds."""
    live = signal_groups(procs, signal.SIGTERM)
    end = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def dump_stacks(procs: list[subprocess.Popen], wait: float = 3.0) -> None:
    """SIGABRT to each live process group: under PYTHONFAULTHANDLER=1 (child_env) every Python
    process in it (torchrun's agent and workers, the verifier's pool) writes the stack of each of its
    threads to its log before it ends: where a hung run was waiting."""
    live = signal_groups(procs, signal.SIGABRT)
    end = time.monotonic() + wait
    while time.monotonic() < end and any(p.poll() is None for p in live):
        time.sleep(0.1)


class PartTimeout(RuntimeError):
    pass


class PartFailed(RuntimeError):
    """A part's check failed; `from_log`: a process exited with an error, its log says which."""

    def __init__(self, msg: str, from_log: bool = False):
        super().__init__(msg)
        self.from_log = from_log


def wait_all(procs: list[subprocess.Popen], deadline: float, what: str) -> None:
    """Wait for every process; past `deadline` end them all (PartTimeout). A non-zero exit is PartFailed."""
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            dump_stacks(procs)
            stop(procs)
            raise PartTimeout(f"{what}: still running at the part's time limit; ended (its processes' Python "
                              "stacks in its log)")
        time.sleep(0.5)
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise PartFailed(f"{what}: exit status {bad[0]}", from_log=True)


NOISE = ("torch.distributed.elastic", "ChildFailedError", "To enable traceback", "error_file:", "traceback :",
         "exitcode", "Root Cause", "Failures:", "<NO_OTHER_FAILURES>", "time      :", "host      :", "rank      :",
         "local_rank:", "Traceback (most recent call last)", "warnings.warn", "[W", "WARNING")


# lines that crowd a log's end without saying anything about the run: NCCL's heartbeat monitor once
# torchrun's agent (its TCPStore) is gone, C++ frames, Python 3.12's escape warnings and their source line
HEARTBEAT_NOISE = re.compile(r"TCPStore|^frame #\d+:|^Exception raised from sendBytes|ProcessGroupNCCL\.cpp:\d+\]")


def log_tail(text: str, n: int = 150) -> str:
    """The last `n` lines of a part's log that say something: the NCCL heartbeat lines (and C++
    frames, and SyntaxWarning pairs) are dropped and counted, so a time-out's tail still shows
    how far the run got and its stacks."""
    lines, dropped, skip_next = [], 0, False
    for line in text.splitlines():
        if skip_next:
            skip_next, dropped = False, dropped + 1
            continue
        if "SyntaxWarning" in line:
            skip_next, dropped = True, dropped + 1
            continue
        if HEARTBEAT_NOISE.search(line) or (not line.strip() and lines and not lines[-1].strip()):
            dropped += 1
            continue
        lines.append(line)
    note = [f"({dropped} lines of NCCL heartbeat / C++ frames / warnings dropped)"] if dropped else []
    return "\n".join(lines[-n:] + note)


def last_error_line(text: str) -> str:
    """The line that says what went wrong: the last exception / error line of a log, skipping
    torchrun's summary block; else its last line."""
    lines = [l.strip() for l in text.splitlines()]
    lines = [l for l in lines if l and not set(l) <= set("=-*+~ ") and not any(n in l for n in NOISE)]
    for l in reversed(lines):
        if re.search(r"\b\w*(Error|Exception|error|Killed)\b", l):
            return l[:400]
    return lines[-1][:400] if lines else "(no output)"


# -- reading runs ----------------------------------------------------------------------------------
def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (a partly written last line is skipped)."""
    f = run_dir / "metrics.jsonl"
    rows = []
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return [r for r in rows if r.get("step", 0) > 0]


def med(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def learner_numbers(run_dir: Path, peak: float | None, sheet: float | None) -> dict:
    """Step time, peak memory and learner MFU of a run (median over steps 2..N: step 1 warms up)."""
    from omegaconf import OmegaConf

    from occ_exp.plan import model_config, model_size, train_flops_per_token

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    rows = read_rows(run_dir)
    if not rows:
        raise PartFailed(f"{run_dir}: no metrics rows")
    timed = rows[1:] or rows
    size = model_size(model_config(cfg.model)[0], cfg.model.num_mtp_layers)
    G = cfg.algorithm.group_size
    seqs = cfg.data.prompts_per_step * G
    tokens = med(timed, "rollout/tokens")
    resp = med(timed, "rollout/response_len") * seqs
    run_tokens = resp + (tokens - resp) / G if cfg.model.share_prompts else tokens
    flops = cfg.algorithm.ppo_epochs * run_tokens * train_flops_per_token(size, tokens / seqs)
    update = med(timed, "time/update_s")
    achieved = flops / update
    step = statistics.median(r["time/step_s"] - r.get("time/eval_s", 0.0) for r in timed)
    cuda = any("mem/update_peak_gib" in r for r in rows)  # else the CPU's peak resident memory
    gib = lambda phase: max((r[f"mem/{phase}_peak{'' if cuda else '_rss'}_gib"] for r in rows  # noqa: E731
                             if f"mem/{phase}_peak{'' if cuda else '_rss'}_gib" in r), default=float("nan"))
    return {"params_m": size.total / 1e6, "steps": len(rows), "timed": len(timed), "step_s": step,
            "rollout_s": med(timed, "time/rollout_s"), "logp_old_s": med(timed, "time/logp_old_s"),
            "update_s": update, "tokens": tokens, "learner_tokens": run_tokens, "tflops": achieved / 1e12,
            "mfu_measured": achieved / peak if peak else None, "mfu_sheet": achieved / sheet if sheet else None,
            "peak_update_gib": gib("update"), "peak_rollout_gib": gib("rollout"),
            "mem_kind": "GPU memory allocated" if cuda else "process resident memory (CPU)",
            "micro_tokens": cfg.algorithm.max_tokens_per_micro_batch,
            "mini_batch_tokens": tokens / cfg.algorithm.num_mini_batches}


def diagnostics_numbers(run_dir: Path) -> dict:
    """Diagnosed steps (they log diag/*) against plain ones, step 1 (warm-up) left out."""
    rows = read_rows(run_dir)[1:]
    diag = [r for r in rows if "diag/corr" in r or "diag/corr_d1" in r]
    plain = [r for r in rows if r not in diag]
    if not diag or not plain:
        raise PartFailed(f"{len(diag)} diagnosed and {len(plain)} plain steps after warm-up; need both")
    last = diag[-1]
    pick = lambda k: last.get(k, last.get(f"{k}_d1"))  # noqa: E731
    return {"diag_steps": [r["step"] for r in diag], "plain_steps": [r["step"] for r in plain],
            "update_diag_s": med(diag, "time/update_s"), "update_plain_s": med(plain, "time/update_s"),
            "ratio": med(diag, "time/update_s") / med(plain, "time/update_s"),
            "diag_time_s": med(diag, "diag/time_s"),
            "peak_diag_gib": med(diag, "mem/update_peak_gib"), "peak_plain_gib": med(plain, "mem/update_peak_gib"),
            "c": pick("diag/corr"), "v2": pick("diag/penalty"), "lambda_star": pick("diag/lambda_star"),
            "cosine": pick("diag/cosine")}


def _comparable(rows: list[dict], after: int) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows
            if r["step"] > after}


def compare_runs(a: Path, b: Path, after: int) -> dict:
    """Metric rows after step `after` and every tensor of the final checkpoints' safetensors files."""
    import torch
    from safetensors.torch import load_file

    ra, rb = _comparable(read_rows(a), after), _comparable(read_rows(b), after)
    diff_rows = []
    for s in sorted(set(ra) | set(rb)):
        x, y = ra.get(s, {}), rb.get(s, {})
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k) and not (x.get(k) != x.get(k) and y.get(k) != y.get(k)):  # NaN == NaN here
                diff_rows.append(f"step {s} {k}: {x.get(k)} vs {y.get(k)}")
    ca, cb = (sorted((d / "checkpoints").glob("step_*"))[-1] for d in (a, b))
    files = sorted(p.relative_to(ca) for p in ca.rglob("*.safetensors"))
    if not files:
        raise PartFailed(f"no safetensors files in {ca}")
    n_tensors, diff_tensors, max_abs = 0, [], 0.0
    for f in files:
        ta, tb = load_file(ca / f), load_file(cb / f)
        for k in sorted(set(ta) | set(tb)):
            n_tensors += 1
            if k not in ta or k not in tb or ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype:
                diff_tensors.append(k)
            elif not ta[k].reshape(-1).view(torch.uint8).equal(tb[k].reshape(-1).view(torch.uint8)):
                diff_tensors.append(k)
                max_abs = max(max_abs, float((ta[k].double() - tb[k].double()).abs().max()))
    return {"steps": sorted(ra), "rows_equal": not diff_rows and ra.keys() == rb.keys(), "row_diffs": diff_rows[:5],
            "n_row_diffs": len(diff_rows), "checkpoint": f"{ca.name} vs {cb.name}", "tensors": n_tensors,
            "tensors_equal": not diff_tensors, "tensor_diffs": diff_tensors[:5], "n_tensor_diffs": len(diff_tensors),
            "max_abs_diff": max_abs}


# -- the tiny Table 1's step budget ------------------------------------------------------------------
def tiny_target(progress: list[dict], remaining_s: float, n_max: int, eval_every: int, restart_s: float) -> int | None:
    """How many steps every tiny run can reach in `remaining_s`: None when all reach `n_max` as they
    run, else the N to restart them with (they resume from the checkpoint they write on SIGTERM).
    `progress` per run: step (done), step_s (per RL step), eval_s (one in-training evaluation),
    final_eval_s (the final one)."""
    def need(p: dict, n: int, restart: float) -> float:
        evals = sum(1 for s in range(p["step"] + 1, n) if eval_every and s % eval_every == 0)
        return restart + (n - p["step"]) * p["step_s"] + evals * p["eval_s"] + p["final_eval_s"]

    if all(need(p, n_max, 0.0) <= remaining_s for p in progress):
        return None
    # a run finishes the step it is in before it stops, and one resumed at its last step would skip
    # the final evaluation: two more than the furthest run
    n = max(p["step"] for p in progress) + 2
    while n < n_max and all(need(p, n + 1, restart_s) <= remaining_s for p in progress):
        n += 1
    return n


# -- the report ----------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    summary: str = ""
    error: str = ""
    numbers: dict = field(default_factory=dict)
    details: list = field(default_factory=list)  # markdown lines
    commands: list = field(default_factory=list)


def git_commit() -> str:
    """GPU_CHECK_COMMIT on the device (its copy of the tree has no .git), else the tree's own commit."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    sys.path.insert(0, str(ROOT / "src"))
    from occ_exp.runtime import code_commit  # after the path, as this script's other package imports
    return code_commit(ROOT)


def render(parts: dict[str, Part], meta: dict) -> str:
    toy = meta["toy"]
    L = ["# GPU check", ""]
    if toy:
        L += ["**No GPU run happened for this file: it comes from the CPU toy mode of `scripts/gpu_check.sh`** "
              "(`GPU_CHECK_TOY=1`, or no CUDA device), which proves that the script and its report run end to end "
              "and that every part reports a status. Its sizes are toy sizes and its times are CPU times, not GPU "
              "numbers.", ""]
    L += ["On a lent GPU machine (device tool), after `make gpu-wheels` here, one call:", "",
          f"    {RUN_CALL}", "",
          "then copy the returned `gpu_check.md` and `gpu_check/` into `results/` and commit them. "
          f"It is sized to finish in at most 8 minutes (budget {meta['budget_s']:.0f} s, hard limits per part).", "",
          f"- produced by `bash scripts/gpu_check.sh`{' (toy mode)' if toy else ''} at commit `{meta['commit']}`, "
          f"{meta['date']}, {meta['wall_s']:.0f} s wall",
          f"- machine: {meta.get('card', '?')}; torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}, "
          f"Python {meta.get('python', platform.python_version())}, {os.cpu_count()} CPU cores",
          f"- wheels: {meta.get('wheels', '?')}",
          f"- extra overrides of (a)-(c) (GPU_CHECK_OVERRIDES): `{meta.get('overrides') or 'none'}`", "",
          "| part | status | seconds | result |", "|---|---|---|---|"]
    for name in PARTS:
        p = parts[name]
        res = p.summary if p.status == "ok" else (p.error or p.summary)
        L.append(f"| {TITLES[name]} | **{p.status}** | {p.seconds:.0f} | {res.replace('|', '/')} |")
    for name in PARTS:
        p = parts[name]
        L += ["", f"## {TITLES[name]}", "", f"Status: **{p.status}**" + (f" — `{p.error}`" if p.error else ""), ""]
        L += p.details
        if p.commands:
            L += ["", "Commands:", ""] + [f"    {c}" for c in p.commands]
    return "\n".join(L) + "\n"


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


# -- the check -----------------------------------------------------------------------------------
class Check:
    def __init__(self, sizes: Sizes, results: Path, work: Path):
        self.s, self.results, self.work = sizes, results, work
        self.t0_wall = float(os.environ.get("GPU_CHECK_T0", time.time()))
        self.t0 = time.monotonic() - (time.time() - self.t0_wall)
        self.end = self.t0 + float(os.environ.get("GPU_CHECK_BUDGET_S", sizes.budget_s))
        self.only = {p.strip() for p in os.environ.get("GPU_CHECK_PARTS", "").split(",") if p.strip()}
        self.fail = {p.strip() for p in os.environ.get("GPU_CHECK_FAIL", "").split(",") if p.strip()}
        self.parts = {n: Part(n) for n in PARTS}
        self.extra = shlex.split(os.environ.get("GPU_CHECK_OVERRIDES", ""))  # appended to (a)-(c)'s runs
        self.peak: dict = {}
        self.model = work / "model"
        self.cache = work / "cache"
        self.meta = {"toy": sizes.toy, "budget_s": self.end - self.t0, "commit": git_commit(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": 0.0,
                     "overrides": shlex.join(self.extra)}
        self.lock = threading.Lock()
        (results / "gpu_check").mkdir(parents=True, exist_ok=True)

    # plumbing
    def left(self) -> float:
        return self.end - time.monotonic()

    def deadline(self, name: str, reserve: float = 15.0) -> float:
        return min(time.monotonic() + self.s.timeout[name], self.end - reserve)

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def bad_override(self, name: str) -> list[str]:
        return ["trainer.total_steps=-1"] if name in self.fail else []  # GPU_CHECK_FAIL: a real config error

    def train_cmd(self, how: str) -> list[str]:
        py = sys.executable
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        return {"single": [py, "-m", "occ_exp.train"], "torchrun": [*torchrun, "-m", "occ_exp.train"],
                "torchrun_det": [*torchrun, str(ROOT / "scripts" / "gpu_check_train.py")]}[how]

    def real_model(self, d: dict, name: str) -> list[str]:
        """The switches of the real presets on the random 0.5B-shape model, at `d`'s sizes."""
        return [f"model.path={self.model}", "model.name=qwen2_random", "model.num_mtp_layers=1",
                "model.gradient_checkpointing=true", "model.share_prompts=true", "data=tiny", "logger=jsonl",
                f"data.prompts_per_step={d['prompts']}", f"algorithm.group_size={d['group']}",
                f"algorithm.num_mini_batches={d['mini']}", f"algorithm.max_tokens_per_micro_batch={d['micro']}",
                f"rollout.max_new_tokens={d['new_tokens']}", f"rollout.min_new_tokens={d['new_tokens']}",
                "rollout.static_cache=true", f"trainer.total_steps={d['steps']}",
                f"trainer.final_eval_problems={d['final_eval']}", "trainer.eval_before_train=false",
                "trainer.eval_every=0", "trainer.progress=false", f"trainer.threads={self.s.threads}",
                f"trainer.device={'cpu' if self.s.toy else 'cuda'}", f"paths.cache_dir={self.cache}",
                f"hydra.run.dir={self.work / name}", *self.extra, *self.bad_override(name)]

    def run_one(self, name: str, cmd: list[str], deadline: float, env: dict | None = None) -> None:
        self.parts[name].commands.append(shlex.join(cmd))
        p = launch(cmd, self.log(name), env or child_env(self.s.threads))
        wait_all([p], deadline, name)

    def write(self) -> None:
        with self.lock:
            self.meta["wall_s"] = time.monotonic() - self.t0
            (self.results / "gpu_check.md").write_text(render(self.parts, self.meta))
            payload = {"meta": self.meta, "parts": {n: {k: v for k, v in vars(p).items() if k != "details"}
                                                    for n, p in self.parts.items()}}
            (self.results / "gpu_check" / "summary.json").write_text(json.dumps(payload, indent=1, default=str))

    def run_part(self, name: str, fn) -> None:
        p = self.parts[name]
        if self.only and name not in self.only:
            p.status = "skipped"
            p.summary = "not selected (GPU_CHECK_PARTS)"
            return
        if name not in ("e",) and self.left() < 20:
            p.status = "skipped"
            p.summary = f"out of time: {self.left():.0f} s of the budget left"
            return
        t = time.monotonic()
        p.status = "running"
        print(f"gpu_check: part {name} ({self.left():.0f} s of the budget left)", flush=True)
        try:
            fn(p)
            p.status = "ok"
        except PartTimeout as e:
            p.status = "timed out"
            p.error = str(e)
        except Exception as e:  # noqa: BLE001 - any failure of a part is reported, the others still run
            p.status = "failed"
            log = self.log(name)
            tail = last_error_line(log.read_text(errors="replace")) if log.exists() else ""
            if isinstance(e, PartFailed):
                p.error = (tail or str(e)) if e.from_log else str(e)
            else:
                p.error = f"{type(e).__name__}: {e}" + (f" (log: {tail})" if tail else "")
        p.seconds = time.monotonic() - t
        print(f"gpu_check: part {name}: {p.status} {p.error or p.summary}", flush=True)
        self.write()

    # parts
    def setup(self, p: Part) -> None:
        if "setup" in self.fail:
            raise RuntimeError("GPU_CHECK_FAIL injected a failure into part setup")
        found = {}
        for m in ("hydra", "omegaconf", "math_verify", "latex2sympy2_extended", "antlr4", "torch", "transformers"):
            try:
                mod = importlib.import_module(m)
                found[m] = [getattr(mod, "__version__", "?"), mod.__file__]
            except Exception as e:  # noqa: BLE001 - reported in the table
                found[m] = [None, repr(e)]
        site = os.environ.get("GPU_CHECK_SITE", "")
        p.details += ["| package | version | from |", "|---|---|---|"]
        p.details += [f"| {m} | {v or 'missing'} | `{f}` |" for m, (v, f) in found.items()]
        missing = [m for m, (v, _) in found.items() if v is None]
        carried = [m for m, (_, f) in found.items() if site and f and f.startswith(site)]
        self.meta["wheels"] = (f"installed from the carried folder into `{site}` ({', '.join(carried)})" if site
                               else "none installed (this Python already has them)")
        if missing:
            raise RuntimeError(f"cannot import {', '.join(missing)}: run `make gpu-wheels` and carry .gpu_wheels")
        self.run_one("setup", [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "make-model", str(self.model),
                               *(["--toy"] if self.s.toy else [])], self.deadline("setup"))
        line = [l for l in self.log("setup").read_text().splitlines() if "parameters" in l]
        p.summary = f"imports ok; {line[-1] if line else 'model written'}"
        p.details += ["", p.summary]

    def peak_part(self, p: Part) -> None:
        if "peak" in self.fail:
            raise RuntimeError("GPU_CHECK_FAIL injected a failure into part peak")
        self.peak = measure_peak(self.s.peak_n)  # in this process: a few seconds, no start-up to pay
        self.meta.update({k: self.peak[k] for k in ("card", "torch", "cuda", "python")})
        pk = self.peak
        p.numbers = pk
        rate = f"{pk['flops'] / 1e12:.1f} TFLOP/s" if pk["flops"] > 1e12 else f"{pk['flops'] / 1e9:.1f} GFLOP/s"
        p.summary = (f"{rate} ({pk['dtype']} {pk['n']}^3 matmul)"
                     + (f"; datasheet {pk['sheet'] / 1e12:.0f}" if pk.get("sheet") else ""))
        p.details.append(p.summary + f" on {pk['card']}")

    def part_a(self, p: Part) -> None:
        d = self.s.a
        self.run_one("a", [*self.train_cmd("torchrun"), "regime=occ", *self.real_model(d, "a")], self.deadline("a"))
        n = learner_numbers(self.work / "a", self.peak.get("flops"), self.peak.get("sheet"))
        p.numbers = n
        mfu = fmt(100 * n["mfu_measured"], ".1f") + " %" if n["mfu_measured"] else "n/a"
        p.summary = (f"step {n['step_s']:.2f} s (update {n['update_s']:.2f} s), peak {fmt(n['peak_update_gib'])} GiB, "
                     f"MFU {mfu} of the measured peak")
        p.details += [
            f"regime=occ, {d['prompts']} prompts x {d['group']} samples, {d['new_tokens']} new tokens each, "
            f"{d['mini']} optimiser steps per rollout, micro-batches of at most {d['micro']} tokens, "
            f"{n['params_m']:.1f} M parameters; median over steps 2..{n['steps']} (step 1 warms up); the final "
            f"evaluation's time is left out of the step time. Peak memory: {n['mem_kind']}.", "",
            "| step s | rollout s | logp_old s | update s | tokens / step | tokens / mini-batch | learner tokens | "
            "learner TFLOP/s | MFU (measured peak) | MFU (datasheet) | peak mem update GiB | peak mem rollout GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {n['step_s']:.2f} | {n['rollout_s']:.2f} | {n['logp_old_s']:.2f} | {n['update_s']:.2f} | "
            f"{n['tokens']:,.0f} | {n['mini_batch_tokens']:,.0f} | {n['learner_tokens']:,.0f} | {n['tflops']:.3g} | "
            f"{mfu} | {fmt(100 * n['mfu_sheet'], '.1f') + ' %' if n['mfu_sheet'] else 'n/a'} | "
            f"{fmt(n['peak_update_gib'])} | {fmt(n['peak_rollout_gib'])} |"]
        self._clean("a")

    def part_b(self, p: Part) -> None:
        d = self.s.b
        every = 2
        cmd = [*self.train_cmd("single"), "regime=occ", *self.real_model(d, "b"), f"diagnostics.exact_every={every}"]
        self.run_one("b", cmd, self.deadline("b"))
        n = diagnostics_numbers(self.work / "b")
        p.numbers = n
        p.summary = (f"diagnosed update {n['update_diag_s']:.2f} s vs plain {n['update_plain_s']:.2f} s: "
                     f"x{n['ratio']:.2f}")
        p.details += [
            f"One process (exact gradients need one whole mini-batch: no micro-batches, no torchrun), "
            f"`model.dtype=auto` (bf16 weights on a GPU), "
            f"checkpointing and shared prompts on, {d['prompts']} prompts x {d['group']} samples x {d['new_tokens']} "
            f"new tokens, {d['mini']} mini-batches; `diagnostics.exact_every={every}`: diagnosed steps "
            f"{n['diag_steps']}, plain steps {n['plain_steps']} (step 1 warms up).", "",
            "| update s (diagnosed) | update s (plain) | ratio | diag/time_s | peak GiB (diagnosed) | peak GiB (plain) | "
            "c | v2 | lambda* | cosine |", "|---|---|---|---|---|---|---|---|---|---|",
            f"| {n['update_diag_s']:.2f} | {n['update_plain_s']:.2f} | {n['ratio']:.2f} | {fmt(n['diag_time_s'])} | "
            f"{fmt(n['peak_diag_gib'])} | {fmt(n['peak_plain_gib'])} | {fmt(n['c'], '.3e')} | {fmt(n['v2'], '.3e')} | "
            f"{fmt(n['lambda_star'], '.3e')} | {fmt(n['cosine'], '.3f')} |", "",
            "On random weights every reward is 0, so the RL gradient and c are 0; the diagnostics do the same work "
            "(every per-loss gradient is taken), so the cost ratio is the real one."]
        self._clean("b")

    def part_c(self, p: Part) -> None:
        d = self.s.c
        half = d["steps"] // 2
        env = child_env(max(1, self.s.threads // 2), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
        base = [*self.train_cmd("torchrun_det"), "regime=ce", "optimizer.lr=1e-4"]
        straight = [*base, *self.real_model(d, "c_straight"), f"trainer.save_every={half}", "trainer.keep_last=2"]
        again = [*base, *self.real_model(d, "c_again"), "trainer.save_every=0"]
        deadline = self.deadline("c")
        first = (straight, again) if self.s.control else (straight,)
        procs = [launch(c, self.log("c"), env) for c in first]
        p.commands += [shlex.join(c) for c in first]
        wait_all(procs, deadline, "c (straight runs)")
        ckpt = sorted((self.work / "c_straight" / "checkpoints").glob(f"step_{half:06d}"))
        if not ckpt:
            raise PartFailed(f"no checkpoint at step {half} in {self.work / 'c_straight'}")
        resumed = [*base, *self.real_model(d, "c_resumed"), f"trainer.resume={ckpt[0]}", "trainer.save_every=0"]
        self.run_one("c", resumed, deadline, env)
        res = compare_runs(self.work / "c_straight", self.work / "c_resumed", half)
        ctl = compare_runs(self.work / "c_straight", self.work / "c_again", 0) if self.s.control else None
        p.numbers = {"resume": res, "control": ctl}
        exact = res["rows_equal"] and res["tensors_equal"]
        deterministic = ctl is None or (ctl["rows_equal"] and ctl["tensors_equal"])
        p.summary = (f"resume {'bit-exact' if exact else 'NOT bit-exact'} ({len(res['steps'])} steps' metrics, "
                     f"{res['tensors']} tensors)" + ("" if ctl is None else
                                                      f"; two straight runs {'identical' if deterministic else 'differ'}"))
        p.details += [
            f"regime=ce (the MTP loss moves the trunk, so the weights depend on every sampled token), lr 1e-4, "
            f"torchrun FSDP2 with checkpointing, shared prompts and micro-batches, deterministic kernels "
            f"(`torch.use_deterministic_algorithms`, warn-only; `CUBLAS_WORKSPACE_CONFIG=:4096:8`). "
            f"Straight: {d['steps']} steps, saving at step {half}; resumed: a new run folder resumed from that "
            f"checkpoint (`trainer.resume=<folder>`) to step {d['steps']}"
            + ("; control: a second straight run, beside the first." if self.s.control else "."), "",
            "| comparison | metric rows (steps) | equal | tensors | equal | max abs diff | first differences |",
            "|---|---|---|---|---|---|---|"]
        for label, r in (("straight vs resumed", res), ("straight vs straight (control)", ctl)):
            if r is None:  # toy mode: the CPU's determinism is the reliability tests' business
                continue
            first = "; ".join(r["row_diffs"][:2] + r["tensor_diffs"][:2]) or "none"
            p.details.append(f"| {label} | {r['steps']} | {r['rows_equal']} ({r['n_row_diffs']} differ) | {r['tensors']} | "
                             f"{r['tensors_equal']} ({r['n_tensor_diffs']} differ) | {r['max_abs_diff']:.3g} | "
                             f"{first.replace('|', '/')} |")
        if not exact:
            p.details.append("")
            p.details.append("The resume is not bit-exact" + (
                ", while two straight runs agree: a resume bug on this path." if deterministic else
                "; neither are two straight runs, so run-to-run non-determinism of this GPU path is the first suspect."))
        for name in ("c_straight", "c_again", "c_resumed"):
            self._clean(name)
        if not exact:
            raise PartFailed(p.summary)

    def part_d(self, p: Part, end: float) -> None:
        """Warm start, then regimes x seeds side by side; their step count fitted to the time left."""
        root = self.work / "tiny"
        seeds = int(os.environ.get("GPU_CHECK_TINY_SEEDS", self.s.tiny_seeds))
        base = [sys.executable, "-m", "occ_exp.train", "experiment=table1_tiny", f"paths.cache_dir={self.cache}",
                f"trainer.device={'cpu' if self.s.toy else 'cuda'}", *self.s.tiny_overrides]
        env = child_env(1)
        warm = [*base, "trainer.total_steps=0", "trainer.eval_before_train=false", "logger=none",
                f"trainer.threads={self.s.threads}", f"hydra.run.dir={root / 'warmstart'}", *self.bad_override("d")]
        p.commands.append(shlex.join(warm))
        t = time.monotonic()
        wait_all([launch(warm, self.log("d"), child_env(self.s.threads))], end, "d (warm start)")
        warm_s = time.monotonic() - t
        runs = {f"{r}_s{s}": [*base, f"regime={r}", f"seed={s}", "trainer.threads=1",
                              f"hydra.run.dir={root / f'{r}_s{s}'}"] for r in REGIMES for s in range(seeds)}

        def start(n: int) -> dict:
            out = {}
            for k, cmd in runs.items():
                c = [*cmd, f"trainer.total_steps={n}"]
                out[k] = launch(c, self.log("d"), env)
            return out

        n_max = int(os.environ.get("GPU_CHECK_TINY_MAX_STEPS", self.s.tiny_max_steps))
        p.commands.append(shlex.join([*runs[next(iter(runs))], f"trainer.total_steps={n_max}"]) + "   # each regime x seed")
        t_launch = time.monotonic()
        procs = start(n_max)
        target = None
        decided = False
        first_row_s: list[float] = []
        while any(q.poll() is None for q in procs.values()) and time.monotonic() < end:
            time.sleep(1.0)
            if decided:
                continue
            if any(q.poll() not in (None, 0) for q in procs.values()):
                decided = True  # a run failed: no re-planning; the others run on, the report says which
                continue
            rows = {k: read_rows(root / k) for k in runs}
            if not first_row_s and all(rows.values()):
                first_row_s.append(time.monotonic() - t_launch)  # start-up + step 1
            if any(len(r) < self.s.tiny_pilot_steps for r in rows.values()):
                continue
            decided = True
            prog = []
            for k, r in rows.items():
                timed = r[1:] or r
                rollout_s = med(timed, "time/rollout_s")
                step_s = statistics.median(x["time/step_s"] - x.get("time/eval_s", 0.0) for x in timed)
                prog.append({"step": r[-1]["step"], "step_s": step_s, "eval_s": rollout_s * self._tiny_ratio(root, k, False),
                             "final_eval_s": rollout_s * self._tiny_ratio(root, k, True)})
            restart = max(10.0, first_row_s[0] - min(x["step_s"] for x in prog)) + 5.0
            target = tiny_target(prog, end - time.monotonic() - 10.0, n_max, self._tiny_eval_every(root), restart)
            if target is not None:
                stop(list(procs.values()), grace=120)  # each finishes its step and checkpoints
                procs = start(target)
        unfinished = [k for k, q in procs.items() if q.poll() is None]
        stop([procs[k] for k in unfinished])
        self._tiny_table(p, root, target or n_max, seeds, warm_s)
        failed = [k for k, q in procs.items() if k not in unfinished and q.returncode != 0]
        if failed:
            raise PartFailed(f"tiny runs {failed} exited with an error", from_log=True)
        if unfinished:
            raise PartTimeout(f"tiny runs {unfinished} unfinished at the budget's end; {p.summary}")

    def _tiny_cfg(self, root: Path, run: str):
        from omegaconf import OmegaConf

        return OmegaConf.load(root / run / ".hydra" / "config.yaml")

    def _tiny_ratio(self, root: Path, run: str, final: bool) -> float:
        """An evaluation's generation work in units of one step's rollout."""
        c = self._tiny_cfg(root, run)
        problems = c.trainer.final_eval_problems if final else c.trainer.eval_problems
        return problems * c.eval.k / (c.data.prompts_per_step * c.algorithm.group_size)

    def _tiny_eval_every(self, root: Path) -> int:
        return int(self._tiny_cfg(root, f"{REGIMES[0]}_s0").trainer.eval_every)

    def _tiny_table(self, p: Part, root: Path, steps: int, seeds: int, warm_s: float) -> None:
        from occ_exp.report import collect_runs, mechanism_markdown, ordering_verdict, regime_table, table_markdown, write_csv

        runs = [r for r in collect_runs(root) if r.path.name != "warmstart"]
        done = [r for r in runs if r.finished]
        out = self.results / "gpu_check"
        with tarfile.open(out / "tiny_runs.tar.gz", "w:gz") as tar:
            for r in runs:
                for f in ("metrics.jsonl", "eval.json", ".hydra/config.yaml", ".hydra/overrides.yaml"):
                    if (r.path / f).exists():
                        tar.add(r.path / f, arcname=f"{r.path.name}/{f}")
        p.numbers = {"steps": steps, "seeds": seeds, "finished": len(done), "runs": len(runs), "warm_start_s": warm_s,
                     "accuracy": {r.path.name: r.accuracy for r in done}}
        p.summary = f"{len(done)} of {len(runs)} runs finished at {steps} steps x {seeds} seed(s)"
        if not done:
            raise PartFailed(p.summary)
        table = regime_table(done, lambda r: r.regime, [g for g in REGIMES if any(r.regime == g for r in done)])
        md = ["# Tiny Table 1 on the GPU check's machine", "",
              f"`experiment=table1_tiny` at {steps} steps x {seeds} seed(s) per regime, all runs side by side on "
              f"{self.meta.get('card', '?')} (part (d) of `bash scripts/gpu_check.sh`, commit `{self.meta['commit']}`; "
              f"warm start {warm_s:.0f} s). Final accuracy on the held-out countdown problems (avg@k, sampled), "
              "Δ vs detach with a 95% bootstrap interval; run files in `tiny_runs.tar.gz`."
              + (" **Toy sizes on the CPU: not a result.**" if self.s.toy else ""), "",
              table_markdown(table), "", "## Mechanism", "", mechanism_markdown(done, lambda r: r.regime, REGIMES), "",
              ordering_verdict(table) if any(r.regime == "detach" for r in done) else "", ""]
        (out / "table1_tiny_gpu.md").write_text("\n".join(md))
        write_csv(table, out / "table1_tiny_gpu.csv")
        p.details += [f"Warm start {warm_s:.0f} s, then {len(runs)} runs side by side (started after (a), beside "
                      f"(b) and (c)); the step count is what the time left allowed (at most "
                      f"{self.s.tiny_max_steps}). Written: `gpu_check/table1_tiny_gpu.md`, `.csv`, "
                      "`gpu_check/tiny_runs.tar.gz`.", "", table_markdown(table)]

    def part_e(self, p: Part) -> None:
        if "e" in self.fail:
            raise RuntimeError("GPU_CHECK_FAIL injected a failure into part e")
        p.summary = f"{len(CANNOT_PROVE)} items listed"
        p.details += [f"- {item}" for item in CANNOT_PROVE]

    def _clean(self, name: str) -> None:
        """Checkpoints of the 0.5B-shape runs are GBs each; the disk is 64 GiB."""
        import shutil

        shutil.rmtree(self.work / name / "checkpoints", ignore_errors=True)

    def run(self) -> int:
        print(f"gpu_check: {'toy sizes (no CUDA device or GPU_CHECK_TOY=1)' if self.s.toy else 'GPU sizes'}; "
              f"work dir {self.work}; results {self.results}; budget {self.left():.0f} s", flush=True)
        self.write()
        self.run_part("setup", self.setup)
        if self.parts["setup"].status in ("failed", "timed out"):
            for n in ("a", "b", "c"):
                self.parts[n].status, self.parts[n].summary = "skipped", "setup failed (no model / imports)"
        self.run_part("peak", self.peak_part)
        for name, fn in (("a", self.part_a),):
            if self.parts[name].status == "not run":
                self.run_part(name, fn)
        # (d) runs beside (b) and (c): it needs wall time, they need no exclusive timings against it
        # ((b)'s ratio compares steps of one run; (c) compares bits)
        tiny_end = self.end - 40.0  # then its runs are stopped (10 s) and its table written
        th = threading.Thread(target=self.run_part, args=("d", lambda p: self.part_d(p, tiny_end)), daemon=True)
        th.start()
        for name, fn in (("b", self.part_b), ("c", self.part_c)):
            if self.parts[name].status == "not run":
                self.run_part(name, fn)
        th.join(max(0.0, self.end - time.monotonic()) + 20.0)
        if th.is_alive():
            self.parts["d"].status, self.parts["d"].error = "timed out", "did not end by the budget"
        self.run_part("e", self.part_e)
        self.write()
        report = (self.results / "gpu_check.md").read_text()
        print(report)
        logs = self.results / "gpu_check" / "logs.txt"
        with open(logs, "w") as f:  # the end of each part's log, for a failure's context
            for name in PARTS:
                if self.log(name).exists():
                    text = self.log(name).read_text(errors="replace")
                    f.write(f"===== {name} (last 150 lines that say something)\n" + log_tail(text, 150) + "\n")
        bad = [n for n, p in self.parts.items() if p.status in ("failed", "timed out")]
        print(f"gpu_check: wrote {self.results / 'gpu_check.md'}; " + (f"parts not ok: {bad}" if bad else "all parts ok"))
        return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run")
    m = sub.add_parser("make-model")
    m.add_argument("dir", type=Path)
    m.add_argument("--toy", action="store_true")
    pk = sub.add_parser("peak")
    pk.add_argument("--n", type=int, default=8192)
    pk.add_argument("--json", type=Path)
    w = sub.add_parser("wheels")
    w.add_argument("dir", type=Path, nargs="?", default=ROOT / ".gpu_wheels")
    args = ap.parse_args(argv)
    if args.cmd == "make-model":
        make_model(args.dir, args.toy)
    elif args.cmd == "peak":
        info = measure_peak(args.n)
        print(json.dumps(info))
        if args.json:
            args.json.write_text(json.dumps(info))
    elif args.cmd == "wheels":
        problems = check_wheels(args.dir)
        size = sum(f.stat().st_size for f in args.dir.glob("*.whl"))
        print(f"{len(list(args.dir.glob('*.whl')))} wheels, {size / 2**20:.2f} MiB in {args.dir}")
        for pr in problems:
            print("problem:", pr)
        return 1 if problems else 0
    else:
        import tempfile

        import torch

        toy = os.environ.get("GPU_CHECK_TOY", "") == "1" or not torch.cuda.is_available()
        sizes = TOY_SIZES if toy else GPU
        work = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="occ_gpu_check."))
        results = Path(os.environ.get("GPU_CHECK_RESULTS") or ROOT / "results")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped check still ends what it started
        try:
            return Check(sizes, results.resolve(), work.resolve()).run()
        finally:
            stop(LAUNCHED, grace=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
