"""The sharded learner gives the one-process result: micro-batches in one process, and FSDP2 on
two CPU ranks under torchrun (gloo) on the same global batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from occ_exp import distributed as D
from occ_exp.learner import MetricAccumulator, micro_batch_indices
from tests import distributed_worker as W

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _close(a: dict, b: dict, rtol=1e-5, atol=1e-6, keys=None):
    for k in keys or a:
        assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=atol), f"{k}: {a[k]} vs {b[k]}"


def _max_weight_diff(s1: dict, s2: dict) -> float:
    assert set(s1) == set(s2)
    return max(float((s1[k].float() - s2[k].float()).abs().max()) for k in s1)


# -- micro-batches in one process -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["occ", "ce_gspo"])
def test_micro_batches_equal_one_batch(case):
    """Gradient accumulation over token-budgeted micro-batches = one forward/backward per mini-batch:
    same loss, same lambda_t (estimated on the whole mini-batch), same updated weights."""
    base = {"occ": ["regime=occ"], "ce_gspo": ["regime=ce", "algorithm=gspo"]}[case]
    whole = W.run_case(base, D.Dist())
    micro = W.run_case(base + ["algorithm.max_tokens_per_micro_batch=40"], D.Dist())
    keys = ["train/loss", "train/rl_loss", "mtp/term", "mtp/coef_first", "mtp/coef_last", "mtp/corr_proxy",
            "mtp/penalty_proxy", "mtp/acceptance", "train/grad_norm"]
    _close(whole["metrics"], micro["metrics"], keys=keys)
    assert _max_weight_diff(whole["state"], micro["state"]) < 1e-5
    if case == "occ":
        assert abs(whole["metrics"]["mtp/coef_first"] - 0.1) > 1e-3  # estimated, not the fixed default


def test_micro_batch_indices_respect_the_budget_and_cover_every_row():
    lengths = torch.tensor([5, 17, 3, 9, 9, 12, 1, 30, 8, 8])
    parts = micro_batch_indices(lengths, 36)
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    for p in parts:  # padded cost within budget, except a lone row longer than the budget
        assert len(p) * int(lengths[p].max()) <= 36 or len(p) == 1
    assert len(micro_batch_indices(lengths, 0)) == 1


def test_micro_batch_counts_are_equalised_across_ranks():
    class FakeDist:  # another rank needs 6 micro-batches
        def max(self, n):
            return max(n, 6)

    lengths = torch.tensor([4, 4, 4, 4, 4, 4, 4, 4])
    parts = micro_batch_indices(lengths, 16, FakeDist())
    assert len(parts) == 6 and sorted(torch.cat(parts).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="micro-batches"):
        micro_batch_indices(torch.tensor([4, 4]), 16, FakeDist())


def test_metric_accumulator_sums_and_token_weights():
    acc = MetricAccumulator()
    acc.add({"train/loss": 0.25, "mtp/corr_proxy_d1": 2.0, "mtp/acceptance": 0.5}, weight=10)
    acc.add({"train/loss": 0.50, "mtp/corr_proxy_d1": 1.0, "mtp/acceptance": 0.8}, weight=30)
    m = acc.reduce(D.Dist())
    assert m["train/loss"] == pytest.approx(0.75) and m["mtp/corr_proxy_d1"] == pytest.approx(3.0)
    assert m["mtp/acceptance"] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)


def test_pad_batch_keeps_the_policy_outputs(tiny_policy):
    policy, _ = tiny_policy
    b = W.fixed_batch(policy.config.vocab_size).select(torch.arange(6)).compact()
    padded = D.pad_batch(b, b.prompt_len + 3, b.response_len + 2)
    with torch.no_grad():
        a = policy(b.input_ids, b.attention_mask, b.response_len).logp_main
        c = policy(padded.input_ids, padded.attention_mask, padded.response_len).logp_main
    assert torch.allclose(a[b.response_mask], c[:, : b.response_len][b.response_mask], atol=1e-5)
    assert not padded.response_mask[:, b.response_len :].any()


def test_single_process_has_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    d = D.init_distributed(W.compose_cfg([]).distributed, "cpu")
    assert not d.enabled and d.world_size == 1 and d.shard([1, 2, 3]) == [1, 2, 3]
    assert not torch.distributed.is_initialized()


# -- the engine's counters survive the gather ---------------------------------------------------------
ENGINE_STATS = [  # what rollout=vllm with MTP drafting reports on each of two ranks in one step
    {"rollout/weight_version": 3.0, "rollout/sync_s": 0.5, "rollout/spec_drafts": 10.0,
     "rollout/spec_draft_tokens": 10.0, "rollout/spec_accepted_tokens": 8.0, "rollout/spec_acceptance": 0.8},
    {"rollout/weight_version": 3.0, "rollout/sync_s": 0.25, "rollout/spec_drafts": 30.0,
     "rollout/spec_draft_tokens": 30.0, "rollout/spec_accepted_tokens": 12.0, "rollout/spec_acceptance": 0.4},
]
MERGED_STATS = {"rollout/weight_version": 3.0, "rollout/sync_s": 0.375, "rollout/spec_drafts": 40.0,
                "rollout/spec_draft_tokens": 40.0, "rollout/spec_accepted_tokens": 20.0, "rollout/spec_acceptance": 0.5}


def _gather_stats_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b = W.fixed_batch(32).select(torch.arange(4)).compact()
        b.stats = dict(ENGINE_STATS[rank])
        d = D.Dist(rank=rank, world_size=2, enabled=True)
        g = d.gather_rollouts(b, prompts_per_rank=1)
        torch.save({"stats": g.stats, "rows": g.input_ids.shape[0]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_rollouts_keep_the_engine_counters(tmp_path):
    """Under torchrun every rank's engine counts its own drafts: the gathered batch reports them as
    one process would (counts summed, acceptance = summed accepted / summed drafted, the weight
    version and sync time averaged), on every rank; they used to vanish (empty stats)."""
    torch.multiprocessing.spawn(_gather_stats_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert r["rows"] == 8
        assert r["stats"] == pytest.approx(MERGED_STATS), r["stats"]


def test_engine_counters_merge_as_one_process_would_count_them():
    from occ_exp.rollout.base import RolloutBatch

    assert RolloutBatch.merge_stats(ENGINE_STATS) == pytest.approx(MERGED_STATS)
    assert RolloutBatch.merge_stats([{}, {}]) == {}  # rollout=hf reports nothing
    assert RolloutBatch.merge_stats([ENGINE_STATS[0]]) == pytest.approx(ENGINE_STATS[0])


# -- two ranks under torchrun -----------------------------------------------------------------------
def _torchrun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("WORLD_SIZE", None)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """FSDP2 on 2 gloo ranks vs one process, same global batch: same loss, same lambda, same
    updated weights (with and without micro-batches and activation checkpointing, DAPO and GSPO);
    greedy rollout=hf generation under full_params matches while ranks decode different lengths;
    a checkpoint written by rank 0 resumes into a fresh sharded learner bit for bit."""
    out = tmp_path / "out.pt"
    _torchrun(["-m", "tests.distributed_worker", str(out)], timeout=240)
    r = torch.load(out, weights_only=False)
    assert r["world_size"] == 2
    keys = ["train/loss", "train/rl_loss", "mtp/term", "mtp/coef_first", "mtp/coef_last", "mtp/corr_proxy",
            "mtp/penalty_proxy", "mtp/acceptance", "mtp/loss", "train/grad_norm", "train/clipfrac"]
    for name, overrides in W.CASES.items():
        one = W.run_case(overrides, D.Dist())
        two = r["cases"][name]
        _close(one["metrics"], two["metrics"], keys=keys)
        assert one["metrics"]["train/grad_norm"] > 0.05  # the global-norm clip (0.05) was active
        assert _max_weight_diff(one["state"], two["state"]) < 1e-5, name
    assert abs(r["cases"]["occ"]["metrics"]["mtp/coef_first"] - 0.1) > 1e-3

    policy, tok, *_ = W.build(W.compose_cfg(W.CASES["occ"]), D.Dist())
    for rank, (prompts, max_new) in enumerate(W.gen_plan(2)):
        ref = W.generate(policy, tok, D.Dist(), prompts, max_new)
        assert torch.equal(r["generated"][rank], ref)
    assert r["resume"] == {"step": 1, "weights_equal": True, "optimizer_equal": True}


@pytest.mark.slow
def test_two_rank_training_run_writes_metrics_and_resumes(tmp_path):
    """`torchrun -m occ_exp.train` end to end on 2 CPU ranks: rank 0 logs and checkpoints, a second
    launch resumes from the sharded run's checkpoint."""
    run = tmp_path / "run"
    common = ["-m", "occ_exp.train", "experiment=smoke", "model.warmstart.enabled=false", "trainer.device=cpu",
              "trainer.save_every=1", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
              "trainer.progress=false"]
    _torchrun(common + ["trainer.total_steps=1"], timeout=240)
    _torchrun(common + ["trainer.total_steps=2"], timeout=240)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # one writer, no duplicated steps after resume
    assert all(math.isfinite(rows[-1][k]) for k in ("mtp/coef", "mtp/acceptance", "reward/mean", "time/gather_s"))
    assert rows[-1]["eval/n"] == 32 and rows[-1]["eval/final"] == 1
    assert (run / "checkpoints" / "step_000002" / "model" / "model.safetensors").exists()
