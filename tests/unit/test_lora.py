"""LoRA in the learner (deepspeed.lora, zaya_rl/lora.py) on one CPU rank of a tiny Qwen3-MoE:
adapters train on a frozen base, every weight that leaves the learner is the base model's with
the update merged in, and run checkpoints hold the adapters alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.learner import REFERENCE_FILE, Learner, Sequence, free_port
from zaya_rl.lora import ADAPTER_WEIGHTS, find_targets, is_adapter_weight
from zaya_rl.checkpoint import ADAPTER_CONFIG, base_model_path
from zaya_rl.models import load_model, load_tokenizer
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig, LoraSettings, RecipeError, load_recipe

MINI = Path(__file__).resolve().parents[1] / "e2e/mini.yaml"
LORA = LoraSettings(rank=4, alpha=8.0)  # scale alpha / rank = 2
SCALE = 2.0


def make_learner(checkpoint, zero_stage=2, seed=0) -> Learner:
    return Learner(checkpoint, DeepSpeedConfig(zero_stage=zero_stage, lora=LORA), master_port=free_port(),
                   torch_threads=2, seed=seed)


@pytest.fixture(scope="module")
def trained(checkpoint, batch) -> tuple[Learner, list[float]]:
    """A LoRA learner after five SFT steps, and their losses."""
    learner = make_learner(checkpoint)
    return learner, [learner.sft_step(batch, lr=1e-2)["loss"] for _ in range(5)]


def logits(model, batch: list[Sequence]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([batch[0].prompt_ids + batch[0].completion_ids])).logits


def test_settings_are_validated_naming_the_field():
    assert DeepSpeedConfig().lora is None  # full fine-tuning unless asked
    assert load_recipe(MINI, ["deepspeed.lora={rank: 8}"]).deepspeed.lora.targets == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    refused = [
        ("deepspeed.lora.rank=0", "deepspeed.lora.rank: Input should be greater than or equal to 1"),
        ("deepspeed.lora={alpha: 0}", "deepspeed.lora.alpha: Input should be greater than 0"),
        ("deepspeed.lora={targets: []}", "deepspeed.lora.targets: List should have at least 1"),
        ("deepspeed.lora={targets: [q_proj, q_proj]}", "deepspeed.lora.targets: Value error, LoRA targets repeat"),
        ("deepspeed.lora={targets: [weight]}", "deepspeed.lora.targets: Value error, LoRA target 'weight' is not"),
        ("deepspeed.lora={dropout: 0.1}", "deepspeed.lora.dropout: Extra inputs are not permitted"),  # none: see docs
    ]
    for setting, message in refused:
        with pytest.raises(RecipeError) as err:
            load_recipe(MINI, [setting])
        assert f"--set {setting}: {message}" in str(err.value)


def test_targets_are_found_in_the_model_or_refused(checkpoint):
    model = load_model(checkpoint)
    # Attention projections are linear layers; a Qwen3-MoE's experts are fused 3D weights.
    assert find_targets(model, LORA.targets) == (["k_proj", "o_proj", "q_proj", "v_proj"],
                                                 ["down_proj", "gate_up_proj"])
    with pytest.raises(ValueError, match=r"deepspeed.lora.targets: \['gate_proj'\] name no linear layer") as err:
        find_targets(model, ["q_proj", "gate_proj"])
    assert "gate_up_proj" in str(err.value)  # the message lists what the model has


def test_adapters_train_and_the_base_stays_frozen(checkpoint, trained):
    learner, losses = trained
    module = learner.engine.module
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    # An A and a B per attention projection and per expert weight (all experts' in one) of each layer.
    assert len(trainable) == 2 * 6 * module.config.num_hidden_layers
    assert all(is_adapter_weight(name) for name in trainable)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    base = load_model(checkpoint).state_dict()
    for name, weight in module.named_parameters():
        if not is_adapter_weight(name):  # embeddings, norms, routers, LM head and the adapted weights
            assert torch.equal(weight, base[name.replace(".base_layer", "")]), name
    assert all(p.abs().sum() > 0 for name, p in module.named_parameters() if ".lora_B." in name)  # B began at 0


def test_weights_out_are_the_base_weights_plus_the_update(checkpoint, trained, batch):
    learner, _ = trained
    module = learner.engine.module
    base_model = load_model(checkpoint)
    base = base_model.state_dict()
    state = learner.state_dict()
    assert list(state) == list(base) and all(state[k].shape == base[k].shape for k in base)
    changed = {k for k in base if not torch.equal(state[k], base[k])}
    assert changed == {k for k in base if k.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj"))}

    # By hand: W + scale · B A for a projection, and for each expert of a fused 3D weight
    # (peft keeps one rank-r adapter per expert: A's rows and B's columns by expert).
    layer = module.model.layers[1]
    a, b = layer.self_attn.q_proj.lora_A.default.weight, layer.self_attn.q_proj.lora_B.default.weight
    torch.testing.assert_close(state["model.layers.1.self_attn.q_proj.weight"],
                               base["model.layers.1.self_attn.q_proj.weight"] + SCALE * (b @ a).detach())
    experts = layer.mlp.experts.base_layer  # the wrapper of gate_up_proj, inside that of down_proj
    gate_up = base["model.layers.1.mlp.experts.gate_up_proj"]  # (E, 2I, H)
    num_experts, rank = gate_up.shape[0], LORA.rank
    a = experts.lora_A.default.weight.detach().reshape(num_experts, rank, -1)  # (E, r, H)
    b = experts.lora_B.default.weight.detach().reshape(gate_up.shape[1], rank, num_experts)  # (2I, r, E)
    for e in range(num_experts):
        torch.testing.assert_close(state["model.layers.1.mlp.experts.gate_up_proj"][e],
                                   gate_up[e] + SCALE * b[:, :, e] @ a[e])

    # A plain transformers model holding them computes what the learner computes.
    base_model.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(base_model, batch), logits(module, batch), atol=1e-5, rtol=0)
    # The GPU paths' weights: the same names, shapes and values, named_weights in weight_metadata's order.
    named = dict(learner.named_weights(torch.float32))
    params = dict(load_model(checkpoint).named_parameters())
    assert named.keys() == params.keys() and all(torch.equal(named[k], state[k]) for k in named)
    metadata = learner.weight_metadata(torch.bfloat16)
    assert metadata["names"] == list(named)
    assert metadata["shapes"] == [list(params[k].shape) for k in named]
    assert set(metadata["dtype_names"]) == {"bfloat16"}


def test_rl_log_probs_match_a_model_holding_the_merged_weights(checkpoint, trained, batch):
    """What the engine/learner log-prob check compares: an engine holds the merged weights."""
    from workers.learner import collate, completion_logprobs

    learner, _ = trained
    engine = load_model(checkpoint)
    engine.load_state_dict(learner.state_dict())
    t = collate(batch, learner.pad_id, torch.device("cpu"))
    with torch.no_grad():
        engine_logprobs = completion_logprobs(engine(input_ids=t.input_ids, attention_mask=t.attention_mask).logits, t)
    seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage,
                     old_logprobs=row[:len(s.completion_ids)].tolist()) for s, row in zip(batch, engine_logprobs)]
    stats = learner.rl_step(seqs, lr=1e-3, algorithm=AlgorithmConfig())
    assert stats["mean_abs_logprob_diff"] < 1e-5 and stats["grad_norm"] > 0


def test_save_writes_merged_weights_and_the_checkpoint_model_adapters_only(checkpoint, trained, batch, tmp_path):
    from peft import PeftModel

    learner, _ = trained
    learner.save(str(tmp_path / "final"))
    final = load_model(tmp_path / "final")  # a full checkpoint of the base architecture
    torch.testing.assert_close(logits(final, batch), logits(learner.engine.module, batch), atol=1e-5, rtol=0)
    assert load_tokenizer(tmp_path / "final").eos_token_id == load_tokenizer(checkpoint).eos_token_id

    learner.save_checkpoint_model(str(tmp_path / "model"))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert all(is_adapter_weight(k) for k in load_file(tmp_path / "model" / ADAPTER_WEIGHTS))
    assert base_model_path(tmp_path / "model") == Path(checkpoint).resolve()
    assert base_model_path(tmp_path / "final") == tmp_path / "final"
    adapted = PeftModel.from_pretrained(load_model(base_model_path(tmp_path / "model")), tmp_path / "model")
    torch.testing.assert_close(logits(adapted, batch), logits(learner.engine.module, batch), atol=1e-5, rtol=0)


def test_state_holds_adapters_only_and_a_resumed_learner_repeats_the_step(checkpoint, batch, tmp_path):
    learner = make_learner(checkpoint)
    seqs = [Sequence(s.prompt_ids, s.completion_ids, advantage=s.advantage, old_logprobs=lp)
            for s, lp in zip(batch, learner.logprobs(batch))]
    learner.rl_step(seqs, lr=1e-2, algorithm=AlgorithmConfig(kl_coef=0.1))  # the KL reference: the policy now
    learner.sft_step(batch, lr=1e-2)
    learner.save_state(str(tmp_path / "optimizer"))
    saved = torch.load(tmp_path / "optimizer" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["module"] and all(is_adapter_weight(k) for k in saved["module"])
    assert all(is_adapter_weight(k) for k in load_file(tmp_path / "optimizer" / REFERENCE_FILE))
    before = learner.state_dict()
    learner.sft_step(batch, lr=1e-2)
    one_more = learner.state_dict()

    # A fresh learner on the base (other seed: other initial adapters) takes the adapters, their
    # Adam moments and the reference from the state, and repeats the step exactly.
    resumed = make_learner(checkpoint, seed=1)
    resumed.load_state(str(tmp_path / "optimizer"))
    assert all(torch.equal(before[k], w) for k, w in resumed.state_dict().items())
    for mine, theirs in zip(learner.reference.state_dict().values(), resumed.reference.state_dict().values()):
        assert torch.equal(mine, theirs)
    resumed.sft_step(batch, lr=1e-2)
    assert all(torch.equal(one_more[k], w) for k, w in resumed.state_dict().items())


def test_zero3_matches_zero2(checkpoint, batch):
    results = []
    for zero_stage in (3, 2):
        learner = make_learner(checkpoint, zero_stage)
        losses = [learner.sft_step(batch, lr=1e-2)["loss"] for _ in range(2)]
        state = learner.state_dict()  # gathered from the partitions, adapters merged
        assert all(torch.equal(w, state[k]) for k, w in learner.named_weights(torch.float32))
        results.append((losses, state))
    (three, state3), (two, state2) = results
    assert three == pytest.approx(two, rel=1e-5)
    assert state3.keys() == state2.keys()
    for k in state2:
        torch.testing.assert_close(state3[k], state2[k], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_trains_the_adapters_alike(checkpoint, batch):
    """Recomputed layers take a frozen input (no gradient of their own): the adapters inside
    must still get theirs."""
    losses = []
    for recompute in (True, False):
        learner = Learner(checkpoint, DeepSpeedConfig(lora=LORA, activation_checkpointing=recompute),
                          master_port=free_port(), torch_threads=2)
        losses.append([learner.sft_step(batch, lr=1e-2)["loss"] for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][2] < losses[0][0]
