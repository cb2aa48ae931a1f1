"""The DeepSpeed learner as a plain class (one rank, no Ray) on a tiny Qwen3-MoE."""

from __future__ import annotations

import pytest
import torch

from workers.learner import Learner, Sequence, free_port
from zaya_rl.models import load_model, load_tokenizer
from zaya_rl.recipe import DeepSpeedConfig
from zaya_rl.tasks import TaskStream

@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):  # conftest: hidden 64, 2 layers, 4 experts top-2
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def config(checkpoint):
    return load_model(checkpoint).config


@pytest.fixture(scope="module")
def batch(checkpoint) -> list[Sequence]:
    tok = load_tokenizer(checkpoint)
    tasks = TaskStream("chain_sum", 1).take(1, 8)
    return [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id])
            for t in tasks]


def make_learner(checkpoint, zero_stage=2) -> Learner:
    return Learner(checkpoint, DeepSpeedConfig(zero_stage=zero_stage), master_port=free_port(),
                   torch_threads=2)


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


def test_rl_step_on_policy_and_direction(checkpoint, config, batch):
    learner = make_learner(checkpoint)
    seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=1.0 if i % 2 == 0 else -1.0)
            for i, s in enumerate(batch)]
    for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
        assert len(logprobs) == len(seq.completion_ids)
        seq.old_logprobs = logprobs
    stats = learner.rl_step(seqs, lr=1e-3, clip_low=0.2, clip_high=0.28)
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

    two = learner.rl_step(seqs, lr=1e-3, clip_low=0.2, clip_high=0.28, minibatches=2)
    assert two["mean_abs_logprob_diff"] > 1e-5  # the old log-probs are now one step stale
    for seq, logprobs in zip(seqs, learner.logprobs(seqs, temperature=2.0)):
        seq.old_logprobs = logprobs
    hot = learner.rl_step(seqs, lr=0.0, clip_low=0.2, clip_high=0.28, temperature=2.0)
    assert hot["mean_abs_logprob_diff"] < 1e-5
    with pytest.raises(ValueError, match="old_logprobs"):
        learner.rl_step(batch, lr=1e-3, clip_low=0.2, clip_high=0.28)


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
        learner.rl_step(seqs, lr=1e-3, clip_low=0.2, clip_high=0.28, minibatches=3)
