"""Real-scale switches at tiny sizes: what a first real run meets (issue 12).

Each test runs the real code path with the switches a real-scale preset turns on (gradient
checkpointing applied as the trainer applies it, shared prompts, file-backed data, MiMo-format
checkpoints, speculative decoding), replacing only the sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from occ_exp import distributed as D
from tests.conftest import CONF as CONF_DIR, compose_cfg
from tests.fixtures.compare import assert_same_logps_and_grads, backward_logps


# -- 1. gradient checkpointing + shared prompts ---------------------------------------------------
def _group_batch(tok, G: int = 2, R: int = 6):
    """Two prompts x G rows each (a micro-batch holding G rows of one prompt), one response cut short."""
    torch.manual_seed(0)
    prompts = tok(["Make 12 with 5 9 8.\n", "Hi\n"], return_tensors="pt", padding=True, padding_side="left")
    n = prompts.input_ids.shape[0] * G
    ids = torch.cat([prompts.input_ids.repeat_interleave(G, 0), torch.randint(4, 200, (n, R))], 1)
    attn = torch.cat([prompts.attention_mask.repeat_interleave(G, 0), torch.ones(n, R, dtype=torch.long)], 1)
    attn[1, -2:] = 0
    return ids, attn, R


@pytest.mark.parametrize("detach", [False, True])
def test_checkpointing_with_shared_prompts_gives_the_gradients_without_checkpointing(tiny_policy, detach):
    """The learner's forward (detach flags as regime detach / occ use them) on a micro-batch with two
    rows of one prompt, checkpointing applied exactly as the trainer applies it: it runs, and its
    log-probs and every gradient equal those with checkpointing off (prompts shared there)."""
    policy, tok = tiny_policy
    ids, attn, R = _group_batch(tok)
    results = []
    for checkpointing in (False, True):
        p = copy.deepcopy(policy)
        D.apply_activation_checkpointing(p, checkpointing)
        p.share_prompts = True
        p.train()
        assert p.shares_prompts_now is not checkpointing  # off: the prompts really are shared
        out = p(ids, attn, R, detach_trunk=detach, detach_head=detach)
        if checkpointing:  # generation / no-grad passes in eval mode still share
            assert p.eval().shares_prompts_now
            with torch.no_grad():
                assert torch.allclose(p(ids, attn, R).logp_main, out.logp_main, atol=1e-5)
            p.train()
        results.append((out, backward_logps(p, out, attn, R)))
    assert_same_logps_and_grads(*results[0], *results[1])


# -- 2. fresh MTP heads warmed up on file-backed data ---------------------------------------------
@pytest.mark.parametrize("data", ["dapo_math", "tiny"])
def test_fresh_head_warms_up_on_either_kind_of_data(tmp_path, data):
    """A checkpoint without MTP weights gets a fresh head, warmed up on the run's own training
    prompts: a DAPO-Math-format file (no reference solutions: the policy's own rollouts) or the
    countdown task; the fresh layer moves and only it."""
    from occ_exp.builders import build_task
    from occ_exp.models.loading import load_pretrained
    from occ_exp.warmstart import mtp_warmup
    from occ_exp.data.prompts import format_prompts
    from occ_exp.rollout.hf import HFRollout
    from tests.fixtures.checkpoints import make_plain_checkpoint, write_dapo_math

    over = [f"data.path={write_dapo_math(tmp_path / 'dapo_math.jsonl')}"] if data == "dapo_math" else []
    cfg = compose_cfg([f"data={data}", *over, "model.mtp_warmup_steps=3", "model.mtp_warmup_batch_size=4",
                       "model.mtp_warmup_lr=1e-3", "rollout.max_new_tokens=8"])
    task = build_task(cfg.data)
    m = load_pretrained(make_plain_checkpoint(tmp_path / "plain"), num_mtp_layers=1)
    assert m.fresh_mtp_layers == [0]
    before = {n: q.detach().clone() for n, q in m.policy.lm.named_parameters()}
    rollout = HFRollout(cfg.rollout, m.policy, m.tokenizer, "cpu")
    seen, generate = [], rollout.generate  # the prompts the warm-up sends to the rollout engine
    rollout.generate = lambda prompts, n: seen.extend(prompts) or generate(prompts, n)
    report = mtp_warmup(m.policy, m.tokenizer, task, cfg.model, [0], "cpu", rollout=rollout, log=lambda _: None)
    assert report["steps"] == 3 and report["source"] == ("rollouts" if data == "dapo_math" else "reference")
    formatted = set(format_prompts(task.problems, m.tokenizer, cfg.model.chat_template)) if data == "dapo_math" else ()
    assert (len(seen) == 4 * 4 and set(seen) <= formatted) if data == "dapo_math" else not seen
    changed = {n for n, q in m.policy.lm.named_parameters() if not torch.equal(q, before[n])}
    assert changed and all(n.startswith("model.mtp_layers.0.") for n in changed)


def test_a_data_file_draws_seeded_training_problems(tmp_path):
    """A data file answers `sample(rng, "train")` as the countdown task does: seeded, from its problems."""
    import random

    from occ_exp.data.benchmarks import MathDataset
    from tests.fixtures.checkpoints import write_dapo_math

    ds = MathDataset(write_dapo_math(tmp_path / "d.jsonl", n=5, repeats=3))
    rng = random.Random(1)
    drawn = [ds.sample(rng, "train") for _ in range(20)]
    assert len(ds) == 5 and all(p in ds.problems for p in drawn) and len({p.prompt for p in drawn}) > 1
    assert ds.sample(random.Random(3)) == ds.sample(random.Random(3))
    with pytest.raises(ValueError, match="held-out"):
        ds.sample(random.Random(0), "test")


# -- 3. a MiMo-format checkpoint: loaded exactly, saved in its own format --------------------------
def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).flatten().numpy()) \
        == bytes(b.contiguous().view(torch.uint8).flatten().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mimo_checkpoint_mtp_tensors_load_unchanged(tmp_path, dtype):
    """MiMo's MTP tensors (MiMo's names, bf16) land in our MTP layer unchanged, in a float32 run
    (the CPU default) as in a bf16 one."""
    from occ_exp.models.loading import load_pretrained
    from tests.fixtures.checkpoints import make_mimo_checkpoint

    src = make_mimo_checkpoint(tmp_path / "mimo")
    m = load_pretrained(src, dtype=dtype)
    assert m.source == "mimo" and m.loaded_mtp_layers == [0] and not m.fresh_mtp_layers
    file = _tensors(src)
    ours = m.policy.lm.state_dict()
    mtp = [k for k in file if k.startswith("model.mtp_layers.")]
    assert len(mtp) == 16 and set(k for k in ours if k.startswith("model.mtp_layers.")) == set(mtp)
    for k in file:
        assert ours[k].dtype == dtype and _same_bytes(ours[k].to(torch.bfloat16), file[k]), k


def test_saving_a_mimo_checkpoint_keeps_its_format_dtype_and_bytes(tmp_path):
    """Saved from a float32 run: config keeps model_type mimo, MiMoForCausalLM, auto_map (its
    files copied) and bf16; tensors are bf16; untouched tensors are byte-identical to the source's,
    a changed one is saved changed; and the folder loads back as MiMo."""
    import json

    from occ_exp.models.loading import load_pretrained, save_policy
    from tests.fixtures.checkpoints import MIMO_AUTO_MAP, make_mimo_checkpoint

    src = make_mimo_checkpoint(tmp_path / "mimo")
    m = load_pretrained(src, dtype=torch.float32)
    changed = "model.mtp_layers.0.input_proj.weight"
    with torch.no_grad():
        m.policy.mtp_layers[0].input_proj.weight.add_(0.5)
    save_policy(m.policy, m.tokenizer, tmp_path / "saved")
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert raw["model_type"] == "mimo" and raw["architectures"] == ["MiMoForCausalLM"]
    assert raw["auto_map"] == MIMO_AUTO_MAP and raw["torch_dtype"] == "bfloat16" and raw["num_nextn_predict_layers"] == 1
    assert all((tmp_path / "saved" / f).is_file() for f in ("configuration_mimo.py", "modeling_mimo.py"))
    before, after = _tensors(src), _tensors(tmp_path / "saved")
    assert set(after) == set(before) and all(t.dtype == torch.bfloat16 for t in after.values())
    assert not _same_bytes(after[changed], before[changed])
    for k in before:
        if k != changed:
            assert _same_bytes(after[k], before[k]), k
    again = load_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert again.source == "mimo" and again.loaded_mtp_layers == [0]
    assert _same_bytes(again.policy.lm.state_dict()[changed], after[changed])


def test_saving_keeps_a_float32_source_float32_and_takes_an_explicit_dtype(tmp_path):
    """The model's own dtype: an fp32 source stays fp32 (bit-exact reload); `dtype=` overrides."""
    from occ_exp.models.loading import load_pretrained, save_policy
    from tests.fixtures.checkpoints import make_plain_checkpoint

    m = load_pretrained(make_plain_checkpoint(tmp_path / "plain"), num_mtp_layers=1)
    save_policy(m.policy, m.tokenizer, tmp_path / "a")
    assert all(t.dtype == torch.float32 for t in _tensors(tmp_path / "a").values())
    save_policy(m.policy, m.tokenizer, tmp_path / "b", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "b").values())


# -- 4. MTP speculative decoding on a trunk vLLM's MiMo drafter cannot serve -----------------------
def test_speculative_mtp_on_a_llama_trunk_is_a_one_line_config_error(tmp_path):
    """rollout.speculative=mtp on a Llama trunk (SmolLM2's architecture): a ConfigError (one line
    from the entry point) naming the supported trunks, raised before vLLM is imported."""
    from occ_exp.config import ConfigError
    from occ_exp.models.loading import load_pretrained
    from occ_exp.rollout.vllm import VLLMRollout
    from tests.fixtures.checkpoints import make_plain_checkpoint

    m = load_pretrained(make_plain_checkpoint(tmp_path / "llama", arch="llama"), num_mtp_layers=1)
    cfg = compose_cfg(["rollout=vllm", "rollout.speculative=mtp"])
    with pytest.raises(ConfigError) as e:
        VLLMRollout(cfg.rollout, m.policy, m.tokenizer, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "llama" in msg and "Qwen2" in msg and "MiMo" in msg and "speculative=null" in msg


# -- 5. presets that measure what the paper measures; a plan that says what a run needs -----------
MIMO_PRESETS = ["mimo7b_dapo", "mimo7b_gspo"]


@pytest.mark.parametrize("preset", MIMO_PRESETS)
def test_mimo_presets_evaluate_the_six_benchmarks_on_128_gpus_with_lambda_plus_0_1(preset):
    from occ_exp.data.benchmarks import PAPER_BENCHMARKS

    c = compose_cfg([f"experiment={preset}", "regime=occ"])  # a regime given on the command line keeps 0.1
    assert tuple(c.benchmark.names) == PAPER_BENCHMARKS
    assert (c.eval.k, c.eval.temperature > 0) == (32, True)  # avg@32 needs sampling
    assert c.trainer.final_eval_problems == 0  # every problem at the end
    assert 0 < c.trainer.eval_problems <= 32 and c.trainer.eval_every > 0  # a cheaper in-training evaluation
    assert c.distributed.nodes * c.distributed.gpus_per_node == 128
    assert c.regime.lambda_plus == 0.1 and c.regime.coef == 0.1
    assert "mtp_loss_scaling_factor=0.1" in (CONF_DIR / "experiment" / "mimo7b_dapo.yaml").read_text()
    o = compose_cfg([f"experiment={preset}", "distributed.nodes=4", "regime.lambda_plus=1.0"])
    assert o.distributed.nodes * o.distributed.gpus_per_node == 32 and o.regime.lambda_plus == 1.0


def test_the_single_gpu_preset_loads_what_its_comment_says():
    c = compose_cfg(["experiment=qwen05b_1gpu"])
    assert c.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "Qwen2.5-0.5B-Instruct" in (CONF_DIR / "experiment" / "qwen05b_1gpu.yaml").read_text().split("defaults:")[0]


@pytest.fixture
def no_weights(monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_qwen7b_plan_names_the_gpus_it_needs_and_a_short_machine_is_one_line(no_weights):
    """model=qwen7b on one process does not fit an 80 GB card: the plan says how many GPUs do, and a
    run on too few GPUs (or none) is refused in one line before any weights load."""
    from rich.console import Console

    from occ_exp import plan as P

    cfg = compose_cfg(["model=qwen7b"])
    console = Console(record=True, width=250)
    plan = P.print_plan(cfg, console)
    text = console.export_text()
    fewest = plan["_fewest_gpus"]
    assert fewest and fewest > 1 and f"on {fewest} GPUs (FSDP2)" in text and "GPUs needed" in text
    size = P.model_size(P.model_config(cfg.model)[0], 1)
    assert sum(P.memory_plan(cfg, size, fewest, True).values()) < P.CARD_GIB * P.GiB
    gpu = compose_cfg(["model=qwen7b", "trainer.device=cuda"])
    short = P.check_resources(gpu, gpus=1, card_bytes=P.CARD_GIB * P.GiB)
    assert short and "\n" not in short and f"at least {fewest} GPUs" in short
    assert P.check_resources(gpu, gpus=fewest, card_bytes=P.CARD_GIB * P.GiB) is None
    if not torch.cuda.is_available():  # this machine: a CUDA preset is refused in one line
        msg = P.check_resources(compose_cfg(["experiment=mimo7b_dapo"]))
        assert msg and "\n" not in msg and "128 GPUs" in msg and "CUDA" in msg


def test_dry_run_prints_the_gpu_hours_of_the_whole_run(no_weights):
    from rich.console import Console

    from occ_exp import plan as P

    def hours(*over):
        console = Console(record=True, width=250)
        plan = P.print_plan(compose_cfg(["experiment=mimo7b_dapo", *over]), console)
        assert "GPU-hours, whole run" in console.export_text()
        return plan["_gpu_hours"]

    full, half = hours(), hours("trainer.total_steps=250")
    assert 100 < full < 1e5 and 0.45 < half / full < 0.55  # the steps dominate; evaluation adds a little
    assert hours("distributed.nodes=4") == pytest.approx(full, rel=0.05)  # the same work on fewer GPUs


# -- end to end: the real switches through the CLI at toy sizes -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", ["mimo", "plain"])
def test_two_steps_with_the_real_switches_and_a_save(source, tmp_path):
    """The CLI on a MiMo-format checkpoint (its own MTP layer) and on a plain Qwen2 one (a fresh
    head, warmed up on the data file): DAPO-Math-format data, gradient checkpointing, shared prompts,
    group rows in one micro-batch; 2 steps and a save that keeps the source's format and dtype."""
    import json

    from occ_exp.models.loading import load_pretrained
    from tests.fixtures.checkpoints import make_mimo_checkpoint, make_plain_checkpoint, write_dapo_math
    from tests.test_real_model_runs import assert_finite, train

    folder = make_mimo_checkpoint(tmp_path / "ckpt") if source == "mimo" else make_plain_checkpoint(tmp_path / "ckpt")
    data = write_dapo_math(tmp_path / "dapo_math.jsonl")
    rows = train(tmp_path / "run", [
        "experiment=smoke", "logger=jsonl", f"model.path={folder}", "model.name=toy", "data=dapo_math", f"data.path={data}",
        "model.gradient_checkpointing=true", "model.share_prompts=true", "model.mtp_warmup_steps=2",
        "model.mtp_warmup_batch_size=2", "data.prompts_per_step=2", "algorithm.group_size=2",
        "algorithm.num_mini_batches=1", "rollout.max_new_tokens=8", "trainer.eval_before_train=false",
        "trainer.eval_every=0", "trainer.final_eval_problems=2", "trainer.save_every=2", f"paths.cache_dir={tmp_path}/c",
        "trainer.threads=1",
    ], timeout=600)
    assert len(rows) == 2
    assert_finite(rows, ("reward/mean", "train/loss", "mtp/acceptance"))
    saved = next((tmp_path / "run").rglob("step_000002")) / "model"
    raw = json.loads((saved / "config.json").read_text())
    assert raw["model_type"] == ("mimo" if source == "mimo" else "qwen2") and raw["architectures"] == ["MiMoForCausalLM"]
    assert raw["torch_dtype"] == ("bfloat16" if source == "mimo" else "float32")
    if source == "mimo":
        assert raw["auto_map"] and (saved / "modeling_mimo.py").is_file()
    assert load_pretrained(saved).loaded_mtp_layers == [0]


def test_a_bf16_source_trained_in_float32_resumes_its_float32_weights_exactly(tmp_path):
    """The checkpoint's model folder keeps a bf16 source's dtype (what serving reads), but a run
    trains float32 weights: resume must get those back bit for bit, not their bf16 rounding."""
    from functools import partial

    from occ_exp import builders
    from occ_exp.algo.coefficient import CoefficientState
    from occ_exp.algo.regimes import get_regime
    from occ_exp.checkpoint import save_checkpoint
    from occ_exp.data.prompts import PromptStream
    from occ_exp.learner import NonFiniteGuard, build_optimizer
    from occ_exp.models.loading import load_pretrained, save_policy
    from occ_exp.rollout.base import Rollout
    from tests.fixtures.checkpoints import make_mimo_checkpoint

    src = make_mimo_checkpoint(tmp_path / "mimo")
    cfg = compose_cfg()

    def objects():
        m = load_pretrained(src, dtype=torch.float32)
        opt, sched = build_optimizer(cfg.optimizer, m.policy, get_regime("occ"))
        return m, opt, sched, [CoefficientState(None, None)], PromptStream([], 0), torch.Generator()

    m, opt, sched, coefs, prompts, gen = objects()
    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # float32 values no bf16 number equals
    state = builders.capture_state(3, m.policy, opt, sched, coefs, prompts, gen, D.Dist(), NonFiniteGuard(8), Rollout())
    ckpt = save_checkpoint(tmp_path / "run", 3, partial(save_policy, m.policy, m.tokenizer), state, "{}", 2)
    assert all(t.dtype == torch.bfloat16 for t in _tensors(ckpt / "model").values())  # the folder: source dtype
    m2, opt2, sched2, coefs2, prompts2, gen2 = objects()
    builders.resume_from(ckpt, m2.policy, opt2, sched2, coefs2, prompts2, gen2, torch.device("cpu"))
    after, before = m2.policy.state_dict(), m.policy.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
