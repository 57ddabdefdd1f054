"""What a serving engine reads from a saved model folder (plumbing: both the writer, occ_exp.models.
loading, and the vLLM engine, occ_exp.rollout.vllm, need it, and neither imports the other)."""

from __future__ import annotations

from transformers import PretrainedConfig


def serving_architecture(config: PretrainedConfig) -> str:
    """The `architectures` entry that lets vLLM serve a saved folder: MiMo's (which drops the MTP
    weights from the main model and loads them into its MTP drafter) for Qwen2 trunks, the
    trunk's own class otherwise."""
    if config.model_type == "qwen2":
        return "MiMoForCausalLM"
    return (config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
