"""The sharded learner gives the one-process result: micro-batches in one process, and FSDP2 on
two CPU ranks under torchrun (gloo) on the same global batch."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from occ_exp import distributed as D
from occ_exp.checkpoint import latest_complete, verify_manifest
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
def _torchrun(args: list[str], timeout: int, nproc: int = 2, **extra_env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", **extra_env}
    env.pop("WORLD_SIZE", None)
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """FSDP2 on 2 gloo ranks vs one process, same global batch: same loss, same lambda, same
    updated weights (with and without micro-batches and activation checkpointing, DAPO and GSPO);
    greedy rollout=hf generation under full_params matches while ranks decode different lengths."""
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


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_two_ranks_one_rank_and_one_process(tmp_path):
    """Under FSDP2 the optimiser state, the float32 master weights (when the model folder rounds
    them: a bf16 source) and every rank's RNG are written sharded per rank with
    torch.distributed.checkpoint (nothing of them in trainer_state.pt), the model folder in its
    own dtype by rank 0, and the manifest covers the shards. Written on 2 ranks, the checkpoint
    resumes bit for bit on 2 ranks, on 1 rank under torchrun and in one process (resharded);
    a damaged shard makes the checkpoint incomplete."""
    out = tmp_path / "ckpt.pt"
    _torchrun(["-m", "tests.distributed_worker", "--checkpoint", str(out)], timeout=300)
    r = torch.load(out, weights_only=False)
    assert set(r) == set(W.SOURCES)
    for source, res in r.items():
        ckpt, saved = Path(res["ckpt"]), res["saved"]
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer_state.pt",
                "model/model.safetensors"} <= set(files)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert state["sharded_state"] == "dcp"
        assert not {"optimizer", "master_weights", "rng_per_rank"} & set(state)  # nothing gathered on rank 0
        assert {t.dtype for t in load_file(ckpt / "model" / "model.safetensors").values()} == {W.SOURCES[source]}
        keys = FileSystemReader(ckpt / "dcp").read_metadata().state_dict_metadata
        assert any(k.startswith("model.") for k in keys) == (source == "bf16")  # master weights only where kept
        if source == "bf16":  # the float32 weights are not bf16 numbers: the folder alone would not resume them
            assert any(not torch.equal(v, v.bfloat16().float()) for v in saved["weights"].values())

        assert (res["step"], res["weights_equal"], res["optimizer_equal"], res["rng_equal"]) == (1, True, True, True)
        one_out = tmp_path / f"one_{source}.pt"
        _torchrun(["-m", "tests.distributed_worker", "--resume", str(ckpt), str(one_out)], timeout=240, nproc=1)
        plain = W.resume_sharded_checkpoint(D.Dist(), ckpt)
        for back in (torch.load(one_out, weights_only=False), plain):
            assert back["step"] == 1
            assert W.same(saved["weights"], back["weights"]), source
            assert W.same(saved["optimizer"], back["optimizer"]), source
            assert W.same(saved["rng"][:1], back["rng"]), source

    ckpt = Path(r["bf16"]["ckpt"])
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    seen = []
    assert not verify_manifest(ckpt) and latest_complete(ckpt.parents[1], log=seen.append) is None
    assert "step_000001" in seen[0]


@pytest.mark.slow
def test_two_rank_training_run_writes_metrics_and_resumes(tmp_path):
    """`torchrun -m occ_exp.train` end to end on 2 CPU ranks: rank 0 logs and checkpoints (the
    trainer state sharded per rank), a launch pre-empted (SIGTERM) in step 1 is resumed by a second
    launch from the sharded checkpoint, and the resumed run equals an uninterrupted one bit for bit
    (every metric, the model folder, the optimiser shards)."""
    def launch(run, **env):
        return _torchrun(["-m", "occ_exp.train", "experiment=smoke", "model.warmstart.enabled=false",
                          "trainer.device=cpu", "trainer.save_every=1", f"hydra.run.dir={run}",
                          f"paths.cache_dir={tmp_path / 'cache'}", "trainer.progress=false", "trainer.total_steps=2",
                          "regime=occ", "regime.ema=0.5", "trainer.threads=1"], timeout=300, **env)  # bit-exact: one thread count

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    run, straight = tmp_path / "run", tmp_path / "straight"
    assert "stopped after step 1" in launch(run, OCC_EXP_FAULT="sigterm_during_step:1").stderr
    assert "at step 1" in launch(run).stderr
    launch(straight)
    r = rows(run)
    assert [x["step"] for x in r] == [0, 1, 2]  # one writer, no duplicated steps after resume
    assert all(math.isfinite(r[-1][k]) for k in ("mtp/coef", "mtp/acceptance", "reward/mean"))
    assert r[-1]["eval/n"] == 32 and r[-1]["eval/final"] == 1
    assert r == rows(straight)
    a, b = run / "checkpoints" / "step_000002", straight / "checkpoints" / "step_000002"
    for rel in ("model/model.safetensors", "dcp/__0_0.distcp", "dcp/__1_0.distcp"):
        assert sha(a / rel) == sha(b / rel), rel


@pytest.mark.slow
@pytest.mark.heavy  # make test-all only (minutes on 2 cores); see pyproject markers
def test_two_rank_run_with_dynamic_sampling(tmp_path):
    """algorithm.dynamic_sampling under 2 CPU ranks: every generation batch is gathered before the
    filter, so both ranks keep the same groups and the sharded learner's collectives line up."""
    run = tmp_path / "run"
    _torchrun(["-m", "occ_exp.train", "experiment=smoke", "model.warmstart.enabled=false", "trainer.device=cpu",
               f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer.progress=false",
               "trainer.total_steps=2", "trainer.eval_every=0", "algorithm.dynamic_sampling=true",
               "data.gen_batch_size=6", "algorithm.filter_metric=score", "algorithm.overlong_buffer=48"], timeout=400)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/kept_groups"] == 4 and r["rollout/gen_batches"] >= 1 for r in steps)
    assert all(math.isfinite(r["train/grad_norm"]) for r in steps)
