"""The DeepSpeed learner as a plain class (one rank, no Ray) on a tiny Qwen3-MoE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.learner import Learner, Sequence, free_port, length_buckets, prepare_policy
from zaya_rl.algorithms import group_advantages
from zaya_rl.models import load_model, load_tokenizer
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig
from zaya_rl.tasks import TaskStream

PPO = AlgorithmConfig(loss="ppo_clip", clip_low=0.2, clip_high=0.28)
LOSSES = {  # each loss with the settings it needs
    "ppo_clip": PPO,
    "gspo": AlgorithmConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_aggregation="seq_mean_token_mean"),
    "cispo": AlgorithmConfig(loss="cispo", clip_high=0.28),
    "dppo_tv": AlgorithmConfig(loss="dppo_tv", tis_cap=2.0, dppo_delta=0.1),
}


@pytest.fixture(scope="module")
def config(checkpoint):
    return load_model(checkpoint).config


@pytest.fixture(scope="module")
def batch(checkpoint) -> list[Sequence]:
    tok = load_tokenizer(checkpoint)
    tasks = TaskStream("chain_sum", 1).take(1, 8)
    return [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id])
            for t in tasks]


def make_learner(checkpoint, zero_stage=2, length_buckets=1) -> Learner:
    return Learner(checkpoint, DeepSpeedConfig(zero_stage=zero_stage, length_buckets=length_buckets),
                   master_port=free_port(), torch_threads=2)


@pytest.fixture(scope="module")
def shared_learner(checkpoint) -> Learner:
    """One learner for the tests that make their batch on-policy first."""
    return make_learner(checkpoint)


def with_advantages(batch: list[Sequence], advantages: list[float]) -> list[Sequence]:
    return [Sequence(s.prompt_ids, s.completion_ids, advantage=a) for s, a in zip(batch, advantages)]


def forward_logits(model, seqs: list[Sequence]) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.completion_ids for s in seqs[:1]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_sft_memorises_a_fixed_batch(checkpoint, batch, zero_stage):
    learner = make_learner(checkpoint, zero_stage)
    losses = [learner.sft_step(batch, lr=1e-2)["loss"] for _ in range(30)]
    assert losses[-1] < 0.25 * losses[0], losses
    stats = learner.sft_step(batch, lr=1e-2)
    assert stats["tokens"] == sum(len(s.completion_ids) for s in batch)
    assert stats["grad_norm"] > 0
    load = torch.tensor(stats["expert_load"])  # top-2: each layer's fractions sum to 2
    torch.testing.assert_close(load.sum(1), torch.full((load.shape[0],), 2.0))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_reset_optimizer_steps_like_a_fresh_one(checkpoint, batch, zero_stage, tmp_path):
    """After reset_optimizer the next step is the one a new learner on the same weights takes:
    a stage begins as one started with --stage/--from does."""
    learner = make_learner(checkpoint, zero_stage)
    for _ in range(3):
        learner.sft_step(batch, lr=1e-2)
    learner.save(str(tmp_path / "weights"))
    learner.reset_optimizer()
    learner.sft_step(batch, lr=1e-3)
    fresh = make_learner(str(tmp_path / "weights"), zero_stage)
    fresh.sft_step(batch, lr=1e-3)
    for a, b in zip(learner.logprobs(batch), fresh.logprobs(batch)):
        assert a == pytest.approx(b, abs=1e-5)


def test_rl_step_on_policy_and_direction(checkpoint, config, batch):
    learner = make_learner(checkpoint)
    seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=1.0 if i % 2 == 0 else -1.0)
            for i, s in enumerate(batch)]
    for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
        assert len(logprobs) == len(seq.completion_ids)
        seq.old_logprobs = logprobs
    stats = learner.rl_step(seqs, lr=1e-3, algorithm=PPO)
    assert stats["mean_abs_logprob_diff"] < 1e-5
    assert stats["clip_fraction"] == 0.0
    assert stats["tokens"] == sum(len(s.completion_ids) for s in seqs)
    load = torch.tensor(stats["expert_load"])
    assert load.shape == (config.num_hidden_layers, config.num_experts)
    torch.testing.assert_close(load.sum(1), torch.full((config.num_hidden_layers,), 2.0))
    assert stats["router_aux_loss"] > 0

    after = learner.logprobs(seqs)
    assert sum(after[0]) > sum(seqs[0].old_logprobs)  # positive advantage: more likely
    assert sum(after[1]) < sum(seqs[1].old_logprobs)  # negative advantage: less likely

    two = learner.rl_step(seqs, lr=1e-3, algorithm=PPO, minibatches=2)
    assert two["mean_abs_logprob_diff"] > 1e-5  # the old log-probs are now one step stale
    for seq, logprobs in zip(seqs, learner.logprobs(seqs, temperature=2.0)):
        seq.old_logprobs = logprobs
    hot = learner.rl_step(seqs, lr=0.0, algorithm=PPO, temperature=2.0)
    assert hot["mean_abs_logprob_diff"] < 1e-5
    # The policy's entropy over the sampled positions: within (0, log V], and higher at a higher temperature.
    assert 0.0 < stats["entropy"] < hot["entropy"] <= math.log(config.vocab_size) + 1e-6
    with pytest.raises(ValueError, match="old_logprobs"):
        learner.rl_step(batch, lr=1e-3, algorithm=PPO)


def test_state_dict_loads_into_transformers(checkpoint, batch):
    learner = make_learner(checkpoint)
    learner.sft_step(batch, lr=1e-2)
    state = learner.state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    fresh = load_model(checkpoint)
    assert not torch.allclose(forward_logits(fresh, batch), forward_logits(learner.engine.module, batch))
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(forward_logits(fresh, batch), forward_logits(learner.engine.module, batch),
                               atol=1e-5, rtol=0)


def test_save_writes_a_loadable_checkpoint(checkpoint, batch, tmp_path):
    learner = make_learner(checkpoint)
    learner.sft_step(batch, lr=1e-2)
    path = str(tmp_path / "step-1")
    learner.save(path)
    learner.sft_step(batch, lr=1e-2)
    learner.save(path)  # overwrites in place
    assert not (tmp_path / "step-1.tmp").exists() and not (tmp_path / "step-1.old").exists()
    assert load_tokenizer(path).eos_token_id == load_tokenizer(checkpoint).eos_token_id
    torch.testing.assert_close(forward_logits(load_model(path), batch),
                               forward_logits(learner.engine.module, batch), atol=1e-5, rtol=0)


def test_bad_batches_are_rejected(checkpoint, batch):
    learner = make_learner(checkpoint)
    with pytest.raises(ValueError, match="non-empty"):
        learner.sft_step([Sequence([], [1, 2])], lr=1e-3)
    seqs = [Sequence(s.prompt_ids, s.completion_ids, old_logprobs=[0.0] * len(s.completion_ids))
            for s in batch[:2]]
    with pytest.raises(ValueError, match="minibatches"):
        learner.rl_step(seqs, lr=1e-3, algorithm=PPO, minibatches=3)


def test_tokens_an_environment_wrote_count_in_neither_the_loss_nor_the_logprob_check(shared_learner, batch):
    """A multi-turn episode's tool outputs (loss_mask 0) carry 0.0 where an engine log-prob would
    be; the learner must leave them out of the loss and of mean_abs_logprob_diff. lr 0: the
    weights stay as they are, so every step below sees the same policy."""
    learner = shared_learner
    masks = [[0 if len(s.completion_ids) // 3 <= j < 2 * len(s.completion_ids) // 3 else 1
              for j in range(len(s.completion_ids))] for s in batch]
    true = learner.logprobs(batch)

    def episodes(masked_value: float, with_mask: bool = True) -> list[Sequence]:
        return [Sequence(s.prompt_ids, s.completion_ids, advantage=(-1.0) ** i,
                         old_logprobs=[lp if m else masked_value for lp, m in zip(logprobs, mask)],
                         loss_mask=mask if with_mask else None)
                for i, (s, logprobs, mask) in enumerate(zip(batch, true, masks))]

    zeros = learner.rl_step(episodes(0.0), lr=0.0, algorithm=PPO)
    garbage = learner.rl_step(episodes(-30.0), lr=0.0, algorithm=PPO)
    assert zeros["mean_abs_logprob_diff"] < 1e-5 and zeros["loss"] == garbage["loss"]
    assert zeros["mean_abs_logprob_diff"] == garbage["mean_abs_logprob_diff"]
    assert zeros["masked_tokens"] == sum(m.count(0) for m in masks) > 0
    unmasked = learner.rl_step(episodes(0.0, with_mask=False), lr=0.0, algorithm=PPO)
    assert unmasked["mean_abs_logprob_diff"] > 0.1 and unmasked["masked_tokens"] == 0  # what the mask keeps out

    # SFT on a demonstration: the loss is the mean NLL of the policy's tokens only.
    sft = learner.sft_step(episodes(0.0), lr=0.0)
    policy = [lp for logprobs, mask in zip(true, masks) for lp, m in zip(logprobs, mask) if m]
    assert sft["loss"] == pytest.approx(-sum(policy) / len(policy), rel=1e-5)
    assert sft["tokens"] == len(policy) and sft["masked_tokens"] == zeros["masked_tokens"]
    with pytest.raises(ValueError, match="loss_mask has 1 values"):
        learner.sft_step([Sequence(batch[0].prompt_ids, batch[0].completion_ids, loss_mask=[1])], lr=0.0)


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_moves_toward_the_advantage(shared_learner, batch, name):
    learner = shared_learner
    seqs = with_advantages(batch[:4], [1.0, -1.0, 1.0, -1.0])
    for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
        seq.old_logprobs = logprobs
    stats = learner.rl_step(seqs, lr=1e-3, algorithm=LOSSES[name])
    assert stats["clip_fraction"] == 0.0 and stats["grad_norm"] > 0  # on-policy: nothing clipped
    after = learner.logprobs(seqs)
    gains = [sum(a) - sum(s.old_logprobs) for a, s in zip(after, seqs)]
    assert gains[0] > 0 and gains[1] < 0 and gains[2] > 0 and gains[3] < 0, gains
    if name in ("ppo_clip", "gspo"):  # surrogates: their value at the new weights is lower
        again = learner.rl_step(seqs, lr=0.0, algorithm=LOSSES[name])
        assert again["loss"] < stats["loss"], (stats["loss"], again["loss"])


def test_tis_and_kl_to_the_reference(checkpoint, batch):
    learner = make_learner(checkpoint)
    seqs = with_advantages(batch[:4], [1.0, -1.0, 1.0, -1.0])
    for i, (seq, logprobs) in enumerate(zip(seqs, learner.logprobs(seqs))):
        seq.old_logprobs = [lp - math.log(4.0) if i == 0 else lp for lp in logprobs]  # engine off on seq 0
    algorithm = AlgorithmConfig(tis_cap=2.0, kl_coef=0.1, kl_estimator="k3", loss_aggregation="token_mean")
    assert learner.reference is None
    first = learner.rl_step(seqs, lr=1e-3, algorithm=algorithm, minibatches=2)
    assert learner.reference is not None and first["kl"] > 0.0  # minibatch 1 follows an update
    tokens = [len(s.completion_ids) for s in seqs]
    # seq 0's weight min(4, 2) = 2, the others 1: the old policy is the learner's before the
    # step, also for minibatch 1 (else its weights would have moved with the update)
    expected = ((2 * tokens[0] + tokens[1]) / (tokens[0] + tokens[1]) + 1.0) / 2  # per-minibatch means
    assert math.isclose(first["tis_weight"], expected, rel_tol=1e-5)
    second = learner.rl_step(seqs[:2], lr=0.0, algorithm=algorithm)
    assert second["kl"] > 0.0
    assert make_learner(checkpoint).reference is None  # kl_coef 0 keeps no copy


def test_every_loss_and_advantage_for_two_steps(shared_learner, batch):
    """Each loss x advantage as a recipe would select it, with aggregations, TIS and KL mixed in."""
    learner = shared_learner
    short = [Sequence(s.prompt_ids[-8:], s.completion_ids[:8]) for s in batch[:4]]  # fast: 4 x 16 tokens
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    aggregations = [("token_mean", None), ("seq_mean_token_mean", None), ("seq_sum_mean", None),
                    ("seq_sum_constant", 64.0)]
    combinations = [(j, name, k, advantage) for j, name in enumerate(LOSSES)
                    for k, advantage in enumerate(("grpo", "dr_grpo", "rloo", "maxrl"))]
    for j, name, k, advantage in combinations:
        aggregation, constant = aggregations[(j + k) % 4]  # every loss and advantage meets every one
        algorithm = AlgorithmConfig(**{**LOSSES[name].model_dump(), **dict(
            advantage=advantage, loss_aggregation=aggregation, loss_constant=constant,
            tis_cap=2.0 if name == "dppo_tv" or k % 2 else None, kl_coef=0.05 if j == k else 0.0)})
        advantages = group_advantages(rewards, advantage).flatten().tolist()
        seqs = with_advantages(short, advantages)
        for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
            seq.old_logprobs = logprobs
        for _ in range(2):  # the second step's old log-probs are one update stale
            stats = learner.rl_step(seqs, lr=1e-3, algorithm=algorithm)
            assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]), (name, advantage, stats)


def test_router_replay_and_the_balancing_loss(checkpoint, batch):
    """Replayed routing equal to the learner's own changes nothing; the balancing loss joins the
    loss and moves the routers, not lm_head. (tests/unit/test_router_replay.py: the rest.)"""
    seqs = with_advantages(batch[:4], [1.0, -1.0, 1.0, -1.0])
    model = prepare_policy(load_model(checkpoint))
    for seq in seqs:  # the model's own routing, as an fp32 engine reports it (no row for the last token)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq.prompt_ids + seq.completion_ids]), output_router_logits=True)
        own = torch.stack([layer.topk(2, dim=-1).indices for layer in out.router_logits], dim=1)
        seq.routed_experts = own[:-1].numpy().astype(np.int16)
    # No clipping: it would scale every gradient by the norm, the balancing term's included.
    learners = [Learner(checkpoint, DeepSpeedConfig(grad_clip=1e6), master_port=free_port(), torch_threads=2)
                for _ in range(2)]
    for seq, logprobs in zip(seqs, learners[0].logprobs(seqs)):
        seq.old_logprobs = logprobs
    plain = learners[0].rl_step(seqs, lr=1e-2, algorithm=AlgorithmConfig(router_replay=True))
    assert plain["mean_abs_logprob_diff"] < 1e-5 and plain["routing_mismatch"] == 0.0
    balanced = learners[1].rl_step(seqs, lr=1e-2, algorithm=AlgorithmConfig(router_replay=True,
                                                                              router_aux_loss_coef=10.0))
    assert balanced["loss"] == pytest.approx(plain["loss"] + 10.0 * plain["router_aux_loss"], rel=1e-4)
    assert balanced["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)
    after = [learner.state_dict() for learner in learners]
    routers = [k for k in after[0] if k.endswith("mlp.gate.weight")]
    assert routers and all(not torch.allclose(after[0][k], after[1][k]) for k in routers)
    torch.testing.assert_close(after[0]["lm_head.weight"], after[1]["lm_head.weight"])  # no aux gradient there


def test_length_buckets_minimise_padding():
    lengths = [30, 200, 31, 190, 29, 32, 195, 60]
    buckets = length_buckets(lengths, 3)
    assert [[lengths[i] for i in b] for b in buckets] == [[29, 30, 31, 32], [60], [190, 195, 200]]
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert length_buckets(lengths, 1) == [sorted(range(8), key=lengths.__getitem__)]
    # The count is min(parts, len), even when fewer groups would pad no more: ranks must agree.
    assert len(length_buckets([5, 5, 5, 5], 3)) == 3
    assert length_buckets([7, 3], 4) == [[1], [0]]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_length_buckets_accumulate_the_same_step(checkpoint, zero_stage):
    """Three passes over sequences grouped by length give the one-pass loss, gradient and update,
    for SFT and for RL under a token mean and a sequence mean, with TIS and KL mixed in."""
    tok = load_tokenizer(checkpoint)
    tasks = TaskStream("chain_sum", 1).take(1, 4) + TaskStream("chain_sum", 1).take(3, 3)
    batch = [Sequence(tok(t.prompt)["input_ids"] * (1 + 4 * (i % 2)), tok(t.solution)["input_ids"] + [tok.eos_token_id],
                      advantage=1.0 if i % 3 else -1.0) for i, t in enumerate(tasks)]
    algorithms = [AlgorithmConfig(loss_aggregation="token_mean", tis_cap=2.0, kl_coef=0.1),
                  AlgorithmConfig(loss_aggregation="seq_mean_token_mean")]
    results = []
    for buckets in (1, 3):
        learner = make_learner(checkpoint, zero_stage, length_buckets=buckets)
        stats = [learner.sft_step(batch, lr=1e-2)]
        for algorithm in algorithms:
            seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage, old_logprobs=lp)
                    for s, lp in zip(batch, learner.logprobs(batch))]
            seqs[0].old_logprobs = [lp - 1.0 for lp in seqs[0].old_logprobs]  # off-policy: TIS weighs it
            stats.append(learner.rl_step(seqs, lr=1e-3, algorithm=algorithm, minibatches=2))
        results.append((stats, learner.logprobs(batch)))
    (one, after_one), (three, after_three) = results
    for a, b in zip(one, three):
        for key in ("loss", "grad_norm", "tokens", "clip_fraction", "tis_weight", "kl", "mean_abs_logprob_diff"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        torch.testing.assert_close(torch.tensor(b["expert_load"]), torch.tensor(a["expert_load"]))
    assert one[1]["tis_weight"] > 1.0 and one[1]["kl"] > 0.0  # the checks above compared something
    for a, b in zip(after_one, after_three):
        assert b == pytest.approx(a, abs=1e-4)
