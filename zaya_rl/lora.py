"""LoRA on the learner's policy, with peft (docs/methods.md, "LoRA").

peft injects its layers into the transformers model in place (`inject_adapter_in_model`), so
the learner still holds a plain Qwen3MoeForCausalLM: its decoder layers, routers and MoE blocks
are where the rest of the learner looks for them. A linear layer (`q_proj`) becomes a LoRA
layer around it; a Qwen3-MoE's fused expert weights (`experts.gate_up_proj`, (E, 2I, H), and
`experts.down_proj`, (E, H, I)) are nn.Parameters, which peft adapts with `target_parameters`:
one rank-r adapter per expert, added to the weight while the experts run.

Inside the model the base weights move to names with `.base_layer` in them and the adapters
appear beside them (`lora_A`, `lora_B`); everything that leaves the learner for an engine or an
HF checkpoint goes out under the base model's names and shapes, with the update merged in
(`merged_weight`), so an engine serves the base architecture and needs no LoRA support.
"""

from __future__ import annotations

import torch

from zaya_rl.recipe import LoraSettings

ADAPTER = "default"  # peft's name of the one adapter the learner trains
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: PeftModel.from_pretrained reads them


def find_targets(model: torch.nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """`targets` split into those naming linear layers and those naming weights of other modules
    (2D or 3D, such as fused experts); a target that names neither is an error."""
    linear, weights = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.rsplit(".", 1)[-1] in targets:
                linear.add(name.rsplit(".", 1)[-1])
            continue
        for weight_name, weight in module.named_parameters(recurse=False):
            if weight_name in targets and weight.dim() in (2, 3):
                weights.add(weight_name)
    if missing := [t for t in targets if t not in linear | weights]:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        others = sorted({n for m in model.modules() if not isinstance(m, torch.nn.Linear)
                         for n, w in m.named_parameters(recurse=False) if w.dim() in (2, 3)})
        raise ValueError(f"deepspeed.lora.targets: {missing} name no linear layer or 2D/3D weight of "
                         f"{type(model).__name__} (its linear layers: {layers}; its other weights: {others})")
    return sorted(linear), sorted(weights)


def lora_config(model: torch.nn.Module, settings: LoraSettings, base_path: str):
    """peft's LoraConfig of the recipe's settings on `model`, naming `base_path` as the base."""
    from peft import LoraConfig

    linear, weights = find_targets(model, settings.targets)
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=linear,
                      target_parameters=weights or None, base_model_name_or_path=base_path)


def add_adapters(model: torch.nn.Module, config) -> None:
    """Inject fresh adapters (B = 0: the model computes what it did) and freeze every other weight."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)


def adapted_weights(model: torch.nn.Module) -> dict:
    """The LoRA layer that adapts each base weight, by the weight's name in `model`."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    layers = {}
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            layers[id(module.get_param())] = module
        elif isinstance(module, LoraLayer):
            layers[id(module.get_base_layer().weight)] = module
    return {name: layers[id(w)] for name, w in model.named_parameters() if id(w) in layers}


def is_adapter_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A weight's name in the base model: peft nests the layers it wraps under `base_layer`."""
    return name.replace(".base_layer", "")


def adapter_weights(layer) -> list[torch.nn.Parameter]:
    """A LoRA layer's own A and B (not those of a wrapper it wraps: peft nests one ParamWrapper
    per adapted weight of a module)."""
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


@torch.no_grad()
def merged_weight(weight: torch.Tensor, layer) -> torch.Tensor:
    """base + scale · B·A, in the base weight's layout and dtype (a new tensor)."""
    return weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the adapters under peft's saved names (`...q_proj.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32, copy=True)
            for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`adapter_state`'s tensors into a model with the same adapters; every adapter must be given."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if is_adapter_weight(k)]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter weights do not fit the model's adapters: unexpected {result.unexpected_keys[:4]}, "
                         f"missing {missing[:4]}")
