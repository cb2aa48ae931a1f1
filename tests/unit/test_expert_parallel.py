"""Expert parallelism: DeepSpeed MoE at EP=1 and EP=2 computes the HF Qwen3-MoE's function.

Two processes on CPU over gloo each train-step (forward + DeepSpeed backward, ZeRO-0) on half
of one batch, once with experts replicated (ep_size=1, plain data parallel) and once with
experts sharded (ep_size=2). Loss and every gradient, expert gradients gathered across the
ranks into HF's fused layout, must match the unconverted HF model on the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from workers.learner import free_port

WORLD = 2
BATCH, TIME, VOCAB = 4, 16, 61


def tiny_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=64, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    # HF initialises the router to zero; random weights make the routing (and ties) real.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, TIME), generator=torch.Generator().manual_seed(1))


def hf_names(name: str) -> str:
    """The HF parameter name of a converted model's non-expert parameter."""
    return name.replace("mlp.moe.deepspeed_moe.gate.wg.weight", "mlp.gate.weight")


def _worker(rank: int, port: int, ckpt: str, out: str) -> None:
    import deepspeed

    from zaya_rl.expert_parallel import convert_to_deepspeed_moe, optimizer_param_groups
    from zaya_rl.models import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ids = batch().chunk(WORLD)[rank]  # equal token counts, so the mean of shard losses is the batch loss
    results = {}
    for ep_size in (1, 2):
        model = convert_to_deepspeed_moe(load_model(ckpt), ep_size, ep_rank=rank % ep_size)
        optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1})
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)  # averages dense grads over all ranks, expert grads over expert-DP ranks
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        grads = {hf_names(n): p.grad.clone() for n, p in model.named_parameters() if "deepspeed_experts" not in n}
        for index, layer in enumerate(model.model.layers):
            local = layer.mlp.local_experts
            for name, attr in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                mine = torch.stack([getattr(e, attr).weight.grad for e in local])
                if ep_size > 1:  # experts are sharded: rank r holds the r-th slice
                    parts = [torch.empty_like(mine) for _ in range(WORLD)]
                    torch.distributed.all_gather(parts, mine)
                    mine = torch.cat(parts)
                grads[f"model.layers.{index}.mlp.experts.{name}"] = mine
        results[ep_size] = {"loss": float(total) / WORLD, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes each importing DeepSpeed: 75-105 s on a shared 2-core machine
def test_ep1_and_ep2_match_hf(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters()}

    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "ckpt"), str(out)), nprocs=WORLD, join=True)
    results = torch.load(out)
    for ep_size, got in results.items():
        assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-5), ep_size
        assert got["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"ep_size={ep_size} {name}: {m}")
    # The router actually spreads tokens: every expert of every layer got gradient.
    for index in range(model.config.num_hidden_layers):
        per_expert = reference[f"model.layers.{index}.mlp.experts.down_proj"].flatten(1).norm(dim=1)
        assert (per_expert > 0).all()


def test_refuses_what_deepspeed_gates_cannot_match():
    from zaya_rl.expert_parallel import convert_to_deepspeed_moe

    model = tiny_model()
    model.config.num_experts_per_tok = 1
    with pytest.raises(ValueError, match="top-k >= 2"):
        convert_to_deepspeed_moe(model, ep_size=1)
