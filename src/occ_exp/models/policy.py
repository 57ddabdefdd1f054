"""Trunk + MTP heads: one forward gives logp_main and logp_mtp for every response token.

The trunk is a transformers causal LM (Qwen2 architecture: the tiny model, Qwen2.5, MiMo; or any
decoder-only model with `model.embed_tokens`, `model.layers`, `model.norm`, `model.rotary_emb`,
e.g. Llama / SmolLM2); the K MTP layers live at `lm.model.mtp_layers`, so the state dict names
them `model.mtp_layers.{i}.*` exactly as MiMo checkpoints do.

Batch layout (verl's): `input_ids` [B, P+R] is a left-padded prompt of width P followed by a
right-padded response of width R; `response_mask` [B, R] marks real response tokens.

Alignment. The main head scores response token j (absolute position P+j) from the trunk hidden
state at position P+j-1. The depth-k head scores the SAME token from its own hidden state at
position P+j-1-k (which saw the trunk state at P+j-1-k and the embeddings of tokens up to
P+j-1). So `logp_mtp[k-1][b, j]` and `logp_main[b, j]` are log-probs of one token under two heads,
which is what the policy/occ regimes and the acceptance metric compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from occ_exp.models.mtp import causal_padding_mask, mtp_layer_class_for


@dataclass
class TrunkOutput:
    hidden: torch.Tensor  # [B, T, H] trunk's last hidden state (after the final norm): the main head's input
    hidden_pre_norm: torch.Tensor  # [B, T, H] the same before the final norm: the depth-1 MTP input (MiMo)
    embeds: torch.Tensor  # [B, T, H] token embeddings
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, R] response tokens
    prompt_len: int  # P


@dataclass
class PolicyOutput:
    logp_main: torch.Tensor  # [B, R]
    logp_mtp: list[torch.Tensor]  # K x [B, R]
    logits_main: torch.Tensor  # [B, R, V] (response positions only)
    logits_mtp: list[torch.Tensor]  # K x [B, R, V]
    trunk: TrunkOutput


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows with the same (left-padded) prompt: (one row of each distinct prompt [g], the distinct
    prompt of every row [B]); None when all prompts differ."""
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    _, which = torch.unique(rows, dim=0, return_inverse=True)
    g = int(which.max()) + 1 if which.numel() else 0
    if g == rows.shape[0]:
        return None
    first = torch.full((g,), rows.shape[0], dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, which, torch.arange(rows.shape[0], device=rows.device), "amin")
    return first, which


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], computed in float32 (or the input's wider dtype)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class MTPPolicy(nn.Module):
    def __init__(self, lm: nn.Module, num_mtp_layers: int):
        super().__init__()
        self.lm = lm
        cfg = lm.config
        if not hasattr(lm.model, "mtp_layers"):
            layer_cls = mtp_layer_class_for(lm)
            lm.model.mtp_layers = nn.ModuleList([layer_cls(cfg, i) for i in range(num_mtp_layers)])
        cfg.num_nextn_predict_layers = len(lm.model.mtp_layers)
        # The final norm's input is the residual stream the MTP layers read: a hook registered once
        # catches it when `trunk_forward` asks (a hook registered per call would stop torch.compile).
        self._prenorm: dict[str, torch.Tensor | bool] = {}
        self.share_prompts = True  # see trunk_forward
        # what the checkpoint it was loaded from called itself (model_type, auto_map, dtype, ...):
        # saving writes the same identity back (occ_exp.models.loading.save_policy)
        self.source_format: dict = {}
        lm.model.norm.register_forward_hook(self._catch_prenorm)  # a bound method: copies catch for themselves

    def compile_forward(self, **kwargs) -> None:
        """torch.compile the decoder stack and the MTP layers (`model.compile`); the glue around them
        (the prompt grouping, whose shapes depend on the data) stays eager. Call it after any copy."""
        self._trunk = torch.compile(self._trunk, **kwargs)
        self.mtp_forward = torch.compile(self.mtp_forward, **kwargs)

    def _catch_prenorm(self, _module, args, _out) -> None:
        if "want" in self._prenorm:
            self._prenorm["h"] = args[0]

    # -- parameter groups ---------------------------------------------------------------------
    @property
    def config(self):
        return self.lm.config

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.lm.model.mtp_layers

    @property
    def num_mtp_layers(self) -> int:
        return len(self.mtp_layers)

    def mtp_parameters(self) -> list[nn.Parameter]:
        return list(self.mtp_layers.parameters())

    def trunk_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters shared by the RL objective and the MTP loss: everything but the MTP layers
        (embeddings, decoder layers, final norm, LM head)."""
        mtp = {id(p) for p in self.mtp_parameters()}
        return [(n, p) for n, p in self.lm.named_parameters() if id(p) not in mtp]

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trunk_named_parameters()]

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_len: int,
        *,
        detach_trunk: bool = False,
        detach_head: bool = False,
        with_mtp: bool = True,
    ) -> PolicyOutput:
        """One pass through trunk and MTP layers (see `mtp_forward` for the detach flags)."""
        trunk = self.trunk_forward(input_ids, attention_mask, response_len)
        P, T = trunk.prompt_len, input_ids.shape[1]
        logits_main = F.linear(trunk.hidden[:, P - 1 : T - 1], self.head_weight)
        logp_main = token_logprobs(logits_main, trunk.targets)
        logits_mtp, logp_mtp = self.mtp_forward(trunk, detach_trunk, detach_head) if with_mtp else ([], [])
        return PolicyOutput(logp_main, logp_mtp, logits_main, logits_mtp, trunk)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    def trunk_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> TrunkOutput:
        """The trunk's hidden states (after and before its final norm) for every position. Rows that
        share a prompt (the G samples of a group) share its computation: each distinct prompt runs
        once, and the responses attend to its keys / values (`share_prompts`; the same result, less
        work: the prompt's tokens are not repeated G times through the trunk).

        Sharing runs the prompt through transformers' KV cache, and transformers' gradient
        checkpointing drops any cache in training mode (a recomputed block would append its keys
        twice), so with checkpointing on in training every row runs its own prompt (the same
        result; `shares_prompts_now`)."""
        T = input_ids.shape[1]
        P = T - response_len
        if P < self.num_mtp_layers + 1:
            raise ValueError(f"prompt width {P} must exceed the number of MTP layers {self.num_mtp_layers}")
        embeds = self.lm.model.embed_tokens(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        share = self.share_prompts and response_len and self.shares_prompts_now
        groups = prompt_groups(input_ids[:, :P], attention_mask[:, :P]) if share else None
        if groups is None:
            hidden, pre = self._trunk(embeds, attention_mask, position_ids)
        else:
            first, which = groups
            cache = DynamicCache(config=self.lm.config)
            h_p, pre_p = self._trunk(embeds[first, :P], attention_mask[first, :P], position_ids[first, :P], cache)
            for layer in cache.layers:  # every row's copy of its prompt's keys / values
                layer.keys, layer.values = layer.keys[which], layer.values[which]
            h_r, pre_r = self._trunk(embeds[:, P:], attention_mask, position_ids[:, P:], cache)
            hidden, pre = torch.cat([h_p[which], h_r], 1), torch.cat([pre_p[which], pre_r], 1)
        return TrunkOutput(hidden, pre, embeds, position_ids, attention_mask, input_ids[:, P:], P)

    @property
    def shares_prompts_now(self) -> bool:
        """False while the trunk's decoder blocks are checkpointed in training mode (see trunk_forward)."""
        return not any(getattr(layer, "gradient_checkpointing", False) and layer.training
                       for layer in self.lm.model.layers)

    def _trunk(self, embeds, attention_mask, position_ids, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder stack on `embeds` (after the tokens in `cache`, if any): (normed, pre-norm) states."""
        self._prenorm["want"] = True
        try:
            out = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=cache is not None)
        finally:
            del self._prenorm["want"]
        return out.last_hidden_state, self._prenorm.pop("h")

    def mtp_forward(
        self, trunk: TrunkOutput, detach_trunk: bool = False, detach_head: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Depth-k logits and log-probs of the response tokens, k = 1..K.

        detach_trunk: the MTP path sees trunk hidden states and token embeddings detached.
        detach_head:  the MTP path uses the LM head's weight detached (no gradient reaches the
                      shared head from the MTP loss).
        """
        T = trunk.hidden.shape[1]
        P = trunk.prompt_len
        h_prev = trunk.hidden_pre_norm.detach() if detach_trunk else trunk.hidden_pre_norm
        emb = trunk.embeds.detach() if detach_trunk else trunk.embeds
        w = self.head_weight.detach() if detach_head else self.head_weight
        valid = trunk.attention_mask.bool()
        rotary = self.lm.model.rotary_emb
        logits_all, logp_all = [], []
        for k, layer in enumerate(self.mtp_layers, start=1):
            L = T - k  # positions 0..T-1-k hold (h^{k-1}_i, emb(t_{i+k}))
            rope = rotary(h_prev, trunk.position_ids[:, :L])
            h_k = layer(h_prev[:, :L], emb[:, k : k + L], causal_padding_mask(valid[:, :L]), rope)
            logits = F.linear(h_k[:, P - 1 - k : T - 1 - k], w)
            logits_all.append(logits)
            logp_all.append(token_logprobs(logits, trunk.targets))
            h_prev = h_k
        return logits_all, logp_all
