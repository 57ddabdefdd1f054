"""A static-KV-cache decode loop for rollout=hf (`rollout.static_cache=true`, `rollout.compile=true`).

`transformers.generate` spends most of a small model's decode step outside the model: a cache
that grows by concatenation (copying it at every token), a fresh attention mask, logits
processors and stopping criteria in Python at every token. Here each distinct prompt is run once
(the G samples of a group share it) and its keys / values are copied into a preallocated cache
(`DecodeCache`, its length rounded up to a multiple of `PAD_MULTIPLE`); then each new token is
one call of `decode_step` (the model's forward on one token per row, then sampling), which
`torch.compile` turns into one fused graph. Decoding a batch is bound by reading the cache, so
each step attends only to the slots written so far, rounded up to a multiple of PAD_MULTIPLE.

Sampling: tokens are drawn from softmax(logits / temperature) (top-p as configured, by the same
rule as transformers' TopPLogitsWarper) with the Gumbel-max trick, which needs no
data-dependent control flow. The recorded log-prob of each sampled token is
log_softmax(logits / temperature) of the unmodified distribution in float32, as rollout=hf
records it, so it equals the learner's recomputation up to float rounding and
`algorithm.recompute_logp_old=false` is valid. Greedy decoding takes the argmax and records
log_softmax(logits).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

PAD_MULTIPLE = 16  # cache lengths are rounded up to this, so a few shapes cover all steps


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: keep the most likely tokens whose cumulative probability
    reaches top_p (at least one), set the rest to -inf."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def sample_tokens(logits: torch.Tensor, finished: torch.Tensor, eos_bias: torch.Tensor, *, greedy: bool,
                  temperature: float, top_p: float, eos_id: int, pad_id: int):
    """One token per row and its log-prob; rows already finished get `pad_id` and log-prob 0.
    `eos_bias` (0 or -inf, a tensor so that it does not specialise a compiled graph) is added to
    the EOS score before sampling (min_new_tokens); the recorded log-prob ignores it."""
    logits = logits.float()
    logp_all = (logits if greedy else logits / temperature).log_softmax(-1)
    scores = logp_all.clone()
    scores[:, eos_id] += eos_bias  # before top-p, as transformers orders its processors
    if not greedy and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if not greedy:  # Gumbel-max: argmax(log p - log(-log u)) ~ Categorical(p)
        u = torch.rand_like(scores)
        scores = scores - torch.log(-torch.log(u))
    tokens = scores.argmax(-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    tokens = tokens.masked_fill(finished, pad_id)
    logp = logp.masked_fill(finished, 0.0)
    return tokens, logp, finished | (tokens == eos_id)


class DecodeCache:
    """Keys / values of one decode loop, preallocated per layer as [B, heads, L, head_dim], in the
    form transformers' attention layers use a cache (`update(keys, values, layer_idx)`). The new
    token's keys / values go to slot `slot`; attention reads only the first `window` slots (the
    newest token's slot rounded up to a multiple of PAD_MULTIPLE), so early tokens do not pay for
    the whole length: decoding a batch is bound by reading the cache."""

    def __init__(self, prefix: DynamicCache, group: int, length: int):
        self.keys, self.values = [], []
        for layer in prefix.layers:
            k, v = layer.keys.repeat_interleave(group, 0), layer.values.repeat_interleave(group, 0)
            P = k.shape[2]
            self.keys.append(k.new_zeros(*k.shape[:2], length, k.shape[3]))
            self.values.append(v.new_zeros(*v.shape[:2], length, v.shape[3]))
            self.keys[-1][:, :, :P] = k
            self.values[-1][:, :, :P] = v
        self.slot: torch.Tensor | None = None
        self.window: torch.Tensor | None = None  # a [B, window] tensor: its width is the window

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        w = self.window.shape[1]
        return keys[:, :, :w], values[:, :, :w]


class StaticDecoder:
    """Prefill + fixed-shape decode steps over a preallocated cache for one causal LM (e.g. `policy.lm`).

    The model's weights are read at every call, so the learner's in-place optimiser updates are
    always seen (nothing is frozen into the compiled graph). Compiled, the decode step is traced
    once per batch size and sampling mode, with the window width symbolic."""

    def __init__(self, lm, compile: bool = False):
        self.lm = lm
        self.step = torch.compile(self.decode_step, dynamic=None) if compile else self.decode_step

    def decode_step(self, tokens, positions, key_window, cur, finished, eos_bias, cache, *, greedy, temperature,
                    top_p, eos_id, pad_id):
        """The model on one new token per row (written to cache slot `cur`, attending to the slots of
        `key_window`, [B, window] True where a key is a real token), then sampling."""
        W = key_window.shape[1]
        cache.slot, cache.window = cur.view(1), key_window
        mask = (key_window & (torch.arange(W, device=key_window.device) <= cur))[:, None, None, :]
        out = self.lm.model(input_ids=tokens[:, None], attention_mask=mask,  # 4D: used as it is
                            position_ids=positions[:, None], past_key_values=cache, use_cache=True)
        logits = self.lm.lm_head(out.last_hidden_state[:, -1])
        return sample_tokens(logits, finished, eos_bias, greedy=greedy, temperature=temperature, top_p=top_p,
                             eos_id=eos_id, pad_id=pad_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                 greedy: bool, temperature: float, top_p: float, eos_id: int, pad_id: int,
                 min_new_tokens: int = 0, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts [B, P] -> (tokens [B, max_new_tokens], log-probs [B, max_new_tokens]),
        pad / 0 after each row's EOS; the loop stops early once every row has finished.

        `group`: rows come in runs of `group` copies of one prompt (G samples per prompt); the
        prompt is then run once and its keys / values copied into each sample's cache rows."""
        B, P = input_ids.shape
        dev = input_ids.device
        if group < 1 or B % group:
            raise ValueError(f"{B} rows do not split into groups of {group} copies of a prompt")
        L = round_up(P + max_new_tokens, PAD_MULTIPLE)
        # prefill: each distinct prompt once (transformers builds the causal + padding mask)
        ids, mask = input_ids[::group], attention_mask[::group]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        prefix = DynamicCache(config=self.lm.config)
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=prefix,
                            use_cache=True)
        cache = DecodeCache(prefix, group, L + 1)  # one spare slot: a window is never the whole cache (one trace)
        logits = self.lm.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(group, 0)
        key_valid = torch.cat([attention_mask.bool(), torch.ones(B, L - P, dtype=torch.bool, device=dev)], 1)
        kw = dict(greedy=greedy, temperature=float(temperature), top_p=float(top_p), eos_id=int(eos_id),
                  pad_id=int(pad_id))
        suppress, allow = torch.tensor(float("-inf"), device=dev), torch.tensor(0.0, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        tok, lp, finished = sample_tokens(logits, finished, suppress if min_new_tokens > 0 else allow, **kw)
        tokens, logps = [tok], [lp]
        pos = positions[:, -1].repeat_interleave(group, 0) + 1
        for t in range(1, max_new_tokens):
            if bool(finished.all()):
                break
            slot = P + t - 1  # the cache slot the previous token is written to
            window = key_valid[:, : round_up(slot + 1, PAD_MULTIPLE)].contiguous()  # same strides every width
            torch._dynamo.maybe_mark_dynamic(window, 1)  # compiled: one trace for every width
            tok, lp, finished = self.step(tok, pos, window, torch.tensor(slot, device=dev), finished,
                                          suppress if t < min_new_tokens else allow, cache, **kw)
            tokens.append(tok)
            logps.append(lp)
            pos = pos + 1
        return torch.stack(tokens, 1), torch.stack(logps, 1)
