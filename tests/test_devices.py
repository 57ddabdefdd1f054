"""Tensors that meet in one step live on one device. The GPU check found the first step on CUDA
crashing: the verifier's scores (a CPU tensor) met the rollout's response mask (on the GPU) in the
reward shaping. On this CPU-only machine the `meta` device stands in for the accelerator: torch
refuses to mix it with CPU tensors exactly as it refuses cuda:0 with CPU."""

import torch
from omegaconf import OmegaConf

from occ_exp.learner import compute_advantages, shaped_reward
from occ_exp.rollout.base import RolloutBatch


def _batch(device: str, B: int = 4, P: int = 3, R: int = 5) -> RolloutBatch:
    return RolloutBatch(input_ids=torch.zeros(B, P + R, dtype=torch.long, device=device),
                        attention_mask=torch.ones(B, P + R, dtype=torch.long, device=device),
                        response_mask=torch.ones(B, R, device=device), logp_sampler=torch.zeros(B, R, device=device),
                        prompt_len=P, texts=[""] * B, prompt_index=torch.arange(B // 2).repeat_interleave(2),
                        truncated=torch.zeros(B, dtype=torch.bool, device=device))


CFG = OmegaConf.create({"algorithm": {"advantage": "grpo", "group_size": 2, "adv_eps": 1e-6, "overlong_buffer": 2,
                                      "overlong_penalty": 1.0},
                        "reward": {"scale": "binary"}, "rollout": {"max_new_tokens": 5}})


def test_cpu_rewards_meet_an_accelerator_batch_in_the_advantages():
    batch = _batch("meta")
    compute_advantages(batch, torch.tensor([1.0, 0.0, 1.0, 1.0]), CFG)  # the verifier's scores: CPU
    assert batch.rewards.device.type == "meta" and batch.advantages.device.type == "meta"
    assert shaped_reward(batch, CFG).device.type == "meta"


def test_the_same_on_one_device_gives_the_numbers():
    batch = _batch("cpu")
    compute_advantages(batch, torch.tensor([1.0, 0.0, 1.0, 1.0]), CFG)
    assert batch.advantages[2:].abs().max() == 0 and batch.advantages[0] > 0 > batch.advantages[1]


def test_the_trainers_scores_join_the_batch_on_its_device():
    """sample_groups attaches the verifier's scores with set_rewards: the dynamic-sampling filter's
    shaped reward and the ranks' gather meet them before compute_advantages runs."""
    batch = _batch("meta")
    batch.set_rewards(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert batch.rewards.device.type == "meta" and shaped_reward(batch, CFG).device.type == "meta"
