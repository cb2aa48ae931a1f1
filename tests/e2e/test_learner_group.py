"""LearnerGroup through real Ray: two DeepSpeed ranks (ZeRO-2 or ZeRO-3, gloo) equal one rank."""

from __future__ import annotations

import socket

import pytest
import torch

from workers.learner import LearnerGroup, Sequence
from zaya_rl.models import load_model, load_tokenizer
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig, LoraSettings
from zaya_rl.tasks import TaskStream

pytestmark = pytest.mark.ray

ZERO2 = DeepSpeedConfig(zero_stage=2)


def sft_once(checkpoint, batch, num_workers) -> tuple[dict, dict[str, torch.Tensor]]:
    group = LearnerGroup(num_workers, checkpoint, ZERO2)
    try:
        if num_workers > 1:
            with pytest.raises(ValueError, match="evenly"):
                group.sft_step(batch[:num_workers + 1], lr=1e-2)
        stats = group.sft_step(batch, lr=1e-2)
        return stats, group.state_dict()
    finally:
        group.shutdown()


def test_two_ranks_equal_one(ray_local, checkpoint):
    tok = load_tokenizer(checkpoint)
    # Levels 1 and 3 give the two shards different token counts: the loss scaling must cope.
    tasks = TaskStream("chain_sum", 1).take(1, 4) + TaskStream("chain_sum", 1).take(3, 4)
    batch = [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id])
             for t in tasks]

    two_stats, two = sft_once(checkpoint, batch, num_workers=2)
    one_stats, one = sft_once(checkpoint, batch, num_workers=1)

    initial = load_model(checkpoint).state_dict()
    assert two.keys() == one.keys() == initial.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in two
    # The gradient itself: same loss and same global norm (a wrong per-rank scaling shows here;
    # Adam's first step is blind to the gradient's scale).
    assert two_stats["tokens"] == one_stats["tokens"]
    assert two_stats["loss"] == pytest.approx(one_stats["loss"], rel=1e-5)
    assert two_stats["grad_norm"] == pytest.approx(one_stats["grad_norm"], rel=1e-5)
    # The weights: Adam's first update is g / (|g| + 1e-8), so the few gradient entries within
    # float noise of 1e-8 may step differently under another summation order; all others
    # must agree within 1e-5.
    diff = torch.cat([(two[k] - one[k]).flatten() for k in one]).abs()
    update = torch.cat([(one[k] - initial[k]).flatten() for k in one])
    assert (diff > 1e-5).float().mean() < 1e-4, int((diff > 1e-5).sum())
    assert diff.norm() < 1e-4 * update.norm()



def test_zero3_two_ranks_equal_zero2_one_rank(ray_local, checkpoint):
    """ZeRO-3 partitions the parameters over the ranks: every step, log-prob pass and weight
    gather needs all of them (LearnerGroup asks every rank), and the MoE blocks are leaf
    modules so that a rank whose tokens skip an expert still joins its gather. The ZeRO-3 ranks
    also accumulate each step over two length buckets."""
    tok = load_tokenizer(checkpoint)
    tasks = TaskStream("chain_sum", 2).take(1, 2) + TaskStream("chain_sum", 2).take(3, 2)
    batch = [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id],
                      advantage=1.0 if i % 2 == 0 else -1.0) for i, t in enumerate(tasks)]
    results = []
    for workers, ds in ((2, DeepSpeedConfig(zero_stage=3, length_buckets=2)), (1, ZERO2)):
        group = LearnerGroup(workers, checkpoint, ds)
        try:
            sft = group.sft_step(batch, lr=1e-2)
            seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage, old_logprobs=lp)
                    for s, lp in zip(batch, group.logprobs(batch))]
            rl = group.rl_step(seqs, lr=1e-3, algorithm=AlgorithmConfig(loss="ppo_clip", loss_aggregation="token_mean"))
            results.append((sft, rl, group.logprobs(batch), group.state_dict()))
        finally:
            group.shutdown()
    (sft3, rl3, after3, weights3), (sft2, rl2, after2, weights2) = results
    assert sft3["loss"] == pytest.approx(sft2["loss"], rel=1e-5)
    assert sft3["grad_norm"] == pytest.approx(sft2["grad_norm"], rel=1e-4)
    assert rl3["loss"] == pytest.approx(rl2["loss"], rel=1e-4, abs=1e-6)
    assert rl3["mean_abs_logprob_diff"] < 1e-5  # on-policy: the gathered forward is the same model
    for a, b in zip(after3, after2):
        assert a == pytest.approx(b, abs=1e-2)
    # As above: Adam's first steps may flip the few entries whose gradient is float noise.
    assert weights3.keys() == weights2.keys()
    diff = torch.cat([(weights3[k] - weights2[k]).flatten() for k in weights2]).abs()
    assert (diff > 1e-5).float().mean() < 1e-3, int((diff > 1e-5).sum())


def test_lora_on_two_zero3_ranks_equals_one_zero2_rank(ray_local, checkpoint, tmp_path):
    """LoRA adapters over two ZeRO-3 ranks: their gradients are reduced over the ranks, the merged
    weights gathered from the partitions, and every rank joins the adapters' gather when a run
    checkpoint's model is written; all as one ZeRO-2 rank computes them."""
    from safetensors.torch import load_file

    from zaya_rl.lora import ADAPTER_WEIGHTS

    tok = load_tokenizer(checkpoint)
    tasks = TaskStream("chain_sum", 2).take(1, 2) + TaskStream("chain_sum", 2).take(3, 2)
    batch = [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id],
                      advantage=1.0 if i % 2 == 0 else -1.0) for i, t in enumerate(tasks)]
    lora = LoraSettings(rank=4, alpha=8)
    results = []
    for workers, ds in ((2, DeepSpeedConfig(zero_stage=3, lora=lora)), (1, DeepSpeedConfig(zero_stage=2, lora=lora))):
        group = LearnerGroup(workers, checkpoint, ds)
        try:
            sft = group.sft_step(batch, lr=1e-2)
            seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage, old_logprobs=lp)
                    for s, lp in zip(batch, group.logprobs(batch))]
            rl = group.rl_step(seqs, lr=1e-2, algorithm=AlgorithmConfig(loss="ppo_clip"))
            group.save_checkpoint_model(str(tmp_path / f"{workers}"))
            results.append((sft, rl, group.state_dict(), load_file(tmp_path / f"{workers}" / ADAPTER_WEIGHTS)))
        finally:
            group.shutdown()
    (sft3, rl3, weights3, adapters3), (sft2, rl2, weights2, adapters2) = results
    assert sft3["loss"] == pytest.approx(sft2["loss"], rel=1e-5)
    assert sft3["grad_norm"] == pytest.approx(sft2["grad_norm"], rel=1e-4)
    assert rl3["mean_abs_logprob_diff"] < 1e-5 and rl3["grad_norm"] == pytest.approx(rl2["grad_norm"], rel=1e-3)
    assert weights3.keys() == weights2.keys() == load_model(checkpoint).state_dict().keys()
    for name in weights2:
        torch.testing.assert_close(weights3[name], weights2[name], atol=1e-4, rtol=0)
    assert adapters3.keys() == adapters2.keys()
    for name in adapters2:
        torch.testing.assert_close(adapters3[name], adapters2[name], atol=1e-4, rtol=0)


def test_a_taken_rendezvous_port_is_retried(ray_local, checkpoint, monkeypatch):
    """Another process may take the port rank 0's node offered before rank 0 listens on it: the
    group is started again on a fresh port, under the same actor names."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real_rendezvous, given = LearnerGroup._rendezvous, []

        def first_one_taken(group):
            address, fresh = real_rendezvous(group)
            given.append(fresh if given else port)
            return address, given[-1]

        monkeypatch.setattr(LearnerGroup, "_rendezvous", first_one_taken)
        group = LearnerGroup(1, checkpoint, ZERO2)
    try:
        assert len(given) == 2 and given[0] == port != given[1]
        assert group.sft_step(
            [Sequence([1, 2, 3], [4, 5])] * 2, lr=1e-3)["tokens"] == 4
    finally:
        group.shutdown()
