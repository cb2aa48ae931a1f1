import math

import torch

from zaya_rl.algorithms import group_advantages, kl_k3, ppo_clip_loss, sft_loss, uniform_groups


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    assert torch.allclose(group_advantages(r, "grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / std, atol=1e-5)
    assert torch.allclose(group_advantages(r, "dr_grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    # RLOO: r_i - mean of the other three
    assert torch.allclose(group_advantages(r, "rloo"), torch.tensor([[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]]))
    # MaxRL: (r - mean) / mean, mean 0.5
    assert torch.allclose(group_advantages(r, "maxrl"), torch.tensor([[1.0, -1.0, -1.0, 1.0]]), atol=1e-5)


def test_uniform_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert uniform_groups(r).tolist() == [True, False, True]


def test_ppo_clip_by_hand():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = ppo_clip_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # seq 0: -(min(1.5, 1.28) + 1.0) = -2.28 ; seq 1: -(min(-0.5, -0.8)) = 0.8 (masked token ignored)
    assert math.isclose(loss.item(), (-2.28 + 0.8) / 2, rel_tol=1e-5)
    assert math.isclose(stats["clip_fraction"], 2 / 3, rel_tol=1e-5)


def test_kl_and_sft_loss():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert kl_k3(lp, lp, torch.ones(1, 2)).item() == 0.0
    assert math.isclose(sft_loss(lp, torch.tensor([[1.0, 0.0]])).item(), math.log(2), rel_tol=1e-6)
