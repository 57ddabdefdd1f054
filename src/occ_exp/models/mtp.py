"""The multi-token-prediction (MTP) module in the DeepSeek-V3 / MiMo form.

One MTP layer k (k = 1..K) maps the depth k-1 hidden state at position i (the trunk's final,
normed hidden state for k = 1) and the embedding of token i+k to a hidden state from which the
shared LM head predicts token i+k+1:

    h'   = input_proj([hidden_layernorm(h^{k-1}_i) ; token_layernorm(emb(t_{i+k}))])   (2H -> H)
    h^k  = final_layernorm(DecoderBlock(h'))                                            (causal over i)
    p(t_{i+k+1}) = softmax(lm_head(h^k_i))

The parameter names are MiMo's (`model.mtp_layers.{i}.token_layernorm.weight`, ...), and the
concatenation order [hidden, embedding] is MiMo's (DeepSeek-V3 puts the embedding first), so
MiMo-7B checkpoints load into it unchanged and vLLM's MiMo MTP drafter can serve what we save.
The decoder block is transformers' own Qwen2DecoderLayer (this class subclasses it), so
`input_layernorm`, `self_attn`, `post_attention_layernorm` and `mlp` sit at the same level.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm


class MTPLayer(Qwen2DecoderLayer):
    def __init__(self, config: Qwen2Config, layer_idx: int = 0):
        cfg = copy.copy(config)
        # The MTP block runs its own causal attention with an explicit mask; sdpa handles bool
        # masks on every device, whatever attention the trunk uses.
        cfg._attn_implementation = "sdpa"
        super().__init__(cfg, layer_idx=0)
        h = config.hidden_size
        self.token_layernorm = Qwen2RMSNorm(h, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(h, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * h, h, bias=False)
        self.final_layernorm = Qwen2RMSNorm(h, eps=config.rms_norm_eps)

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


def init_mtp_from_trunk(mtp: MTPLayer, last_block: nn.Module) -> None:
    """Fresh MTP layer for a checkpoint without one: copy the trunk's last decoder block into the
    block part, identity-like projection (hidden half) so the head starts near the trunk's
    next-token predictor, unit norms."""
    mtp.load_state_dict(last_block.state_dict(), strict=False)
    with torch.no_grad():
        h = mtp.input_proj.weight.shape[0]
        w = torch.zeros_like(mtp.input_proj.weight)
        w[:, :h] = torch.eye(h, dtype=w.dtype, device=w.device)
        w[:, h:] = torch.randn_like(w[:, h:]) * (0.02 / max(1.0, (h / 128) ** 0.5))
        mtp.input_proj.weight.copy_(w)
        for norm in (mtp.token_layernorm, mtp.hidden_layernorm, mtp.final_layernorm):
            norm.weight.fill_(1.0)
