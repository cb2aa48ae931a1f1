"""Router replay (R3, arXiv 2510.11370): the learner routes each token to the experts the
rollout engine chose for it.

Engine and learner compute the router logits in different kernels; where two experts' scores
are close, the two pick different experts, and the learner's log-prob of a sampled token is
then that of another network. Replay removes that source of mismatch: the learner takes the
engine's top-k expert indices and computes only the gating weights itself, from its own
router logits at those indices and normalised as the model normalises them, so gradients
still reach the router. The router logits are returned unchanged, so the load-balancing loss
and expert-load counts see the learner's own routing.

The engine side (capturing the indices) lives with the engine, in workers/rollout.py; this
module owns the learner side. Indices come as (tokens, moe_layers, top_k) per sequence, one
row per input token, layers in the model's order; -1 marks a token the engine did not route
(the last sampled token, padding), which keeps the model's own top-k.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class _ReplayState:
    """The indices the routers replay, (batch * time, layers, top_k), or None: route normally.

    Hooks are installed once per model and read this state, so a model that is compiled
    sees the same hooks at every step.
    """

    def __init__(self, routers: list[torch.nn.Module]):
        self.routers = routers
        self.experts: torch.Tensor | None = None


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k routers of a transformers MoE (Qwen3-MoE's `Qwen3MoeTopKRouter` and its kin,
    which return (logits, weights, indices)), in layer order."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not routers or not all(hasattr(r, "top_k") and hasattr(r, "norm_topk_prob") for r in routers):
        raise ValueError(f"{type(model).__name__} has no top-k routers that router replay supports")
    return routers


@contextmanager
def replay_routing(model: torch.nn.Module, experts: torch.Tensor | None):
    """Inside, every forward of `model` routes token i of layer l to experts[i, l] (rows
    flattened batch-major over (batch, time), as the routers see the tokens).

    Keep the backward pass inside too: activation checkpointing recomputes the routers then.
    `experts` None routes normally (and installs nothing).
    """
    if experts is None:
        yield
        return
    state = getattr(model, "_router_replay", None)
    if state is None:
        state = _ReplayState(moe_routers(model))
        for layer, router in enumerate(state.routers):
            router.register_forward_hook(lambda module, args, output, layer=layer: _replay(state, layer, module, output))
        model._router_replay = state
    if experts.dim() != 3 or experts.shape[1:] != (len(state.routers), state.routers[0].top_k):
        raise ValueError(f"replayed experts must be (tokens, {len(state.routers)} layers, "
                         f"{state.routers[0].top_k}), got {tuple(experts.shape)}")
    state.experts = experts
    try:
        yield
    finally:
        state.experts = None


def _replay(state: _ReplayState, layer: int, router: torch.nn.Module, output):
    if state.experts is None:
        return None
    logits, _, own = output
    chosen = state.experts[:, layer].to(own.device, torch.long)
    if chosen.shape != own.shape:
        raise ValueError(f"replayed experts cover {chosen.shape[0]} tokens, the batch has {own.shape[0]}")
    chosen = torch.where((chosen >= 0).all(-1, keepdim=True), chosen, own)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, chosen)
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), chosen


def routing_mismatch(router_logits: tuple[torch.Tensor, ...], experts: torch.Tensor) -> float:
    """Share of (token, layer) pairs, over the tokens `experts` routes, whose own top-k set
    (from `router_logits`, one (tokens, num_experts) tensor per layer) differs from it."""
    top_k = experts.shape[-1]
    routed = (experts >= 0).all(-1).all(-1)  # (tokens,)
    if not routed.any():
        return 0.0
    own = torch.stack([layer.detach().topk(top_k, dim=-1).indices for layer in router_logits], dim=1)
    replayed = experts.to(own.device, torch.long)
    differs = (own.sort(-1).values != replayed.sort(-1).values).any(-1)  # (tokens, layers)
    return float(differs[routed.to(own.device)].float().mean())
