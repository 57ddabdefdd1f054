"""Real-scale switches at tiny sizes: what a first real run meets (issue 12).

Each test runs the real code path with the switches a real-scale preset turns on (gradient
checkpointing applied as the trainer applies it, shared prompts, file-backed data, MiMo-format
checkpoints, speculative decoding), replacing only the sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from occ_exp import distributed as D
from tests.conftest import compose_cfg


# -- 1. gradient checkpointing + shared prompts ---------------------------------------------------
def _group_batch(tok, G: int = 2, R: int = 6):
    """Two prompts x G rows each (a micro-batch holding G rows of one prompt), one response cut short."""
    torch.manual_seed(0)
    prompts = tok(["Make 12 with 5 9 8.\n", "Hi\n"], return_tensors="pt", padding=True, padding_side="left")
    n = prompts.input_ids.shape[0] * G
    ids = torch.cat([prompts.input_ids.repeat_interleave(G, 0), torch.randint(4, 200, (n, R))], 1)
    attn = torch.cat([prompts.attention_mask.repeat_interleave(G, 0), torch.ones(n, R, dtype=torch.long)], 1)
    attn[1, -2:] = 0
    return ids, attn, R


@pytest.mark.parametrize("detach", [False, True])
def test_checkpointing_with_shared_prompts_gives_the_gradients_without_checkpointing(tiny_policy, detach):
    """The learner's forward (detach flags as regime detach / occ use them) on a micro-batch with two
    rows of one prompt, checkpointing applied exactly as the trainer applies it: it runs, and its
    log-probs and every gradient equal those with checkpointing off (prompts shared there)."""
    policy, tok = tiny_policy
    ids, attn, R = _group_batch(tok)
    results = []
    for checkpointing in (False, True):
        p = copy.deepcopy(policy)
        D.apply_activation_checkpointing(p, checkpointing)
        p.share_prompts = True
        p.train()
        assert p.shares_prompts_now is not checkpointing  # off: the prompts really are shared
        out = p(ids, attn, R, detach_trunk=detach, detach_head=detach)
        if checkpointing:  # generation / no-grad passes in eval mode still share
            assert p.eval().shares_prompts_now
            with torch.no_grad():
                assert torch.allclose(p(ids, attn, R).logp_main, out.logp_main, atol=1e-5)
            p.train()
        mask = attn[:, -R:].float()
        ((out.logp_main * mask).sum() + sum((lp * mask).sum() for lp in out.logp_mtp)).backward()
        results.append((out, {n: q.grad for n, q in p.named_parameters() if q.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.allclose(a.logp_main, b.logp_main, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.logp_mtp, b.logp_mtp))
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-6), n
