"""Advantages, policy losses, loss aggregation and reward shaping as pure torch (the methods
and their papers: docs/methods.md, "Advantages and losses").

Nothing here knows about Ray, DeepSpeed or engines: rewards and log-probs in, tensors
out, so every formula is unit-tested against hand-computed values.

Token tensors are (batch, time) with `mask` 1.0 on real completion tokens; advantages are
(batch,). A policy loss returns per-token losses (0 where masked) and its stats; `aggregate`
turns per-token losses into the scalar the learner minimises. Notation: ρ = π_θ/π_old per
token, μ = the rollout engine's probability of the sampled token, sg = stop-gradient.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zaya_rl.recipe import AlgorithmConfig

# --- advantages and group selection -------------------------------------------------------


def group_advantages(rewards: torch.Tensor, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards shaped (num_groups, group_size): one group per prompt."""
    if rewards.numel() == 0:  # a step that kept no group; torch's std would warn
        return rewards.clone()
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


def select_groups(rewards: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Dynamic sampling (DAPO, arXiv 2503.14476): indices of the first `num_groups` groups
    whose rewards are not all equal. Fewer come back when fewer qualify; generating more
    groups to refill the batch is the caller's job.
    """
    return (~uniform_groups(rewards)).nonzero().flatten()[:num_groups]


# --- policy losses: (logprobs, old_logprobs, advantages, mask, algorithm) -> token losses ---


def _fraction(flags: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the real tokens for which `flags` holds."""
    return float((flags & mask.bool()).sum() / mask.sum().clamp(min=1))


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with separate bounds (DAPO): -min(ρ·A, clip(ρ, 1 - clip_low, 1 + clip_high)·A).

    clip_fraction: share of tokens where the clipped branch is the smaller one.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - algorithm.clip_low, 1.0 + algorithm.clip_high) * adv
    token_loss = -torch.minimum(unclipped, clipped) * mask
    return token_loss, {"clip_fraction": _fraction(clipped.detach() < unclipped.detach(), mask)}


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (arXiv 2507.18071): one ratio per sequence, s_i = exp(mean_t log ρ_t), and the
    sequence loss -min(s_i·A_i, clip(s_i, 1 - clip_low, 1 + clip_high)·A_i) on each of its tokens.

    Under seq_mean_token_mean this is the paper's objective (it clips at 3e-4 / 4e-4).
    clip_fraction: share of sequences where the clipped branch is the smaller one.
    """
    lengths = mask.sum(dim=1).clamp(min=1)
    seq_ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(dim=1) / lengths)
    unclipped = seq_ratio * advantages
    clipped = seq_ratio.clamp(1.0 - algorithm.clip_low, 1.0 + algorithm.clip_high) * advantages
    seq_loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped.detach() < unclipped.detach()).float().mean()
    return seq_loss[:, None] * mask, {"clip_fraction": float(was_clipped)}


def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (arXiv 2506.13585): -sg(min(ρ, 1 + clip_high))·A·log π. The importance weight is
    clipped and detached; no token leaves the gradient. clip_low is not used.

    clip_fraction: share of tokens whose weight was clipped.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = ratio.clamp(max=1.0 + algorithm.clip_high)
    token_loss = -weight * advantages[:, None] * logprobs * mask
    return token_loss, {"clip_fraction": _fraction(ratio > 1.0 + algorithm.clip_high, mask)}


def dppo_tv_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """DPPO binary-TV (arXiv 2602.04879): -A·sg(min(π/μ, tis_cap))·M·log π, where the token is
    masked (M = 0) when A > 0 and π - μ > dppo_delta, or A < 0 and π - μ < -dppo_delta: it has
    already moved that far in the direction that raises the objective.

    `old_logprobs` must be the engine's (log μ). clip_fraction: share of tokens masked.
    """
    pi = torch.exp(logprobs.detach())
    mu = torch.exp(old_logprobs)
    adv = advantages[:, None]
    delta = algorithm.dppo_delta
    outside = ((adv > 0) & (pi - mu > delta)) | ((adv < 0) & (pi - mu < -delta))
    weight = (pi / mu).clamp(max=algorithm.tis_cap)
    token_loss = -adv * weight * (~outside) * logprobs * mask
    return token_loss, {"clip_fraction": _fraction(outside, mask)}


POLICY_LOSSES = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "dppo_tv": dppo_tv_loss,
}


# --- aggregation, importance correction, KL ------------------------------------------------


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str,
              constant: float | None = None) -> torch.Tensor:
    """Per-token losses (batch, time) to one scalar.

    token_mean: Σ_it l / Σ_it m, over all tokens of the batch (DAPO).
    seq_mean_token_mean: mean_i (Σ_t l_it / Σ_t m_it) (GRPO, GSPO).
    seq_sum_mean: mean_i Σ_t l_it (ZAYA1).
    seq_sum_constant: mean_i Σ_t l_it / constant, e.g. constant = max_tokens (Dr. GRPO).
    """
    masked = token_loss * mask
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if mode == "seq_sum_mean":
        return masked.sum(dim=1).mean()
    if mode == "seq_sum_constant":
        if constant is None:
            raise ValueError("seq_sum_constant needs a constant")
        return masked.sum(dim=1).mean() / constant
    raise ValueError(f"unknown loss aggregation {mode!r}")


def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): min(π_old/μ, cap) per token, where π_old is the
    learner's probability before the update and μ the engine's. Detached: a weight, not a target.
    """
    return torch.exp(old_logprobs - engine_logprobs).clamp(max=cap).detach()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimators of KL(π || ref) on samples of π (Schulman 2020, "Approximating KL
    divergence"), with log r = log ref - log π: k1 = -log r, k2 = (log r)²/2, k3 = r - 1 - log r.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over target tokens."""
    return aggregate(-logprobs, mask, "token_mean")


# --- reward shaping -------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_tokens - buffer
    tokens, then linearly down to -1 at max_tokens (and -1 beyond).
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"overlong buffer must be in 1..{max_tokens} (max_tokens), got {buffer}")
    over = (lengths.float() - (max_tokens - buffer)).clamp(min=0)
    return -(over / buffer).clamp(max=1.0)


def compression_ratio(text: str, chunk_bytes: int = 2048) -> float:
    """zlib-compressed size over raw size of the most compressible `chunk_bytes` chunk of the
    UTF-8 text (the whole text when shorter). Repetition loops compress far below prose.
    """
    raw = text.encode()
    if not raw:
        return 1.0
    chunks = [raw[i:i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)]
    return min(len(zlib.compress(chunk)) / len(chunk) for chunk in chunks)


def degeneracy_canary(rewards: torch.Tensor, texts: list[str], min_compression: float) -> torch.Tensor:
    """ZAYA1's degeneracy canary: reward 0 for output a chunk of which compresses below
    `min_compression` (0.05 in the report). `texts` are in the order of rewards.flatten().
    """
    if len(texts) != rewards.numel():
        raise ValueError(f"{len(texts)} texts for {rewards.numel()} rewards")
    degenerate = torch.tensor([compression_ratio(t) < min_compression for t in texts])
    return rewards.masked_fill(degenerate.view_as(rewards), 0.0)
