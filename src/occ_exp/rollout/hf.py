"""rollout=hf: sampling with the learner's own Hugging Face module, in the learner's process.

The sampler shares the learner's module, so weights are always current (sync_weights is a
no-op). Sampling is from the full distribution at `rollout.temperature` (no top-k; top-p as
configured), and the sampler's per-token log-probs are those of that distribution (float32).

Two decoders: `transformers.generate` with its dynamic KV cache (the default), or, with
`rollout.static_cache=true`, the static-cache decode loop of occ_exp.rollout.decode, whose
decode step `rollout.compile=true` compiles with torch.compile (several times faster on small
models, where generate's per-token Python work dominates)."""

from __future__ import annotations

import torch

from occ_exp.rollout.base import Rollout, RolloutBatch, register_rollout, response_mask_from_tokens
from occ_exp.rollout.decode import StaticDecoder


@register_rollout("hf")
class HFRollout(Rollout):
    shares_learner_weights = True  # generate runs the learner's module (an FSDP2 learner gathers it first)

    def __init__(self, cfg, policy, tokenizer, device):
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._static = None  # the StaticDecoder, built on first use

    def _decode(self, input_ids, attn, max_new: int, greedy: bool, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [b, R] and their sampler log-probs [b, R] for one chunk of left-padded prompts
        (in runs of `group` copies of one prompt)."""
        tok, cfg = self.tokenizer, self.cfg
        min_new = min(getattr(cfg, "min_new_tokens", 0), max_new)
        if getattr(cfg, "static_cache", False) or getattr(cfg, "compile", False):
            if self._static is None or self._static.lm is not self.policy.lm:
                self._static = StaticDecoder(self.policy.lm, compile=getattr(cfg, "compile", False))
            return self._static.generate(input_ids, attn, max_new, greedy=greedy, temperature=cfg.temperature,
                                         top_p=cfg.top_p, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                         min_new_tokens=min_new, group=group)
        out = self.policy.lm.generate(
            input_ids=input_ids,
            attention_mask=attn,
            do_sample=not greedy,
            temperature=None if greedy else cfg.temperature,
            top_p=None if greedy else cfg.top_p,
            top_k=None,
            max_new_tokens=max_new,
            min_new_tokens=min_new or None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        gen = out.sequences[:, input_ids.shape[1] :]
        # One step's [b, V] logits (raw, before temperature) at a time, each released once used:
        # stacking all steps into [b, R, V] float tensors costs a full copy per operation
        # (256 rows x 128 steps of a 49k vocabulary: ~6 GiB each).
        steps, logps = list(out.logits), []
        del out
        for i in range(len(steps)):
            step = steps[i].float()
            steps[i] = None
            if not greedy:
                step = step / cfg.temperature
            logps.append(step.log_softmax(-1).gather(-1, gen[:, i : i + 1]).squeeze(-1))
        return gen, torch.stack(logps, dim=1)

    # sync_weights and close: Rollout's no-ops (the module is the learner's own)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False, max_new_tokens: int | None = None) -> RolloutBatch:
        tok = self.tokenizer
        max_new = max_new_tokens or self.cfg.max_new_tokens
        expanded = [p for p in prompts for _ in range(n)]
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        enc = tok(expanded, return_tensors="pt", padding=True, padding_side="left")
        input_ids = enc["input_ids"].to(self.device)
        attn = enc["attention_mask"].to(self.device)
        lm = self.policy.lm
        was_training = lm.training
        lm.eval()
        chunk = self.cfg.batch_size or len(expanded)
        seqs, logps = [], []
        for s in range(0, len(expanded), chunk):
            group = n if chunk % n == 0 else 1
            gen, lp = self._decode(input_ids[s : s + chunk], attn[s : s + chunk], max_new, greedy, group)
            seqs.append(gen)
            logps.append(lp)
        if was_training:
            lm.train()
        R = max(g.shape[1] for g in seqs)
        pad = tok.pad_token_id
        gen = torch.cat([torch.nn.functional.pad(g, (0, R - g.shape[1]), value=pad) for g in seqs])
        logp = torch.cat([torch.nn.functional.pad(x, (0, R - x.shape[1])) for x in logps])
        resp_mask, truncated = response_mask_from_tokens(gen, tok.eos_token_id)
        gen = gen.masked_fill(~resp_mask, pad)
        logp = logp.masked_fill(~resp_mask, 0.0)
        texts = tok.batch_decode(gen, skip_special_tokens=True)
        return RolloutBatch(
            input_ids=torch.cat([input_ids, gen], dim=1),
            attention_mask=torch.cat([attn, resp_mask.long()], dim=1),
            response_mask=resp_mask,
            logp_sampler=logp,
            prompt_len=input_ids.shape[1],
            texts=texts,
            prompt_index=prompt_index,
            truncated=truncated,
        )
