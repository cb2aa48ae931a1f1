import math
import random
import string
import warnings
import zlib

import pytest
import torch
from pydantic import ValidationError

from zaya_rl.algorithms import (
    POLICY_LOSSES,
    aggregate,
    cispo_loss,
    compression_ratio,
    degeneracy_canary,
    dppo_tv_loss,
    group_advantages,
    gspo_loss,
    kl_penalty,
    overlong_penalty,
    ppo_clip_loss,
    select_groups,
    sft_loss,
    tis_weights,
    uniform_groups,
)
from zaya_rl.recipe import AlgorithmConfig

PPO = AlgorithmConfig(clip_low=0.2, clip_high=0.28)


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    assert torch.allclose(group_advantages(r, "grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / std, atol=1e-5)
    assert torch.allclose(group_advantages(r, "dr_grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    # RLOO: r_i - mean of the other three
    assert torch.allclose(group_advantages(r, "rloo"), torch.tensor([[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]]))
    # MaxRL: (r - mean) / mean, mean 0.5
    assert torch.allclose(group_advantages(r, "maxrl"), torch.tensor([[1.0, -1.0, -1.0, 1.0]]), atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "maxrl"])
def test_a_step_that_kept_no_group_has_empty_advantages_and_no_warning(estimator):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's std over an empty batch warns "degrees of freedom"
        advantages = group_advantages(torch.zeros(0, 8), estimator)
    assert advantages.shape == (0, 8)


def test_uniform_and_selected_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert uniform_groups(r).tolist() == [True, False, True, False, False]
    assert select_groups(r, 2).tolist() == [1, 3]
    assert select_groups(r, 5).tolist() == [1, 3, 4]  # only three qualify: the caller refills


def test_ppo_clip_by_hand():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    token_loss, stats = ppo_clip_loss(new, old, adv, mask, PPO)
    # seq 0: -(min(1.5, 1.28) + 1.0) = -2.28 ; seq 1: -(min(-0.5, -0.8)) = 0.8 (masked token ignored)
    torch.testing.assert_close(token_loss, torch.tensor([[-1.28, -1.0], [0.8, 0.0]]))
    assert math.isclose(aggregate(token_loss, mask, "seq_sum_mean").item(), (-2.28 + 0.8) / 2, rel_tol=1e-5)
    assert math.isclose(stats["clip_fraction"], 2 / 3, rel_tol=1e-5)


def test_gspo_by_hand():
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.1, 0.3], [-0.5, 9.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    token_loss, stats = gspo_loss(new, old, adv, mask, PPO)
    s0 = math.exp(0.2)  # exp of the mean log-ratio 0.2, inside [0.8, 1.28]
    # seq 1: s = exp(-0.5) = 0.607, A = -1: min(-0.607, -0.8) = -0.8, clipped
    torch.testing.assert_close(token_loss, torch.tensor([[-s0, -s0], [0.8, 0.0]]))
    assert stats["clip_fraction"] == 0.5
    aggregate(token_loss, mask, "seq_mean_token_mean").backward()
    # d/dlogp_0t of (-s0 + 0.8) / 2 = -s0 / 2 * (1/2): the mean over two tokens
    torch.testing.assert_close(new.grad, torch.tensor([[-s0 / 4, -s0 / 4], [0.0, 0.0]]))


def test_cispo_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[2.0, 0.5, 1.1]])).requires_grad_()
    adv = torch.tensor([2.0])
    mask = torch.ones(1, 3)
    token_loss, stats = cispo_loss(new, old, adv, mask, PPO)
    weight = torch.tensor([[1.28, 0.5, 1.1]])  # min(ρ, 1.28), detached
    torch.testing.assert_close(token_loss, -weight * 2.0 * new.detach())
    assert math.isclose(stats["clip_fraction"], 1 / 3, rel_tol=1e-6)
    token_loss.sum().backward()
    torch.testing.assert_close(new.grad, -2.0 * weight)  # no token leaves the gradient


def test_dppo_tv_by_hand():
    mu = torch.full((2, 2), 0.5)
    pi = torch.tensor([[0.7, 0.55], [0.3, 0.7]])
    new = torch.log(pi).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    algorithm = AlgorithmConfig(loss="dppo_tv", tis_cap=1.2, dppo_delta=0.1)
    token_loss, stats = dppo_tv_loss(new, torch.log(mu), adv, mask, algorithm)
    # A>0: 0.7 - 0.5 > 0.1 masked, 0.55 kept with weight 1.1; A<0: 0.3 - 0.5 < -0.1 masked,
    # 0.7 kept (moving the wrong way) with weight min(1.4, 1.2)
    expected = torch.tensor([[0.0, -1.1 * math.log(0.55)], [0.0, 1.2 * math.log(0.7)]])
    torch.testing.assert_close(token_loss, expected)
    assert stats["clip_fraction"] == 0.5
    token_loss.sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -1.1], [0.0, 1.2]]))


def test_all_losses_agree_on_policy():
    """At ρ = 1 and π = μ every loss has the policy gradient -A ∇log π (seq-mean of token means)."""
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "cispo", "dppo_tv"}
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.6, 0.3]]))
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expected = -adv[:, None] * mask / mask.sum(dim=1, keepdim=True) / 2
    for name, loss_fn in POLICY_LOSSES.items():
        new = old.clone().requires_grad_()
        token_loss, _ = loss_fn(new, old, adv, mask, AlgorithmConfig(loss=name, tis_cap=2.0))
        aggregate(token_loss, mask, "seq_mean_token_mean").backward()
        torch.testing.assert_close(new.grad, expected, msg=name)


def test_aggregation_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(token_loss, mask, "token_mean").item() == 2.5  # (1 + 2 + 3 + 4) / 4
    assert aggregate(token_loss, mask, "seq_mean_token_mean").item() == 3.0  # (2 + 4) / 2
    assert aggregate(token_loss, mask, "seq_sum_mean").item() == 5.0  # (6 + 4) / 2
    assert aggregate(token_loss, mask, "seq_sum_constant", constant=10).item() == 0.5
    with pytest.raises(ValueError, match="constant"):
        aggregate(token_loss, mask, "seq_sum_constant")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(token_loss, mask, "sum")


def test_tis_and_kl_by_hand():
    old, engine = torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.25, 0.3]]))
    torch.testing.assert_close(tis_weights(old, engine, cap=2.5), torch.tensor([[2.0, 2.5]]))  # 2, min(3, 2.5)

    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))  # log r = -ln 2
    ln2 = math.log(2)
    assert math.isclose(kl_penalty(lp, ref, "k1").item(), ln2, rel_tol=1e-6)
    assert math.isclose(kl_penalty(lp, ref, "k2").item(), ln2**2 / 2, rel_tol=1e-6)
    assert math.isclose(kl_penalty(lp, ref, "k3").item(), 0.5 - 1 + ln2, rel_tol=1e-6)
    for estimator in ("k1", "k2", "k3"):
        assert kl_penalty(lp, lp, estimator).item() == 0.0
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(lp, ref, "k4")


def test_sft_loss():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert math.isclose(sft_loss(lp, torch.tensor([[1.0, 0.0]])).item(), math.log(2), rel_tol=1e-6)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 8, 10, 12])
    # 0 up to 10 - 4 = 6 tokens, then -1/4 per token down to -1 at 10
    torch.testing.assert_close(overlong_penalty(lengths, max_tokens=10, buffer=4),
                               torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_tokens=10, buffer=11)


def test_degeneracy_canary():
    rng = random.Random(0)
    prose = "".join(rng.choice(string.ascii_letters + " ") for _ in range(3000))
    loop = "ab" * 1500
    assert compression_ratio(prose) > 0.5
    assert compression_ratio(loop) < 0.05
    assert compression_ratio(prose + loop) < 0.05  # the loop's own chunk gives it away
    assert len(zlib.compress((prose + loop).encode())) / 6000 > 0.3  # the whole text would not
    assert compression_ratio("") == 1.0
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    texts = [prose + loop, "the answer is 7", loop, prose]
    torch.testing.assert_close(degeneracy_canary(rewards, texts, 0.05), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="texts"):
        degeneracy_canary(rewards, texts[:3], 0.05)


def test_algorithm_config_defaults_and_errors():
    default = AlgorithmConfig()
    assert (default.loss, default.loss_aggregation, default.advantage) == ("ppo_clip", "seq_sum_mean", "grpo")
    assert default.tis_cap is None and default.kl_coef == 0.0 and default.overlong == "none"
    assert default.degeneracy_min_compression is None
    AlgorithmConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_aggregation="seq_mean_token_mean")
    AlgorithmConfig(loss_aggregation="seq_sum_constant", loss_constant=64, overlong="shape", overlong_buffer=16)
    errors = [
        (dict(loss="reinforce"), "loss"),
        (dict(loss_aggregation="seq_sum_constant"), "loss_constant is required"),
        (dict(loss_constant=64), "loss_constant is required"),
        (dict(overlong="shape"), "overlong_buffer is required"),
        (dict(overlong_buffer=8), "overlong_buffer is required"),
        (dict(loss="dppo_tv"), "dppo_tv' needs tis_cap"),
        (dict(advantage="maxrl", overlong="shape", overlong_buffer=8), "maxrl"),
        (dict(tis_cap=0.5), "greater than or equal to 1"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(degeneracy_min_compression=1.5), "less than 1"),
    ]
    for kwargs, message in errors:
        with pytest.raises(ValidationError, match=message):
            AlgorithmConfig(**kwargs)
