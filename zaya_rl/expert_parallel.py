"""Expert parallelism: the project's Qwen3-MoE with DeepSpeed MoE layers in place of HF's.

`convert_to_deepspeed_moe(model, ep_size)` replaces every `Qwen3MoeSparseMoeBlock` of a
transformers `Qwen3MoeForCausalLM` by a `DeepSpeedMoeBlock`: DeepSpeed's `MoE` layer
(`TopKGate` router, `Experts`, the all-to-all of `MOELayer`) whose experts are sharded over
an expert-parallel group of `ep_size` ranks. Rank r of that group holds global experts
[r * E / ep_size, (r + 1) * E / ep_size), copied from HF's fused 3-D expert weights, so the
converted model computes the same function as the original at any `ep_size`.

Why DeepSpeed's own gate matches Qwen3's router here: both take softmax(x W^T) in fp32, pick
the top k, and, for k >= 2, renormalise the k weights to sum to 1 (Qwen3's
`norm_topk_prob=True`). DeepSpeed's top-1 gate does not renormalise, its top-2 gate samples
the second expert unless `top2_2nd_expert_sampling=False`, and with `drop_tokens=True` it
drops tokens past a capacity; so k = 1 and `norm_topk_prob=False` are refused, the sampling
is off, and `drop_tokens=False` sizes the capacity from the actual assignments (the max
count over the group), so no token is dropped.

Training through DeepSpeed needs the model's parameters split into MoE and non-MoE optimizer
groups (`optimizer_param_groups`), and the engine reduces expert gradients over the
expert-data-parallel group only. The converted model does not return router logits
(`output_router_logits`): the gate's balancing loss is on each block's `l_aux` instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class SwiGLUExpert(nn.Module):
    """One Qwen3 expert: down(act(gate(x)) * up(x)), gate and up fused as in HF's layout."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class DeepSpeedMoeBlock(nn.Module):
    """Drop-in for `Qwen3MoeSparseMoeBlock`: (batch, time, hidden) in and out."""

    def __init__(self, config, ep_size: int):
        from deepspeed.moe.layer import MoE

        super().__init__()
        if config.num_experts_per_tok < 2 or not config.norm_topk_prob:
            # DeepSpeed's top-1 gate and its gates without renormalisation do not exist.
            raise ValueError("DeepSpeed MoE matches Qwen3's router only for top-k >= 2 with "
                             f"norm_topk_prob=True, got k={config.num_experts_per_tok}, "
                             f"norm_topk_prob={config.norm_topk_prob}")
        if config.num_experts % ep_size:
            raise ValueError(f"{config.num_experts} experts do not split over ep_size={ep_size}")
        expert = SwiGLUExpert(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
        self.moe = MoE(hidden_size=config.hidden_size, expert=expert, num_experts=config.num_experts,
                       ep_size=ep_size, k=config.num_experts_per_tok, drop_tokens=False,
                       use_rts=False, top2_2nd_expert_sampling=False)
        self.l_aux = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, _ = self.moe(hidden_states)
        return out

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @torch.no_grad()
    def load_hf_block(self, block, ep_rank: int) -> None:
        """Copy the router and this rank's experts from an HF `Qwen3MoeSparseMoeBlock`."""
        self.moe.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
        first = ep_rank * len(self.local_experts)
        for j, expert in enumerate(self.local_experts):
            expert.gate_up.weight.copy_(block.experts.gate_up_proj[first + j])  # (2I, H)
            expert.down.weight.copy_(block.experts.down_proj[first + j])        # (H, I)


def convert_to_deepspeed_moe(model, ep_size: int, ep_rank: int = 0):
    """Replace the model's sparse MoE blocks in place; returns the model.

    `ep_rank` is this process's rank inside its expert-parallel group: with DeepSpeed's
    default layout (expert-parallel groups of consecutive ranks) it is `rank % ep_size`.
    Call before `deepspeed.initialize`, which creates the groups and hands them to the layers.
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in 0..{ep_size - 1}, got {ep_rank}")
    converted = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
            block = DeepSpeedMoeBlock(model.config, ep_size).to(layer.mlp.gate.weight.dtype)
            block.load_hf_block(layer.mlp, ep_rank)
            layer.mlp = block
            converted += 1
    if not converted:
        raise ValueError("the model has no Qwen3MoeSparseMoeBlock to convert")
    return model


def optimizer_param_groups(model, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups with expert parameters apart, as DeepSpeed's ZeRO needs for MoE."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    group = {"params": [p for p in model.parameters() if p.requires_grad], "name": "params",
             "weight_decay": weight_decay}
    return split_params_into_different_moe_groups_for_optimizer(group)
