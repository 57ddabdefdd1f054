"""The rollout interface: prompts in, G samples per prompt out, with the sampler's log-probs.

Every engine (rollout=hf, rollout=vllm, ...) returns a `RolloutBatch` in the learner's layout
(left-padded prompts of width P, right-padded responses of width R), so swapping engines touches
no other file. Every engine subclasses `Rollout`, the one interface the trainer and the evaluator
use (no probing for optional methods: the defaults are no-ops). `ROLLOUTS` maps `rollout.name` to
a factory; occ_exp.rollout.build_rollout picks one. Engines read their sampling settings
(temperature, top_p, max_new_tokens) from `self.cfg` at each `generate` call, so `sampling(...)`
can change them for a while (evaluation samples at its own settings)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from omegaconf import OmegaConf

from occ_exp.distributed import pad_batch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    response_mask: torch.Tensor  # [B, R]
    logp_sampler: torch.Tensor  # [B, R] sampler's log-probs of the sampled tokens (0 where masked)
    prompt_len: int  # P
    texts: list[str]  # decoded responses (special tokens removed)
    prompt_index: torch.Tensor  # [B] which prompt each sample answers
    truncated: torch.Tensor  # [B] True where no EOS was produced within max_new_tokens
    stats: dict = field(default_factory=dict)
    # filled in by the trainer after the rollout
    rewards: torch.Tensor | None = None  # [B]
    advantages: torch.Tensor | None = None  # [B]
    logp_old: torch.Tensor | None = None  # [B, R]

    _ROWS = ("input_ids", "attention_mask", "response_mask", "logp_sampler", "prompt_index", "truncated",
             "rewards", "advantages", "logp_old")

    # the engine's counters in `stats` that add up over ranks (speculative drafts and acceptances);
    # `rollout/spec_acceptance` is their ratio, any other stat (weight version, sync time) a mean
    COUNTERS = ("rollout/spec_drafts", "rollout/spec_draft_tokens", "rollout/spec_accepted_tokens")

    @staticmethod
    def spec_acceptance(stats: dict) -> float:
        """Accepted / drafted speculative tokens."""
        return stats.get("rollout/spec_accepted_tokens", 0.0) / max(stats.get("rollout/spec_draft_tokens", 0.0), 1.0)

    @classmethod
    def merge_stats(cls, parts: list[dict]) -> dict:
        """Every rank's engine stats as one process would report them: counters summed, the
        acceptance recomputed from the sums, anything else averaged over the ranks that report it."""
        keys = sorted({k for p in parts for k in p})
        out = {}
        for k in keys:
            vals = [float(p[k]) for p in parts if k in p]
            out[k] = sum(vals) if k in cls.COUNTERS else sum(vals) / len(vals)
        if "rollout/spec_acceptance" in out:
            out["rollout/spec_acceptance"] = cls.spec_acceptance(out)
        return out

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def _replace(self, **kw) -> "RolloutBatch":
        fields = {name: getattr(self, name) for name in self._ROWS}
        fields.update(prompt_len=self.prompt_len, texts=self.texts, stats={})
        fields.update(kw)
        return RolloutBatch(**fields)

    def set_rewards(self, scores: torch.Tensor) -> None:
        """The verifier's scores (computed on the CPU) as `rewards`, on the device of the batch's
        other tensors: reward shaping, the group filter and the ranks' gather meet them there."""
        self.rewards = scores.to(self.response_mask.device)

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """Rows `idx` (e.g. one mini-batch), keeping the widths."""
        rows = {n: (getattr(self, n)[idx] if getattr(self, n) is not None else None) for n in self._ROWS}
        return self._replace(texts=[self.texts[i] for i in idx.tolist()], **rows)

    def compact(self) -> "RolloutBatch":
        """Drop columns that are padding in every row: leading prompt padding and trailing
        response padding. Results are unchanged (positions come from the attention mask). The
        tensors are contiguous copies (a compiled learner sees the same strides every time)."""
        P = self.prompt_len
        lead = int((self.attention_mask[:, :P].cumsum(-1) == 0).sum(-1).min())
        lead = min(lead, P - 1)
        R = max(int(self.response_mask.sum(-1).max()), 1)
        T = P + R
        kw = {"input_ids": self.input_ids[:, lead:T].contiguous(), "attention_mask": self.attention_mask[:, lead:T].contiguous(),
              "prompt_len": P - lead}
        for n in ("response_mask", "logp_sampler", "logp_old"):
            v = getattr(self, n)
            kw[n] = v[:, :R].contiguous() if v is not None else None
        return self._replace(**kw)

    def to(self, device) -> "RolloutBatch":
        for name in self._ROWS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.to(device))
        return self


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Rows of several batches in order, prompts left-padded and responses right-padded to the
    widest; `prompt_index` renumbered so each part's prompts follow the previous part's; the last
    part's engine stats."""
    if len(batches) == 1:
        return batches[0]
    P, R = max(b.prompt_len for b in batches), max(b.response_len for b in batches)
    parts = [pad_batch(b, P, R) for b in batches]
    offset, index = 0, []
    for b in parts:
        index.append(b.prompt_index + offset)
        offset += int(b.prompt_index.max()) + 1 if b.prompt_index.numel() else 0
    rows = {n: (torch.cat([getattr(b, n) for b in parts]) if getattr(parts[0], n) is not None else None)
            for n in RolloutBatch._ROWS if n != "prompt_index"}
    return RolloutBatch(prompt_len=P, texts=[t for b in parts for t in b.texts], stats=dict(batches[-1].stats),
                        prompt_index=torch.cat(index), **rows)


class Rollout:
    """What callers use of a rollout engine; engines subclass it and override what they need."""

    cfg: object  # the rollout config; temperature, top_p, max_new_tokens are read at each generate
    # True: generate runs the learner's own module (an FSDP2 learner gathers its weights first)
    shares_learner_weights: bool = False
    # True: the sampler's log-probs are the learner's own recomputation of logp_old (up to float
    # rounding), so algorithm.recompute_logp_old=null skips that forward (see recompute_logp_old_needed)
    exact_logprobs: bool = False

    def generate(self, prompts: list[str], n: int, *, greedy: bool = False,
                 max_new_tokens: int | None = None) -> RolloutBatch:
        """n samples for each prompt, in the learner's layout, with the sampler's log-probs."""
        raise NotImplementedError

    def sync_weights(self) -> None:
        """Make the engine sample from the learner's current weights (no-op where it shares them)."""

    def state_dict(self) -> dict:
        """What a checkpoint must carry to resume the engine exactly (e.g. its own RNG); {} if nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def close(self) -> None:
        """Release the engine's resources (processes, memory, temporary folders)."""


ROLLOUTS: dict[str, Callable[..., Rollout]] = {}


def register_rollout(name: str):
    def deco(factory):
        ROLLOUTS[name] = factory
        return factory

    return deco


@contextlib.contextmanager
def sampling(rollout, **overrides):
    """Within the block, `rollout` samples with `overrides` (e.g. temperature=0.6, max_new_tokens=...)
    on top of its config; the config is restored afterwards."""
    old = rollout.cfg
    rollout.cfg = OmegaConf.merge(old, overrides)
    try:
        yield rollout
    finally:
        rollout.cfg = old


def recompute_logp_old_needed(setting: bool | None, rollout: Rollout) -> bool:
    """`algorithm.recompute_logp_old`: true / false as set; null (the default) recomputes unless
    the engine says its sampler log-probs are the learner's own (`exact_logprobs`, e.g. rollout=hf
    at temperature 1), where a second forward would give the same numbers up to float rounding."""
    return setting if setting is not None else not rollout.exact_logprobs


def response_mask_from_tokens(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS, and rows that never produced one."""
    is_eos = tokens == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos, ~is_eos.any(-1)


def pack_sequences(prompt_ids: list[list[int]], responses: list[list[int]], logps: list[list[float]],
                   prompt_index: list[int], tokenizer, device="cpu") -> RolloutBatch:
    """The learner's layout from unpadded sequences (engines that return token lists): prompts
    left-padded to the longest, responses right-padded, the mask up to and including the first EOS."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    B, P = len(responses), max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in responses))
    ids = torch.full((B, P + R), pad, dtype=torch.long)
    attn = torch.zeros((B, P), dtype=torch.long)
    logp = torch.zeros((B, R), dtype=torch.float32)
    length = torch.zeros(B, dtype=torch.long)
    for b, (i, r, lp) in enumerate(zip(prompt_index, responses, logps)):
        p = prompt_ids[i]
        ids[b, P - len(p) : P] = torch.tensor(p)
        attn[b, P - len(p) :] = 1
        ids[b, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        logp[b, : len(r)] = torch.tensor(lp, dtype=torch.float32)
        length[b] = len(r)
    gen = ids[:, P:]  # a view: padding below lands in ids
    valid = torch.arange(R)[None] < length[:, None]
    resp_mask, truncated = response_mask_from_tokens(gen.masked_fill(~valid, -1), eos)  # pad may equal EOS
    resp_mask &= valid
    gen.masked_fill_(~resp_mask, pad)
    texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
    return RolloutBatch(
        input_ids=ids, attention_mask=torch.cat([attn, resp_mask.long()], 1), response_mask=resp_mask,
        logp_sampler=logp.masked_fill(~resp_mask, 0.0), prompt_len=P, texts=texts,
        prompt_index=torch.tensor(prompt_index, dtype=torch.long), truncated=truncated,
    ).to(device)
