"""Router replay (zaya_rl/router_replay.py) on the tiny Qwen3-MoE, and the engine's routed
experts from real vLLM replayed in the learner's forward path. Replay inside the DeepSpeed
learner and the balancing loss: tests/unit/test_learner.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from workers.learner import Sequence, collate, completion_logprobs, prepare_policy
from workers.rollout import Rollout
from zaya_rl.models import load_model, load_tokenizer
from zaya_rl.recipe import RecipeError, load_recipe
from zaya_rl.router_replay import moe_routers, replay_routing, routing_mismatch

PROMPTS = ["12+3=?\n", "4-5+6=?\n", "7+8=?\n"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # conftest: 2 layers, 4 experts top-2
    return prepare_policy(load_model(tiny_checkpoint))


@pytest.fixture(scope="module")
def ids(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    return torch.tensor([tok("12+34+5=? 12+34=46, 46+5=51")["input_ids"][:16]] * 2)


def own_routing(model, ids):
    """The model's own top-k, (batch * time, layers, k), and its logits."""
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    k = model.config.num_experts_per_tok
    return torch.stack([layer.topk(k, dim=-1).indices for layer in out.router_logits], dim=1), out.logits


def complement(experts, num_experts):
    """For top-2 of 4 experts: the two experts each token did not pick."""
    picked = torch.zeros(*experts.shape[:2], num_experts, dtype=torch.bool).scatter_(-1, experts, True)
    return (~picked).nonzero()[:, -1].view(experts.shape)


def test_replaying_the_models_own_choice_changes_nothing(model, ids):
    experts, logits = own_routing(model, ids)
    with replay_routing(model, experts.flip(-1)), torch.no_grad():  # order within top-k is free
        replayed = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(replayed, logits, atol=1e-6, rtol=0)
    with replay_routing(model, torch.full_like(experts, -1)), torch.no_grad():  # -1: route yourself
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, logits, atol=1e-6, rtol=0)


def test_forced_experts_change_the_output_and_train_the_router(model, ids):
    experts, logits = own_routing(model, ids)
    forced = complement(experts, model.config.num_experts)
    model.zero_grad()
    with replay_routing(model, forced):
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        torch.log_softmax(out.logits, -1)[..., 0].sum().backward()
    assert (out.logits - logits).abs().max() > 1e-3
    assert routing_mismatch(out.router_logits, forced) == 1.0  # logits stay the model's own
    for router in moe_routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():  # outside the context the model routes itself again
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, logits, atol=1e-6, rtol=0)


def test_gate_weights_are_the_normalised_router_probabilities(model):
    router = moe_routers(model)[0]
    hidden = torch.randn(5, model.config.hidden_size)
    chosen = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    with replay_routing(model, torch.stack([chosen, chosen], dim=1)), torch.no_grad():
        logits, weights, indices = router(hidden)
    probs = torch.softmax(hidden @ router.weight.T, -1).gather(-1, chosen)
    assert torch.equal(indices, chosen)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))


def test_bad_shapes_are_rejected(model, ids):
    experts, _ = own_routing(model, ids)
    with pytest.raises(ValueError, match="layers"), replay_routing(model, experts[:, :1]):
        pass
    with pytest.raises(ValueError, match="tokens"), replay_routing(model, experts[:-1]), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    seqs = [Sequence([1, 2], [3], routed_experts=np.zeros((2, 2, 2), np.int16)), Sequence([1, 2], [3])]
    with pytest.raises(ValueError, match="every sequence"):
        collate(seqs, 0, torch.device("cpu"))


def test_routing_mismatch_counts_differing_expert_sets(model, ids):
    experts, _ = own_routing(model, ids)
    with torch.no_grad():
        router_logits = model(input_ids=ids, output_router_logits=True, use_cache=False).router_logits
    assert routing_mismatch(router_logits, experts.flip(-1)) == 0.0
    half = experts.clone()
    half[::2, 0] = complement(experts, 4)[::2, 0]  # layer 0 of every other token
    half[1::4] = -1  # not routed by the engine: not counted
    assert routing_mismatch(router_logits, half) == pytest.approx(16 / 48)  # 24 routed tokens x 2 layers


def test_the_recipe_switches(tmp_path):
    def recipe(engine: str, **algorithm):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"name": "r", "resources": {"rollout_engine": engine}, "stages": [
            {"name": "rl", "kind": "rl", "steps": 1, "lr": 1e-4, "algorithm": algorithm}]}))
        return load_recipe(path)

    assert recipe("vllm", router_replay=True, router_aux_loss_coef=1e-3).stages[0].algorithm.router_replay
    assert recipe("hf").stages[0].algorithm.router_aux_loss_coef == 0.0
    with pytest.raises(RecipeError, match="router_replay needs"):
        recipe("hf", router_replay=True)
    with pytest.raises(RecipeError, match="router_aux_loss_coef"):
        recipe("vllm", router_aux_loss_coef=-1.0)


# --- the engine -----------------------------------------------------------------------------


def learner_logprobs(model, completions, replay: bool):
    """The learner's forward path (collate, replay, completion_logprobs) on the engine's samples."""
    batch = [Sequence(c.prompt_ids, c.token_ids, routed_experts=c.routed_experts if replay else None)
             for c in completions]
    t = collate(batch, 0, torch.device("cpu"))
    with replay_routing(model, t.routed_experts), torch.no_grad():
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, output_router_logits=True,
                    use_cache=False)
    logprobs = completion_logprobs(out.logits, t)
    return [row[:len(c.token_ids)] for row, c in zip(logprobs, completions)], out.router_logits, t


def mismatch(model, completions, replay: bool) -> float:
    rows, _, _ = learner_logprobs(model, completions, replay)
    return float(torch.cat([(r - torch.tensor(c.logprobs)).abs() for r, c in zip(rows, completions)]).mean())


def test_vllm_returns_routed_experts_that_replay_in_the_learner(tiny_checkpoint, model):
    rollout = Rollout("vllm", str(tiny_checkpoint), seed=0, max_model_len=128, torch_threads=2,
                      return_routed_experts=True)
    torch.manual_seed(0)
    weights = {k: v + 0.05 * torch.randn_like(v) for k, v in load_model(tiny_checkpoint).state_dict().items()}
    moved = prepare_policy(load_model(tiny_checkpoint))
    moved.load_state_dict(weights)
    for version, policy in enumerate([model, moved]):  # the capture survives a weight reload
        if version:
            rollout.load_weights(weights, version)
        completions = [c for g in rollout.generate(PROMPTS, n=4, temperature=1.0, max_tokens=16, seed=1)
                       for c in g]
        for c in completions:
            experts = c.routed_experts
            assert experts.shape == (len(c.prompt_ids) + len(c.token_ids) - 1, 2, 2)
            assert experts.min() >= 0 and experts.max() < 4 and (experts[..., 0] != experts[..., 1]).all()
        _, router_logits, t = learner_logprobs(policy, completions, replay=True)
        assert routing_mismatch(router_logits, t.routed_experts) < 0.05  # fp32: the same routing nearly always
        assert mismatch(policy, completions, replay=True) <= mismatch(policy, completions, replay=False) + 1e-6
        assert mismatch(policy, completions, replay=True) < 1e-4
    plain = Rollout("vllm", str(tiny_checkpoint), seed=0, max_model_len=128, torch_threads=2)
    assert plain.generate(PROMPTS[:1], n=1, temperature=1.0, max_tokens=4)[0][0].routed_experts is None
    with pytest.raises(ValueError, match="only the vllm engine"):
        Rollout("hf", str(tiny_checkpoint), return_routed_experts=True)
