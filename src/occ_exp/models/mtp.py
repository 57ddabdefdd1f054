"""The multi-token-prediction (MTP) module in the DeepSeek-V3 / MiMo form.

One MTP layer k (k = 1..K) maps the depth k-1 hidden state at position i and the embedding of
token i+k to a hidden state from which the shared LM head predicts token i+k+1:

    h'   = input_proj([hidden_layernorm(h^{k-1}_i) ; token_layernorm(emb(t_{i+k}))])   (2H -> H)
    h^k  = final_layernorm(DecoderBlock(h'))                                            (causal over i)
    p(t_{i+k+1}) = softmax(lm_head(h^k_i))

h^0 is the trunk's last hidden state BEFORE its final norm, as in MiMo: vLLM's MiMo model (the
drafter our checkpoints are served with) hands the MTP layer the residual stream and applies the
final norm only for the main head's logits. Deeper layers take the previous MTP output h^{k-1}.

The parameter names are MiMo's (`model.mtp_layers.{i}.token_layernorm.weight`, ...), and the
concatenation order [hidden, embedding] is MiMo's (DeepSeek-V3 puts the embedding first), so
MiMo-7B checkpoints load into it unchanged and vLLM's MiMo MTP drafter can serve what we save.
The decoder block is the trunk's own decoder-layer class (Qwen2DecoderLayer for Qwen2 / MiMo,
LlamaDecoderLayer for SmolLM2, ...): the MTP layer subclasses it, so `input_layernorm`,
`self_attn`, `post_attention_layernorm` and `mlp` sit at the same level as in MiMo, and a fresh
layer can copy the trunk's last block exactly.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm


class _MTPMixin:
    """The MTP parts around a decoder block; combined with a decoder-layer class by `mtp_layer_class`."""

    norm_cls: type[nn.Module]

    def __init__(self, config, layer_idx: int = 0):
        cfg = copy.copy(config)
        # The MTP block runs its own causal attention with an explicit mask; sdpa handles bool
        # masks on every device, whatever attention the trunk uses.
        cfg._attn_implementation = "sdpa"
        super().__init__(cfg, layer_idx=0)
        h = config.hidden_size
        self.token_layernorm = self.norm_cls(h, eps=config.rms_norm_eps)
        self.hidden_layernorm = self.norm_cls(h, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * h, h, bias=False)
        self.final_layernorm = self.norm_cls(h, eps=config.rms_norm_eps)

    def forward(  # type: ignore[override]
        self,
        prev_hidden: torch.Tensor,
        token_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """prev_hidden, token_embeds: [B, L, H] (already aligned: position i holds h_i and emb(t_{i+k}))."""
        x = torch.cat([self.hidden_layernorm(prev_hidden), self.token_layernorm(token_embeds)], dim=-1)
        x = self.input_proj(x)
        x = super().forward(x, attention_mask=attention_mask, position_embeddings=position_embeddings)
        if isinstance(x, tuple):  # older transformers return (hidden, ...)
            x = x[0]
        return self.final_layernorm(x)


@functools.cache
def mtp_layer_class(decoder_cls: type[nn.Module], norm_cls: type[nn.Module]) -> type[nn.Module]:
    """The MTP layer class whose decoder block is `decoder_cls` and whose norms are `norm_cls`."""
    name = "MTPLayer" if decoder_cls is Qwen2DecoderLayer else f"MTP{decoder_cls.__name__}"
    return type(name, (_MTPMixin, decoder_cls), {"norm_cls": norm_cls, "__module__": __name__})


MTPLayer = mtp_layer_class(Qwen2DecoderLayer, Qwen2RMSNorm)  # MiMo's layer (Qwen2 trunks)


def mtp_layer_class_for(lm: nn.Module) -> type[nn.Module]:
    """The MTP layer class matching a transformers causal LM's own decoder layers and norm."""
    return mtp_layer_class(type(lm.model.layers[-1]), type(lm.model.norm))


def causal_padding_mask(key_valid: torch.Tensor) -> torch.Tensor | None:
    """Boolean [B, 1, L, L] mask (True = attend) for causal attention with left padding.

    Returns None when nothing is padded (sdpa's is_causal path; not under torch.compile, where the
    data-dependent check would split the graph). A position always attends to itself, so fully
    padded rows never produce NaN.
    """
    if not torch.compiler.is_compiling() and bool(key_valid.all()):
        return None
    L = key_valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=key_valid.device).tril()
    mask = causal[None, None] & key_valid[:, None, None, :].bool()
    return mask | torch.eye(L, dtype=torch.bool, device=key_valid.device)[None, None]


@torch.no_grad()
def init_mtp_from_trunk(mtp: nn.Module, last_block: nn.Module, final_norm: nn.Module) -> None:
    """A fresh MTP layer for a checkpoint without one, starting as the trunk's own next-token
    predictor shifted by one position (a "copy" prior, far better than random: on SmolLM2 the
    depth-1 CE starts near 6.6 instead of 16 for a plain copy of the last block):

    - the block is a copy of the trunk's last decoder block with its residual branches' output
      projections (`o_proj`, `down_proj`) zeroed, so it starts as the identity and learns from there;
    - `hidden_layernorm` is 1 and the projection is the identity on the hidden half (small random on
      the embedding half), and `final_layernorm` copies the trunk's final norm, so the head's output
      starts at final_norm(h), exactly what the main head reads."""
    missing, unexpected = mtp.load_state_dict(last_block.state_dict(), strict=False)
    assert not unexpected, f"trunk block has parameters the MTP block lacks: {unexpected}"
    mtp.self_attn.o_proj.weight.zero_()
    mtp.mlp.down_proj.weight.zero_()
    for proj in (mtp.self_attn.o_proj, mtp.mlp.down_proj):
        if proj.bias is not None:
            proj.bias.zero_()
    h = mtp.input_proj.weight.shape[0]
    w = torch.zeros_like(mtp.input_proj.weight)
    w[:, :h] = torch.eye(h, dtype=w.dtype, device=w.device)
    w[:, h:] = torch.randn_like(w[:, h:]) * (0.02 / max(1.0, (h / 128) ** 0.5))
    mtp.input_proj.weight.copy_(w)
    mtp.token_layernorm.weight.fill_(1.0)
    mtp.hidden_layernorm.weight.fill_(1.0)
    mtp.final_layernorm.weight.copy_(final_norm.weight)
