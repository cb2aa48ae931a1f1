"""The learner: a DeepSpeed engine around the Hugging Face policy, and its Ray shell.

`Learner` is a plain class (no Ray needed) that owns one data-parallel rank: it joins the
torch.distributed group, wraps the transformers model in DeepSpeed (ZeRO 0-3, torch AdamW,
gradient clipping; fp32 by default, optionally bf16, activation checkpointing and regional
torch.compile: `DeepSpeedConfig`) and runs SFT and RL updates on batches of `Sequence`s; the RL loss,
aggregation, importance correction and KL are the recipe's `AlgorithmConfig` (algorithms.py).
The controller owns the learning-rate schedule and passes `lr` into every step.

With `DeepSpeedConfig.lora` the learner trains LoRA adapters on a frozen base (zaya_rl/lora.py):
the weights it hands out (`state_dict`, `named_weights`, `save`) are the base model's, by name
and shape, with the adapters merged in; a run checkpoint (`save_checkpoint_model`, `save_state`)
holds the adapters and their optimizer state alone.

`LearnerWorker` is the Ray actor shell around one `Learner`; `LearnerGroup` places one
worker per rank, splits each batch into equal contiguous shards and gathers the stats.

Every forward pass uses one layout: prompt + completion right-padded into (batch, time),
and the log-probs of completion token j of sequence i at [i, j] of a (batch, completion)
tensor, the layout of the engine's `old_logprobs`.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from zaya_rl import lora
from zaya_rl.deadlines import Deadlines, wait, wait_ready
from zaya_rl.models import weights_as_tensors, weights_for_transport
from zaya_rl.placement import Slot, actor_options, on_driver_node
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig, TimeoutsConfig
from zaya_rl.router_replay import replay_routing, routing_mismatch

# Files of a checkpoint directory that hold weights; everything else save() does not write
# itself (tokenizer files, chat template) is copied over from the source checkpoint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
# The KL reference's weights (under LoRA its adapters), beside DeepSpeed's state in a run checkpoint
REFERENCE_FILE = "kl_reference.safetensors"


def weight_bytes(model_path: str | Path) -> int:
    """Bytes of the weight files of a Hugging Face checkpoint directory."""
    return sum(p.stat().st_size for p in Path(model_path).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


@dataclass
class Sequence:
    """One training sequence. `completion_ids` already ends with EOS when the sample ended."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 0.0
    old_logprobs: list[float] | None = None  # the rollout engine's, one per completion token
    # The experts the engine routed each token to, (tokens, moe_layers, top_k), from the first
    # token on (the last sampled one may be missing: the engine never ran it): the learner's
    # forward passes replay them (zaya_rl/router_replay.py).
    routed_experts: np.ndarray | None = None
    # 1 on the completion tokens the policy wrote, 0 on those an environment wrote (tool outputs
    # in a multi-turn episode), one per completion token: only the policy's count in the loss and
    # the log-prob check. None: every completion token is the policy's.
    loss_mask: list[int] | None = None


@dataclass
class _Tensors:
    input_ids: torch.Tensor       # (B, T) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor       # (B, C) index into T of the logits that predict completion token j
    targets: torch.Tensor         # (B, C) completion token ids
    mask: torch.Tensor            # (B, C) 1.0 on the policy's completion tokens (loss_mask), 0 on pads
    advantages: torch.Tensor      # (B,)
    engine_logprobs: torch.Tensor | None = None  # (B, C) the sequences' old_logprobs (μ), when all have them
    routed_experts: torch.Tensor | None = None  # (B * T, layers, top_k), -1: the model's own routing


def collate(batch: list[Sequence], pad_id: int, device: torch.device) -> _Tensors:
    if not batch:
        raise ValueError("empty batch")
    for seq in batch:
        if not seq.prompt_ids or not seq.completion_ids:
            raise ValueError("every sequence needs a non-empty prompt and completion")
        if seq.loss_mask is not None and len(seq.loss_mask) != len(seq.completion_ids):
            raise ValueError(f"loss_mask has {len(seq.loss_mask)} values for {len(seq.completion_ids)} completion tokens")
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in batch)
    comp = max(len(s.completion_ids) for s in batch)
    input_ids, attention, positions, targets, mask = [], [], [], [], []
    for s in batch:
        n, c = len(s.prompt_ids) + len(s.completion_ids), len(s.completion_ids)
        input_ids.append(s.prompt_ids + s.completion_ids + [pad_id] * (width - n))
        attention.append([1] * n + [0] * (width - n))
        start = len(s.prompt_ids) - 1  # logits at position t predict token t + 1
        positions.append(list(range(start, start + c)) + [0] * (comp - c))
        targets.append(s.completion_ids + [0] * (comp - c))
        mask.append([float(m) for m in (s.loss_mask or [1] * c)] + [0.0] * (comp - c))
    long = dict(dtype=torch.long, device=device)
    return _Tensors(
        input_ids=torch.tensor(input_ids, **long),
        attention_mask=torch.tensor(attention, **long),
        positions=torch.tensor(positions, **long),
        targets=torch.tensor(targets, **long),
        mask=torch.tensor(mask, dtype=torch.float32, device=device),
        advantages=torch.tensor([s.advantage for s in batch], dtype=torch.float32, device=device),
        engine_logprobs=(None if any(s.old_logprobs is None for s in batch) else torch.tensor(
            [s.old_logprobs + [0.0] * (comp - len(s.old_logprobs)) for s in batch],
            dtype=torch.float32, device=device)),
        routed_experts=_collate_experts(batch, width, device),
    )


def masked_tokens(batch: list[Sequence]) -> int:
    """Completion tokens left out of the loss by the sequences' loss masks (environment outputs)."""
    return sum(len(s.loss_mask) - sum(s.loss_mask) for s in batch if s.loss_mask is not None)


def length_buckets(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices into `lengths` in min(parts, len(lengths)) non-empty groups that minimise the
    padded tokens Σ size · longest: a right-padded pass costs as much per pad as per real token.
    Groups are runs of the sorted lengths, shortest first; the count depends only on the sizes,
    so data-parallel ranks with equal shards run equally many passes.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    n, k = len(order), min(parts, len(order))
    # cost[j][i]: the fewest padded tokens of the i shortest in j groups; start[j][i]: where its last group starts
    cost = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    start = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                candidate = cost[j - 1][s] + (i - s) * sizes[i - 1]
                if candidate < cost[j][i]:
                    cost[j][i], start[j][i] = candidate, s
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(start[j][bounds[-1]])
    bounds.reverse()
    return [order[bounds[j]:bounds[j + 1]] for j in range(k)]


def _collate_experts(batch: list[Sequence], width: int, device: torch.device) -> torch.Tensor | None:
    """The sequences' replayed experts laid out like the input tokens, -1 where none."""
    given = [s.routed_experts for s in batch if s.routed_experts is not None]
    if not given:
        return None
    if len(given) != len(batch):
        raise ValueError("routed_experts must be given for every sequence of a batch or for none")
    out = torch.full((len(batch), width, *given[0].shape[1:]), -1, dtype=torch.long)
    for i, s in enumerate(batch):
        if len(s.routed_experts) > len(s.prompt_ids) + len(s.completion_ids):
            raise ValueError("routed_experts has more rows than the sequence has tokens")
        out[i, :len(s.routed_experts)] = torch.from_numpy(s.routed_experts.astype(np.int64))
    return out.flatten(0, 1).to(device)


def _completion_rows(logits: torch.Tensor, t: _Tensors, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature at the positions that predict the completion tokens, (B, C, V)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits.gather(1, t.positions[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature


def completion_logprobs(logits: torch.Tensor, t: _Tensors, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log-probs of each completion token under softmax(logits / temperature), (B, C)."""
    rows = _completion_rows(logits, t, temperature)
    return rows.gather(-1, t.targets[..., None]).squeeze(-1) - rows.logsumexp(-1)


@torch.no_grad()
def completion_entropy(logits: torch.Tensor, t: _Tensors, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of the policy's next-token distribution (at `temperature`) at each
    completion position, (B, C): how far from deterministic the sampled policy is."""
    log_p = _completion_rows(logits, t, temperature).log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def prepare_policy(model):
    """Sets a transformers model up exactly as the learner runs it (the KL reference too)."""
    # transformers also offers "batched_mm" (about 50x slower on CPU) and "eager"; grouped
    # GEMMs over tokens sorted by expert are as fast as eager on CPU and the fast path on GPU.
    if getattr(model.config, "num_experts", None):
        model.set_experts_implementation("grouped_mm")
    model.eval()  # no dropout: learner and engine log-probs must agree token for token
    return model


PORT_ATTEMPTS = 3  # learner groups started, each on a fresh rendezvous port, before giving up


def free_port() -> int:
    """A port no process of this machine listens on, on any of its addresses."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def engine_config(ds: DeepSpeedConfig) -> dict:
    return {
        # We feed each rank's whole shard as one padded micro-batch and step after it.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 2**31 - 1,
    }


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if getattr(model.config, "attention_dropout", 0.0) or dropout:
        raise ValueError("activation checkpointing needs a model without dropout")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers checkpoints only modules in training mode; without dropout (checked above)
    # training mode computes exactly what prepare_policy's eval mode does.
    model.train()


def compile_decoder_layers(model) -> None:
    """Regional torch.compile: the decoder layers share their code, so all reuse one layer's graphs.

    It fuses the norms, rotary and SwiGLU elementwise work that otherwise runs as many
    memory-bound kernels (benchmarks/learner_gpu.py: about 2x the step rate on an H200).
    """
    # A guard that tells layers apart compiles once per layer; past the default limit of 8 the
    # remaining layers would silently run eager: allow them all.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(model.model.layers))
    for layer in model.model.layers:
        layer.compile()


def mark_moe_leaf_modules(model) -> None:
    """ZeRO-3 gathers a module's parameters when its forward starts; an expert that receives
    no tokens on one rank is never entered there, and the ranks' all-gathers then wait on each
    other forever. As leaf modules, the sparse MoE blocks gather all their experts at once.
    """
    from deepspeed.utils import set_z3_leaf_modules

    blocks = {type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block to mark for ZeRO-3")
    set_z3_leaf_modules(model, list(blocks))


class Learner:
    """One data-parallel rank: a DeepSpeed engine over the transformers model."""

    def __init__(self, model_path: str, ds: DeepSpeedConfig, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, torch_threads: int = 1,
                 seed: int = 0):
        import deepspeed

        from zaya_rl.models import load_model

        on_gpu = torch.cuda.is_available()
        local_rank = rank % torch.cuda.device_count() if on_gpu else rank
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

        model = load_model(model_path)
        # Adapters first: checkpointing, compile and ZeRO-3 then treat their layers like the rest.
        self.lora_config = lora.lora_config(model, ds.lora, str(Path(model_path).resolve())) if ds.lora else None
        if self.lora_config is not None:
            lora.add_adapters(model, self.lora_config)
        model = prepare_policy(model)
        if ds.activation_checkpointing:
            enable_activation_checkpointing(model)
        if ds.compile:
            compile_decoder_layers(model)
        if ds.zero_stage == 3 and getattr(model.config, "num_experts", None):
            mark_moe_leaf_modules(model)
        # fused: one kernel for all parameters instead of a few per tensor (CUDA only here).
        trainable = [p for p in model.parameters() if p.requires_grad]  # under LoRA the adapters alone
        optimizer = torch.optim.AdamW(trainable, lr=0.0, weight_decay=ds.weight_decay,
                                      fused=True if on_gpu else None)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(ds))
        self.model_path = str(model_path)
        # Tokenizer and other non-weight files, kept in memory: save() writes them beside the
        # weights even after the source directory (an old run checkpoint) has been pruned.
        self.side_files = {name: Path(model_path, name).read_bytes() for name in os.listdir(model_path)
                           if Path(model_path, name).is_file() and not name.endswith(WEIGHT_SUFFIXES)}
        self.rank = rank
        self.world_size = world_size
        self.zero_stage = ds.zero_stage
        self.length_buckets = ds.length_buckets
        self.device = self.engine.device
        config = self.engine.module.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        # None for a dense model: no router logits, expert load or load-balancing loss then.
        self.top_k = getattr(config, "num_experts_per_tok", None)
        self.num_experts = getattr(config, "num_experts", None)
        # Under LoRA: the LoRA layer adapting each base weight, by the weight's name in the module.
        self.adapted = lora.adapted_weights(self.engine.module) if self.lora_config is not None else {}
        self.reference = None  # frozen policy for the KL term, made by the first rl_step using it
        self.reference_adapters = None  # under LoRA, the reference's adapters (what save_state writes)

    # --- updates --------------------------------------------------------------------------

    def sft_step(self, batch: list[Sequence], lr: float) -> dict:
        """One optimizer step of next-token NLL on the completion tokens (EOS included), over
        `length_buckets` passes. expert_load as in rl_step."""
        from zaya_rl.algorithms import sft_loss

        buckets = self._buckets(batch)
        tokens = sum(float(t.mask.sum()) for t in buckets)
        share = self._token_share(tokens)  # a mean over all ranks' tokens
        loss_sum, routed, routed_tokens = 0.0, 0.0, 0.0
        for index, t in enumerate(buckets):
            # use_cache=False everywhere: a training forward needs no KV cache, and filling one costs
            # memory and makes torch.compile build one graph per layer (benchmarks/learner_gpu.py).
            out = self._forward(t)
            loss = sft_loss(completion_logprobs(out.logits, t), t.mask) * share * float(t.mask.sum()) / tokens
            self._backward(loss, last=index == len(buckets) - 1)
            loss_sum += float(loss.detach())
            routed = routed + self._routed_counts(out, t.attention_mask)
            routed_tokens += float(t.attention_mask.sum())
        return {"loss": loss_sum, "tokens": int(tokens), "masked_tokens": masked_tokens(batch),
                "grad_norm": self._step(lr), "expert_load": (routed / routed_tokens).tolist()}

    def rl_step(self, batch: list[Sequence], lr: float, algorithm: AlgorithmConfig,
                minibatches: int = 1, temperature: float = 1.0) -> dict:
        """One optimizer step per minibatch of the algorithm's policy loss (docs/methods.md),
        each minibatch in `length_buckets` passes whose losses add up to the minibatch's.

        The old policy is the engine's (`Sequence.old_logprobs`, μ), except with `tis_cap` set
        for ppo_clip, gspo and cispo: then it is this learner's before the step (π_old), and
        each token's loss is weighted by min(π_old/μ, tis_cap). dppo_tv always compares with μ
        and caps π/μ itself. With kl_coef > 0, kl_coef · KL(π || reference) joins the loss,
        aggregated like it; the reference is the policy as it was at the first such step.
        Under token_mean each rank's loss is scaled so that the ranks' mean is the mean over
        all ranks' tokens.

        `temperature` must match the distribution old_logprobs describe: vLLM's
        "processed_logprobs" are at the sampling temperature, its "raw_logprobs" at 1.
        expert_load[layer][e] is the fraction of (non-pad) tokens routed to expert e, so a
        row sums to experts_per_token. The router's load-balancing loss (router_aux_loss) is
        added to the loss times `router_aux_loss_coef`, only reported at 0. Sequences with
        `routed_experts` are routed as the engine routed them (zaya_rl/router_replay.py);
        routing_mismatch is then the share of (token, layer) pairs whose own top-k differs.
        entropy is the policy's mean per-token entropy (nats) over the sampled tokens' positions,
        before the update: how much the sampling still explores.
        """
        from zaya_rl.algorithms import POLICY_LOSSES, aggregate, kl_penalty, tis_weights

        if not 1 <= minibatches <= len(batch):
            raise ValueError(f"minibatches must be in 1..{len(batch)}, got {minibatches}")
        for seq in batch:
            if seq.old_logprobs is None or len(seq.old_logprobs) != len(seq.completion_ids):
                raise ValueError("rl_step needs old_logprobs with one value per completion token")
        parts = [self._buckets(shard) for shard in _split(batch, minibatches)]
        use_tis = algorithm.tis_cap is not None and algorithm.loss != "dppo_tv"
        if use_tis:  # all before the first update: that is the old policy
            learner_logprobs = [[self._logprobs(t, temperature) for t in buckets] for buckets in parts]
        loss_fn = POLICY_LOSSES[algorithm.loss]
        by_tokens = algorithm.loss_aggregation == "token_mean"
        stats: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "grad_norm": [], "router_aux_loss": []}
        routed = self._routed_counts(None, None)
        routed_tokens, drift, drift_tokens, mismatch, entropy = 0.0, 0.0, 0.0, 0.0, 0.0
        for part, buckets in enumerate(parts):
            tokens = sum(float(t.mask.sum()) for t in buckets)
            sequences = sum(len(t.advantages) for t in buckets)
            share = self._token_share(tokens) if by_tokens else 1.0
            totals: defaultdict[str, float] = defaultdict(float)
            for index, t in enumerate(buckets):
                # This bucket's part of the minibatch's mean: its tokens' or its sequences'.
                weight = float(t.mask.sum()) / tokens if by_tokens else len(t.advantages) / sequences
                with replay_routing(self.engine.module, t.routed_experts):  # backward too: recomputation
                    out = self._forward(t)
                    logprobs = completion_logprobs(out.logits, t, temperature)
                    if part == 0:  # before any update: how far the engine is from the learner
                        drift += float(((logprobs.detach() - t.engine_logprobs).abs() * t.mask).sum())
                        drift_tokens += float(t.mask.sum())
                        entropy += float((completion_entropy(out.logits, t, temperature) * t.mask).sum())
                        if t.routed_experts is not None:
                            mismatch += routing_mismatch(out.router_logits, t.routed_experts) * float(t.mask.sum())
                    old = learner_logprobs[part][index] if use_tis else t.engine_logprobs
                    token_loss, info = loss_fn(logprobs, old, t.advantages, t.mask, algorithm)
                    if use_tis:
                        weights = tis_weights(old, t.engine_logprobs, algorithm.tis_cap)
                        token_loss = token_loss * weights
                        totals["tis_weight"] += float((weights * t.mask).sum()) / tokens
                    loss = aggregate(token_loss, t.mask, algorithm.loss_aggregation, algorithm.loss_constant)
                    if algorithm.kl_coef > 0:
                        kl_tokens = kl_penalty(logprobs, self._reference_logprobs(t, temperature), algorithm.kl_estimator)
                        kl = aggregate(kl_tokens, t.mask, algorithm.loss_aggregation, algorithm.loss_constant)
                        loss = loss + algorithm.kl_coef * kl
                        totals["kl"] += float(kl.detach()) * weight
                    loss = loss * weight * share
                    if algorithm.router_aux_loss_coef > 0 and self.num_experts:  # each rank's own balance; DeepSpeed averages ranks
                        loss = loss + algorithm.router_aux_loss_coef * out.aux_loss * weight
                    self._backward(loss, last=index == len(buckets) - 1)
                totals["loss"] += float(loss.detach())
                totals["clip_fraction"] += info["clip_fraction"] * float(t.mask.sum()) / tokens
                totals["router_aux_loss"] += float(out.aux_loss.detach()) * weight if self.num_experts else 0.0
                routed = routed + self._routed_counts(out, t.attention_mask)
                routed_tokens += float(t.attention_mask.sum())
            stats["grad_norm"].append(self._step(lr))
            for key, value in totals.items():
                stats.setdefault(key, []).append(value)
        return {
            **{key: _mean(values) for key, values in stats.items()},
            "tokens": int(sum(len(s.completion_ids) for s in batch)), "masked_tokens": masked_tokens(batch),
            "prompt_tokens": int(sum(len(s.prompt_ids) for s in batch)), "sequences": len(batch),
            "mean_abs_logprob_diff": drift / drift_tokens, "entropy": entropy / drift_tokens,
            **({"routing_mismatch": mismatch / drift_tokens} if batch[0].routed_experts is not None else {}),
            "expert_load": (routed / routed_tokens).tolist(),
            # What this rank's allocator holds after the step: a figure that grows step by step is a leak.
            **({"gpu_reserved_gib": torch.cuda.memory_reserved(self.device) / 2**30} if self.device.type == "cuda" else {}),
        }

    def logprobs(self, batch: list[Sequence], temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probs of each completion under the current weights."""
        rows = self._logprobs(collate(batch, self.pad_id, self.device), temperature).cpu().tolist()
        return [row[:len(s.completion_ids)] for row, s in zip(rows, batch)]

    # --- weights out ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU weights under the transformers module's parameter names (the base
        model's under LoRA, the adapters merged in).

        ZeRO 0/1/2 partition only gradients and optimizer state: after every step each rank
        holds all parameters, so any rank can answer; rank 0 is the one asked. ZeRO-3
        partitions the parameters too: every rank must call this (the gather is collective),
        and ranks other than 0 get {}.
        """
        return self._full_state_dict(wanted=self.zero_stage != 3 or self.rank == 0)

    def named_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter on this rank's device in `dtype`, one at a time, under the transformers
        module's names (what vLLM's load_weights reads); under LoRA the base model's, each
        adapted one with its update merged in. Under ZeRO-3 each is gathered (with its adapters),
        a collective: every rank iterates in step."""
        import deepspeed

        for name, param in self._base_parameters():
            layer = self.adapted.get(name)
            gathered = [param] + (lora.adapter_weights(layer) if layer is not None else [])
            with deepspeed.zero.GatheredParameters(gathered, enabled=self.zero_stage == 3):
                if layer is not None:  # a new tensor: nothing of ZeRO-3's gathered storage is kept
                    yield lora.base_name(name), lora.merged_weight(param.detach(), layer).to(dtype)
                else:
                    # A consumer may hold the tensor past this iteration (vLLM packs several into one
                    # buffer): ZeRO-3 frees a gathered parameter's storage when the gather ends.
                    yield name, param.detach().to(dtype, copy=self.zero_stage == 3)

    def weight_metadata(self, dtype: torch.dtype) -> dict:
        """Names, dtypes and shapes of `named_weights`, in its order: what an engine needs to
        receive a broadcast (NCCL) it cannot see the tensors of."""
        parameters = self._base_parameters()
        shapes = [list(p.ds_shape if self.zero_stage == 3 else p.shape) for _, p in parameters]
        names = [lora.base_name(name) for name, _ in parameters]
        return {"names": names, "dtype_names": [str(dtype).removeprefix("torch.")] * len(names), "shapes": shapes}

    def send_weights_ipc(self, engines: list, dtype: torch.dtype) -> None:
        """CUDA IPC to engines on this rank's cards (colocated, or split on a shared card): the
        engines open a handle of each weight's own storage and load from it, with no trip through
        host memory and no copy; every rank calls (handles are gathered to rank 0, which calls the
        engines). Then the allocator's cache goes back to the card, so a colocated engine can wake
        its KV cache."""
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        # Not vLLM's packed mode, which copies the weights through a fresh 1 GiB staging buffer at
        # every update: with it (vLLM 0.26) recipes/gpu.yaml ran out of memory on an H100 when the
        # engine woke its KV cache at the 31st RL step, about what a 1 GiB buffer kept per sync
        # would fill (later vLLM releases the engine's reference to it explicitly). Unpacked, the
        # engines read the parameters' own storage (ZeRO-3 and LoRA send gathered or merged copies).
        IPCWeightTransferEngine.trainer_send_weights(
            self.named_weights(dtype), {"send_mode": "ray", "llm_handle": engines, "packed": False})
        torch.cuda.empty_cache()

    def init_weight_broadcast(self, master_address: str, master_port: int, world_size: int) -> None:
        """Rank 0 opens the NCCL group it broadcasts weights in, with the engines' workers as
        ranks 1..world_size-1; it returns once all of them joined."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        if self.rank == 0:
            self.weight_group = trainer_init({"master_address": master_address, "master_port": master_port,
                                              "world_size": world_size})

    def send_weights_nccl(self, dtype: torch.dtype) -> None:
        """Rank 0 broadcasts the weights, packed into buffers, to the engines' workers (split
        placement); other ranks only take part in ZeRO-3's gathers."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        weights = self.named_weights(dtype)
        if self.rank == 0:
            NCCLWeightTransferEngine.trainer_send_weights(weights, {"group": self.weight_group, "packed": True})
        else:
            for _ in weights:
                pass

    def save(self, path: str) -> None:
        """Rank 0 writes an HF checkpoint directory (weights, config, tokenizer) atomically; under
        LoRA the merged weights, which vLLM and transformers load as the base architecture."""
        state = self.state_dict()  # under ZeRO-3 a collective: every rank calls save
        if self.rank != 0:
            return

        def fill(tmp: str) -> None:
            # Copies, not the live parameters: ZeRO makes them views into one flat buffer.
            self.engine.module.save_pretrained(tmp, state_dict=state)
            for name, data in self.side_files.items():
                if not os.path.exists(os.path.join(tmp, name)):
                    Path(tmp, name).write_bytes(data)

        self._write_directory(path, fill)

    def save_checkpoint_model(self, path: str) -> None:
        """The model part of a run checkpoint (rank 0 writes it): `save`'s HF directory, or under
        LoRA the adapters alone, in peft's format (adapter_config.json naming the base model, and
        the weights), which `PeftModel.from_pretrained` loads onto the base."""
        from safetensors.torch import save_file

        if self.lora_config is None:
            self.save(path)
            return
        state = self._adapter_state()  # under ZeRO-3 a collective
        if self.rank == 0:
            def fill(tmp: str) -> None:
                self.lora_config.save_pretrained(tmp)
                save_file(state, os.path.join(tmp, lora.ADAPTER_WEIGHTS))

            self._write_directory(path, fill)

    def save_state(self, path: str) -> None:
        """DeepSpeed's checkpoint of this rank: the trained weights (under LoRA the adapters
        alone), optimizer state and step counters; and the KL reference when there is one (its
        weights, under LoRA its adapters: every rank holds the same copy; rank 0 writes it)."""
        from safetensors.torch import save_file

        self.engine.save_checkpoint(path, tag="state", save_latest=False,
                                    exclude_frozen_parameters=self.lora_config is not None)
        if self.reference is not None and self.rank == 0:
            # Copies: tied weights share storage, which safetensors refuses to write.
            weights = self.reference_adapters if self.lora_config is not None else {
                k: v.detach().to("cpu", copy=True) for k, v in self.reference.state_dict().items()}
            save_file(weights, os.path.join(path, REFERENCE_FILE))

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments and step count: the next step starts them afresh. A new stage
        optimises another objective, whose gradients have another scale (an SFT stage's token
        mean against an rl stage's sequence sums); moments carried over would size its first
        hundreds of steps by the previous stage's gradients (beta2 = 0.999)."""
        # DeepSpeed's ZeRO optimizers wrap the torch one; under ZeRO 0 it is the torch one itself.
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        optimizer.state.clear()

    def load_state(self, path: str) -> None:
        """The state save_state wrote. A saved KL reference replaces this learner's: a resumed
        run keeps penalising the distance to the policy it started from, not to the resumed one."""
        from safetensors.torch import load_file

        # Under LoRA the checkpoint has no frozen weights: this learner's base supplies them.
        _, client_state = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False,
                                                      load_module_strict=self.lora_config is None)
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed state under {path}")
        reference = os.path.join(path, REFERENCE_FILE)
        if os.path.exists(reference):
            self._make_reference(load_file(reference))
        else:
            self.reference = self.reference_adapters = None

    # --- internals ------------------------------------------------------------------------

    def _buckets(self, batch: list[Sequence]) -> list[_Tensors]:
        """`batch` as `length_buckets` right-padded tensors of sequences of similar length."""
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in batch]
        return [collate([batch[i] for i in index], self.pad_id, self.device)
                for index in length_buckets(lengths, self.length_buckets)]

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients; DeepSpeed reduces them over ranks on the `last` pass of a step."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def _step(self, lr: float) -> float:
        """One optimizer step at `lr` on the accumulated gradients; returns their norm before clipping."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        if self.zero_stage == 0:  # grads are full and already averaged over ranks
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads))
        self.engine.step()
        if self.zero_stage > 0:  # grads are partitioned; the ZeRO optimizer reduced the norm
            grad_norm = float(self.engine.get_global_grad_norm())
        return grad_norm

    @torch.no_grad()
    def _logprobs(self, t: _Tensors, temperature: float) -> torch.Tensor:
        with replay_routing(self.engine.module, t.routed_experts):
            logits = self.engine(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False).logits
        return completion_logprobs(logits, t, temperature)

    @torch.no_grad()
    def _reference_logprobs(self, t: _Tensors, temperature: float) -> torch.Tensor:
        """Log-probs under the frozen reference, a copy of the current policy made on first use
        (under LoRA: the frozen base with a copy of the adapters)."""
        if self.reference is None:  # from memory: the source checkpoint may have been pruned
            self._make_reference()
        with replay_routing(self.reference, t.routed_experts):
            logits = self.reference(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False).logits
        return completion_logprobs(logits, t, temperature)

    def _make_reference(self, saved: dict[str, torch.Tensor] | None = None) -> None:
        """The KL reference: a frozen copy of `saved` (save_state's file) or of the policy now;
        under LoRA the frozen base with a copy of those adapters (the policy's own when None).
        Under ZeRO-3 a collective (the weights are gathered)."""
        if self.lora_config is None:
            self.reference = self._frozen_copy(saved if saved is not None else self._full_state_dict())
        else:
            self.reference_adapters = saved if saved is not None else self._adapter_state()
            self.reference = self._frozen_copy(self._full_state_dict(merged=False), self.reference_adapters)

    def _frozen_copy(self, state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor] | None = None):
        """A model of the policy's architecture holding `state`, and `adapters` on top (LoRA),
        without gradients, on this device."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.engine.module.config)
        model.load_state_dict(state)
        if adapters is not None:
            lora.add_adapters(model, self.lora_config)
            lora.load_adapter_state(model, adapters)
        return prepare_policy(model).to(self.device).requires_grad_(False)

    def _base_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The module's parameters without LoRA's adapters (those are merged into the rest on the way out)."""
        return [(n, p) for n, p in self.engine.module.named_parameters() if not lora.is_adapter_weight(n)]

    def _full_state_dict(self, wanted: bool = True, merged: bool = True) -> dict[str, torch.Tensor]:
        """fp32 CPU copies of all weights on this rank, under the base model's names: under LoRA
        with the adapters merged in, or (`merged` False) the frozen base alone. Under ZeRO-3 a
        collective gather, which a rank that does not want the copy joins and answers {}."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.zero_stage == 3):
            if not wanted:
                return {}
            state = {}
            for name, tensor in module.state_dict().items():
                if lora.is_adapter_weight(name):
                    continue
                layer = self.adapted.get(name) if merged else None
                weight = lora.merged_weight(tensor.detach(), layer) if layer is not None else tensor.detach()
                state[lora.base_name(name)] = weight.to("cpu", torch.float32, copy=True)
            return state

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copies of the LoRA adapters (peft's names); under ZeRO-3 a collective gather."""
        import deepspeed

        adapters = [p for n, p in self.engine.module.named_parameters() if lora.is_adapter_weight(n)]
        with deepspeed.zero.GatheredParameters(adapters, enabled=self.zero_stage == 3):
            return lora.adapter_state(self.engine.module)

    @staticmethod
    def _write_directory(path: str, fill) -> None:
        """A directory written whole or not at all: `fill(tmp)` writes it under a temporary
        name, which then replaces `path`."""
        path = str(path)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fill(tmp)
        if os.path.exists(path):  # a directory cannot be os.replace'd onto a non-empty one
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)

    def _token_share(self, tokens: float) -> float:
        """This rank's tokens times world_size over all ranks' tokens: scaling a token mean by
        it makes the gradient DeepSpeed averages over ranks that of the mean over all tokens.
        """
        if self.world_size == 1:
            return 1.0
        total = torch.tensor([tokens], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return tokens * self.world_size / float(total)

    def _forward(self, t: _Tensors):
        """The training forward pass; an MoE's also returns its routers' logits and aux loss."""
        moe = {"output_router_logits": True} if self.num_experts else {}
        return self.engine(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False, **moe)

    def _routed_counts(self, out, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(MoE layers, experts) counts of non-pad tokens that picked each expert in their top-k;
        zeros without a forward pass `out`; (0, 0) for a dense model."""
        if not self.num_experts:
            return torch.zeros(0, 0)
        if out is None:
            return torch.zeros(self.engine.module.config.num_hidden_layers, self.num_experts)
        weight = attention_mask.reshape(-1).float().repeat_interleave(self.top_k)
        counts = []
        for layer in out.router_logits:
            chosen = layer.detach().topk(self.top_k, dim=-1).indices.reshape(-1)
            counts.append(torch.zeros(self.num_experts, device=layer.device).scatter_add_(0, chosen, weight))
        return torch.stack(counts).cpu()


def _split(batch: list, parts: int) -> list[list]:
    """Contiguous parts whose sizes differ by at most one."""
    size, extra = divmod(len(batch), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [batch[bounds[i]:bounds[i + 1]] for i in range(parts)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- Ray -----------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class LearnerWorker:
    """Ray shell of one rank. Placed first and set up second: the group needs rank 0's address
    for the rendezvous, and a colocated engine measures its card's free memory before the
    learner fills it."""

    def device(self) -> str:
        """The UUID of the GPU Ray gave this actor, or "cpu"."""
        return str(torch.cuda.get_device_properties(0).uuid) if torch.cuda.is_available() else "cpu"

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it: where the other ranks (and engines) meet this one."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, **learner_kwargs) -> None:
        self.learner = Learner(**learner_kwargs)

    def sft_step(self, batch: list[Sequence], lr: float) -> dict:
        return self.learner.sft_step(batch, lr)

    def rl_step(self, batch: list[Sequence], lr: float, algorithm: AlgorithmConfig,
                minibatches: int = 1, temperature: float = 1.0) -> dict:
        return self.learner.rl_step(batch, lr, algorithm, minibatches, temperature)

    def logprobs(self, batch: list[Sequence], temperature: float = 1.0) -> list[list[float]]:
        return self.learner.logprobs(batch, temperature)

    def state_dict(self) -> dict[str, np.ndarray]:
        return weights_for_transport(self.learner.state_dict())

    def weight_metadata(self, dtype: torch.dtype) -> dict:
        return self.learner.weight_metadata(dtype)

    def send_weights_ipc(self, engines: list, dtype: torch.dtype) -> None:
        self.learner.send_weights_ipc(engines, dtype)

    def init_weight_broadcast(self, master_address: str, master_port: int, world_size: int) -> None:
        self.learner.init_weight_broadcast(master_address, master_port, world_size)

    def send_weights_nccl(self, dtype: torch.dtype) -> None:
        self.learner.send_weights_nccl(dtype)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def save_checkpoint_model(self, path: str) -> None:
        self.learner.save_checkpoint_model(path)

    def save_state(self, path: str) -> None:
        self.learner.save_state(path)

    def load_state(self, path: str) -> None:
        self.learner.load_state(path)

    def reset_optimizer(self) -> None:
        self.learner.reset_optimizer()


class LearnerGroup:
    """`num_workers` data-parallel ranks; each step splits the batch evenly. With a placement
    group each rank takes its `slots` entry (GPU share and bundle); without one the ranks start on
    the driver's node when it has room. The ranks meet at rank 0's node address. `start=False`
    places the ranks (their `devices` are known) and leaves `start()` for later.

    Every call waits until its deadline (`timeouts`; zaya_rl/deadlines.py) and raises `Hung`
    past it: the caller decides what to do with the group (the controller restores it from a
    checkpoint)."""

    def __init__(self, num_workers: int, model_path: str, ds: DeepSpeedConfig, torch_threads: int = 1,
                 seed: int = 0, name: str = "learner", group=None, slots: list[Slot] | None = None,
                 start: bool = True, timeouts: TimeoutsConfig = TimeoutsConfig()):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.zero_stage = ds.zero_stage
        self.name, self.group = name, group
        self.slots = slots or [Slot(None, 0.0)] * num_workers
        self.settings = dict(model_path=str(model_path), ds=ds, torch_threads=torch_threads, seed=seed)
        self.deadlines = Deadlines(timeouts, weight_bytes(model_path))
        self._place()
        if start:
            self.start()

    def _place(self) -> None:
        self.workers = [LearnerWorker.options(name=f"{self.name}-{rank}", **self._options(slot)).remote()
                        for rank, slot in enumerate(self.slots)]
        self.devices: list[str] = self._wait([w.device.remote() for w in self.workers], self.deadlines.start, "device")

    def _options(self, slot: Slot) -> dict:
        # The driver's node is one the run cannot lose anyway: stateful ranks there add no node
        # whose loss costs a checkpoint restore (docs/operations.md, "Failures and recovery").
        return actor_options(slot, self.group) if self.group is not None else on_driver_node()

    def start(self) -> None:
        """Build every rank's DeepSpeed engine; they rendezvous at rank 0's node."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # Between free_port() and rank 0 listening on it, another process (Ray's own, an
            # outgoing connection) may take the port: rank 0 then fails with EADDRINUSE.
            address, port = self._rendezvous()
            # Called together: each rank's init_distributed waits until all ranks have joined.
            setups = [w.setup.remote(rank=rank, world_size=self.num_workers, master_addr=address,
                                     master_port=port, **self.settings) for rank, w in enumerate(self.workers)]
            try:
                # Rank 0 first: the other ranks wait for it, and it may have failed.
                self._wait(setups[:1], self.deadlines.start, "setup", self.workers[:1])
                self._wait(setups[1:], self.deadlines.start, "setup", self.workers[1:])
                return
            except ray.exceptions.RayTaskError as err:
                self.shutdown()
                if "EADDRINUSE" not in str(err) or attempt == PORT_ATTEMPTS:
                    raise
                self._place()  # a process that joined a failed rendezvous cannot join another

    def _rendezvous(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there."""
        return self._wait([self.workers[0].address.remote()], self.deadlines.small, "address", self.workers[:1])[0]

    def sft_step(self, batch: list[Sequence], lr: float) -> dict:
        shards = self._shards(batch)
        return _merge(self._wait([w.sft_step.remote(s, lr) for w, s in zip(self.workers, shards)],
                                 self._train_seconds(shards), "sft_step"))

    def rl_step(self, batch: list[Sequence], lr: float, algorithm: AlgorithmConfig,
                minibatches: int = 1, temperature: float = 1.0) -> dict:
        shards = self._shards(batch)
        return _merge(self._wait([w.rl_step.remote(s, lr, algorithm, minibatches, temperature)
                                  for w, s in zip(self.workers, shards)], self._train_seconds(shards), "rl_step"))

    def logprobs(self, batch: list[Sequence], temperature: float = 1.0) -> list[list[float]]:
        return self._wait(self._rank0_calls("logprobs", batch, temperature), self._train_seconds([batch]),
                          "logprobs")[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return weights_as_tensors(ray.get(self.state_dict_ref()))

    def state_dict_ref(self) -> ray.ObjectRef:
        """Rank 0's weights (numpy arrays) as an object ref, once they are in the object store:
        rollout workers fetch them from there."""
        refs = self._rank0_calls("state_dict")
        wait_ready(refs, self.deadlines.sync(), "LearnerWorker.state_dict", self.workers)
        return refs[0]

    def send_weights_ipc(self, engines: list, dtype: torch.dtype) -> None:
        """CUDA IPC handles of every rank's weights to the engines on their cards (all ranks take part)."""
        self._wait([w.send_weights_ipc.remote(engines, dtype) for w in self.workers], self.deadlines.sync(),
                   "send_weights_ipc")

    def send_weights_nccl(self, dtype: torch.dtype) -> None:
        """Rank 0's broadcast to the engines' workers, which must be receiving (the others gather under ZeRO-3)."""
        self._wait([w.send_weights_nccl.remote(dtype) for w in self.workers], self.deadlines.sync(),
                   "send_weights_nccl")

    def save(self, path: str) -> None:
        self._wait(self._rank0_calls("save", str(path)), self.deadlines.checkpoint(), "save")

    def save_checkpoint_model(self, path: str) -> None:
        """The model part of a run checkpoint: the HF directory, or under LoRA the adapters alone."""
        self._wait(self._rank0_calls("save_checkpoint_model", str(path)), self.deadlines.checkpoint(),
                   "save_checkpoint_model")

    def save_state(self, path: str) -> None:
        """Every rank writes its own optimizer partition (one shared directory, one node)."""
        self._wait([w.save_state.remote(str(path)) for w in self.workers], self.deadlines.checkpoint(), "save_state")

    def load_state(self, path: str) -> None:
        self._wait([w.load_state.remote(str(path)) for w in self.workers], self.deadlines.checkpoint(), "load_state")

    def reset_optimizer(self) -> None:
        self._wait([w.reset_optimizer.remote() for w in self.workers], self.deadlines.small, "reset_optimizer")

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def _wait(self, refs: list[ray.ObjectRef], seconds: float, method: str, workers: list | None = None) -> list:
        """The answers of calls on `workers` (default: every rank, rank 0 first), or `Hung`."""
        return wait(refs, seconds, f"LearnerWorker.{method}", self.workers if workers is None else workers)

    def _train_seconds(self, shards: list[list[Sequence]]) -> float:
        """The deadline of a step: the largest shard's tokens (the ranks step together)."""
        return self.deadlines.train(max(sum(len(s.prompt_ids) + len(s.completion_ids) for s in shard)
                                        for shard in shards))

    def _rank0_calls(self, method: str, *args) -> list[ray.ObjectRef]:
        """Calls for a rank-0 answer, rank 0's first. Under ZeRO-3 every rank must call too: each
        holds a part of the parameters, and rank 0's forward pass or gather needs all of them."""
        workers = self.workers if self.zero_stage == 3 else self.workers[:1]
        return [getattr(w, method).remote(*args) for w in workers]

    def _shards(self, batch: list[Sequence]) -> list[list[Sequence]]:
        if len(batch) % self.num_workers:
            raise ValueError(f"batch of {len(batch)} does not split evenly over {self.num_workers} learners")
        return _split(batch, self.num_workers)


def _merge(stats: list[dict]) -> dict:
    """Rank 0's stats, with per-rank means averaged and token counts summed over ranks.

    grad_norm is already global. Losses are exact (each rank's loss is scaled so that their
    mean is the full-batch loss); the other means weigh every rank equally.
    """
    out = dict(stats[0])
    for key in ("loss", "clip_fraction", "mean_abs_logprob_diff", "entropy", "router_aux_loss", "tis_weight", "kl",
                "routing_mismatch"):
        if key in out:
            out[key] = _mean([s[key] for s in stats])
    for key in ("tokens", "masked_tokens", "prompt_tokens", "sequences"):
        if key in out:
            out[key] = sum(s[key] for s in stats)
    if "expert_load" in out:
        out["expert_load"] = torch.tensor([s["expert_load"] for s in stats]).mean(0).tolist()
    return out
