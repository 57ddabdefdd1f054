"""The policy forward: log-probs of both heads, alignment, padding invariance, causality."""

import torch
import torch.nn.functional as F

from occ_exp.models.mtp import MTPLayer


def test_logp_main_matches_hf_logits(tiny_policy):
    policy, _ = tiny_policy
    policy.eval()
    ids = torch.randint(4, policy.config.vocab_size, (2, 12))
    attn = torch.ones_like(ids)
    R = 5
    out = policy(ids, attn, R)
    logits = policy.lm(input_ids=ids, attention_mask=attn).logits
    ref = torch.log_softmax(logits[:, -R - 1 : -1].float(), -1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    assert torch.allclose(out.logp_main, ref, atol=1e-5)


def _mtp_reference(policy, ids, P):
    """Brute force for one unpadded sequence: run each depth position by position."""
    lm = policy.lm
    T = ids.shape[1]
    # depth 1 reads the residual stream before the final norm (MiMo / vLLM): the last decoder
    # layer's output, which transformers reports untied from last_hidden_state on request
    lm.config.tie_last_hidden_states = False
    out = lm.model(input_ids=ids, output_hidden_states=True)
    del lm.config.tie_last_hidden_states
    h = out.hidden_states[-1]
    assert torch.allclose(lm.model.norm(h), out.last_hidden_state)
    emb = lm.model.embed_tokens(ids)
    W = lm.get_output_embeddings().weight
    res = []
    h_prev = h
    for k, layer in enumerate(policy.mtp_layers, start=1):
        L = T - k
        pos = torch.arange(L)[None]
        rope = lm.model.rotary_emb(h_prev, pos)
        h_k = layer(h_prev[:, :L], emb[:, k : k + L], None, rope)
        # depth-k state at position i predicts token i+k+1
        lp = torch.log_softmax(F.linear(h_k, W), -1)
        tok_lp = torch.stack([lp[0, j - 1 - k, ids[0, j]] for j in range(P, T)])
        res.append(tok_lp)
        h_prev = h_k
    return res


def test_mtp_alignment_and_left_padding(tiny_policy):
    policy, _ = tiny_policy
    policy.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial final norm tells its input and output apart
        policy.lm.model.norm.weight.uniform_(0.5, 2.0)
    P, R = 7, 6
    seq = torch.randint(4, policy.config.vocab_size, (1, P + R))
    ref = _mtp_reference(policy, seq, P)
    # the same sequence in a batch, left-padded by 3 next to a full-width one
    pad = 3
    other = torch.randint(4, policy.config.vocab_size, (1, P + pad + R))
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], 1)
    ids = torch.cat([padded, other])
    attn = torch.ones_like(ids)
    attn[0, :pad] = 0
    out = policy(ids, attn, R)
    for k in range(policy.num_mtp_layers):
        assert torch.allclose(out.logp_mtp[k][0], ref[k], atol=1e-5), f"depth {k + 1} misaligned"


def test_mtp_is_causal(tiny_policy):
    """Changing response token j changes no log-prob of tokens before j, under any head."""
    policy, _ = tiny_policy
    policy.eval()
    ids = torch.randint(4, policy.config.vocab_size, (1, 14))
    attn = torch.ones_like(ids)
    R, j = 8, 5
    a = policy(ids, attn, R)
    ids2 = ids.clone()
    ids2[0, -R + j] = (ids2[0, -R + j] + 1) % policy.config.vocab_size
    b = policy(ids2, attn, R)
    assert torch.allclose(a.logp_main[0, :j], b.logp_main[0, :j])
    for k in range(policy.num_mtp_layers):
        assert torch.allclose(a.logp_mtp[k][0, :j], b.logp_mtp[k][0, :j])
        assert not torch.allclose(a.logp_mtp[k][0, j:], b.logp_mtp[k][0, j:])


def test_mtp_parameter_names_follow_mimo(tiny_policy):
    policy, _ = tiny_policy
    names = set(policy.lm.state_dict())
    for part in ("token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "input_layernorm.weight",
                 "self_attn.q_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "final_layernorm.weight"):
        for i in range(policy.num_mtp_layers):
            assert f"model.mtp_layers.{i}.{part}" in names
    assert isinstance(policy.mtp_layers[0], MTPLayer)
    assert policy.mtp_layers[0].input_proj.weight.shape == (policy.config.hidden_size, 2 * policy.config.hidden_size)
    assert policy.mtp_layers[0].input_proj.bias is None


def test_shared_prompts_give_the_same_logprobs_and_gradients(tiny_policy):
    """Rows with the same prompt (a group's samples) run it through the trunk once: the log-probs of
    both heads and every gradient are those of running each row on its own."""
    import copy

    from occ_exp.models.policy import prompt_groups
    from tests.fixtures.compare import assert_same_logps_and_grads, backward_logps

    policy, tok = tiny_policy
    torch.manual_seed(0)
    prompts = tok(["Make 12 with 5 9 8.\n", "Hi\n", "Make 100 with 10 10.\n"], return_tensors="pt", padding=True,
                  padding_side="left")
    G, R = 4, 7
    ids = torch.cat([prompts.input_ids.repeat_interleave(G, 0), torch.randint(4, 200, (3 * G, R))], 1)
    attn = torch.cat([prompts.attention_mask.repeat_interleave(G, 0), torch.ones(3 * G, R, dtype=torch.long)], 1)
    attn[1, -2:] = 0  # a response that ended early
    first, which = prompt_groups(ids[:, :-R], attn[:, :-R])
    assert sorted(first.tolist()) == [0, G, 2 * G] and torch.equal(which[first], torch.arange(3))
    assert torch.equal(which, which[::G].repeat_interleave(G))
    assert prompt_groups(ids[::G, :-R], attn[::G, :-R]) is None  # nothing shared
    results = []
    for share in (False, True):
        p = copy.deepcopy(policy)
        p.share_prompts = share
        out = p(ids, attn, R)
        results.append((out, backward_logps(p, out, attn, R)))
    assert_same_logps_and_grads(*results[0], *results[1])
