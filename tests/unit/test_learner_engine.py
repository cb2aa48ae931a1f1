"""The Learner's engine settings (ZeRO-3, activation checkpointing, bf16, compile) on one CPU rank."""

from __future__ import annotations

import pytest
import torch

from workers.learner import Learner, Sequence, collate, completion_logprobs, enable_activation_checkpointing, free_port
from zaya_rl.algorithms import sft_loss
from zaya_rl.models import load_model
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig

PPO = AlgorithmConfig(loss="ppo_clip", clip_low=0.2, clip_high=0.28)


def make_learner(checkpoint, **settings) -> Learner:
    return Learner(checkpoint, DeepSpeedConfig(**settings), master_port=free_port(), torch_threads=2)


def train(learner: Learner, batch: list[Sequence]) -> list[float]:
    """Losses of two SFT steps then one RL step, on-policy."""
    losses = [learner.sft_step(batch, lr=1e-2)["loss"] for _ in range(2)]
    seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage, old_logprobs=logprobs)
            for s, logprobs in zip(batch, learner.logprobs(batch))]
    return losses + [learner.rl_step(seqs, lr=1e-3, algorithm=PPO)["loss"]]


def sft_grads(learner: Learner, batch: list[Sequence]) -> tuple[float, dict[str, torch.Tensor]]:
    """The SFT loss and its gradients, no optimizer step (ZeRO-0: the gradients are whole)."""
    t = collate(batch, learner.pad_id, learner.device)
    logits = learner.engine(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False).logits
    loss = sft_loss(completion_logprobs(logits, t), t.mask)
    learner.engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in learner.engine.module.named_parameters()}
    learner.engine.zero_grad()
    return float(loss.detach()), grads


def test_settings_are_validated():
    with pytest.raises(ValueError):
        DeepSpeedConfig(zero_stage=4)
    with pytest.raises(ValueError):
        DeepSpeedConfig(bf16="sometimes")
    with pytest.raises(ValueError, match="zero_stage 3"):
        DeepSpeedConfig(zero_stage=3, compile=True)
    assert not DeepSpeedConfig().bf16 and not DeepSpeedConfig().compile  # the CPU default job's


def test_zero3_matches_zero2(checkpoint, batch):
    zero3 = make_learner(checkpoint, zero_stage=3)
    blocks = [layer.mlp for layer in zero3.engine.module.model.layers]
    assert all(getattr(block, "_z3_leaf", False) for block in blocks)  # gathered as one module
    three = train(zero3, batch)
    two = train(make_learner(checkpoint, zero_stage=2), batch)
    assert three == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert three[1] < three[0]  # it learns
    weights = zero3.state_dict()  # gathered from the partitions, under the transformers names
    assert weights.keys() == load_model(checkpoint).state_dict().keys()
    assert all(w.dtype == torch.float32 and w.numel() > 0 for w in weights.values())


def test_activation_checkpointing_same_loss_and_gradients(checkpoint, batch):
    plain = make_learner(checkpoint, zero_stage=0)
    ckpt = make_learner(checkpoint, zero_stage=0, activation_checkpointing=True)
    layer = ckpt.engine.module.model.layers[0]
    calls = []
    # A pre-hook: the recompute stops early, once the last saved tensor is recomputed, so a
    # forward hook at the layer's end would not see it.
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = sft_grads(plain, batch)
    ckpt_loss, ckpt_grads = sft_grads(ckpt, batch)
    assert len(calls) == 2  # the layer ran again in the backward pass: it was checkpointed
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7)
    assert train(ckpt, batch) == pytest.approx(train(plain, batch), rel=1e-5, abs=1e-6)


def test_activation_checkpointing_refuses_dropout(checkpoint):
    model = load_model(checkpoint)
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        enable_activation_checkpointing(model)


def test_bf16_trains_close_to_fp32(checkpoint, batch):
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_bf16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator does not support bf16 here")
    bf16 = make_learner(checkpoint, bf16=True)
    assert next(bf16.engine.module.parameters()).dtype == torch.bfloat16
    half = train(bf16, batch)
    full = train(make_learner(checkpoint), batch)
    assert half[:2] == pytest.approx(full[:2], rel=2e-2)  # bf16 rounding, same trajectory
    assert half[1] < half[0]
    assert all(w.dtype == torch.float32 for w in bf16.state_dict().values())  # what the engines load


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile is for CUDA; CPU CI has no GPU")
def test_compile_matches_eager_on_gpu(checkpoint, batch):
    compiled = train(make_learner(checkpoint, bf16=True, compile=True), batch)
    eager = train(make_learner(checkpoint, bf16=True), batch)
    assert compiled == pytest.approx(eager, rel=2e-2)
