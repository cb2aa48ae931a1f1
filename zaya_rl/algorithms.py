"""Advantages and policy losses as pure torch functions (METHODS.md §5).

Nothing here knows about Ray, DeepSpeed or engines: rewards and log-probs in, tensors
out, so every formula is unit-tested against hand-computed values.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards shaped (num_groups, group_size): one group per prompt."""
    mean = rewards.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True) + eps)
    if estimator == "dr_grpo":
        return rewards - mean
    if estimator == "rloo":
        size = rewards.shape[1]
        return (rewards - mean) * size / (size - 1)
    if estimator == "maxrl":
        return (rewards - mean) / (mean + eps)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def uniform_groups(rewards: torch.Tensor) -> torch.Tensor:
    """True for groups whose rewards are all equal: they carry no learning signal."""
    return (rewards == rewards[:, :1]).all(dim=1)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with separate bounds (DAPO), per token; summed over a sequence's tokens and
    averaged over sequences (ZAYA1's aggregation). Shapes: (batch, time); advantages (batch,).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    token_loss = -torch.minimum(unclipped, clipped) * mask
    loss = token_loss.sum(dim=1).mean()
    with torch.no_grad():
        was_clipped = ((clipped < unclipped) & mask.bool()).sum() / mask.sum().clamp(min=1)
    return loss, {"clip_fraction": float(was_clipped)}


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), summed per sequence and averaged."""
    log_ratio = ref_logprobs - logprobs
    return ((torch.exp(log_ratio) - log_ratio - 1.0) * mask).sum(dim=1).mean()


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over target tokens."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)
