"""model.path with Hugging Face checkpoints other than ours: a dense Qwen3 (no experts, tied
embeddings) trains in the learner and serves in vLLM, the learner's weights reach the engine,
and a checkpoint's chat template wraps every prompt the engine samples and the learner trains on."""

from __future__ import annotations

import pytest
import torch

from workers.learner import Learner, Sequence, free_port
from workers.rollout import RolloutWorker
from zaya_rl.models import chat_prompt, load_tokenizer, train_tokenizer
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig
from zaya_rl.tasks import TaskStream

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    stream = TaskStream("chain_sum", 0)
    tokenizer = train_tokenizer([t.prompt + t.solution for t in stream.take(1, 300)] + [TEMPLATE], 320)
    tokenizer.chat_template = TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dense") / "qwen3"
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_chat_template_wraps_a_prompt_and_a_plain_tokenizer_leaves_it(dense_checkpoint, tiny_checkpoint):
    assert chat_prompt(load_tokenizer(dense_checkpoint), "1 + 2 =") == "[user] 1 + 2 =\n[assistant] "
    assert chat_prompt(load_tokenizer(tiny_checkpoint), "1 + 2 =") == "1 + 2 ="


def test_a_dense_checkpoint_trains_serves_and_syncs(dense_checkpoint, ray_local):
    tokenizer = load_tokenizer(dense_checkpoint)
    learner = Learner(str(dense_checkpoint), DeepSpeedConfig(zero_stage=2), master_port=free_port(), torch_threads=2)
    # In its own process: vLLM's parallel state is per process, set up for the first model it serves.
    rollout = RolloutWorker.remote("vllm", str(dense_checkpoint), seed=0, max_model_len=256, torch_threads=2)
    prompts = [t.prompt for t in TaskStream("chain_sum", 3).take(1, 4)]

    groups = ray_local.get(rollout.generate.remote(prompts, 2, 1.0, 16))
    wrapped = tokenizer(chat_prompt(tokenizer, prompts[0]), add_special_tokens=False)["input_ids"]
    assert groups[0][0].prompt_ids == wrapped  # the engine saw the templated prompt

    sft = learner.sft_step([Sequence(wrapped, [5, 6, tokenizer.eos_token_id])] * 4, lr=1e-2)
    assert torch.isfinite(torch.tensor(sft["loss"])) and sft["expert_load"] == []
    batch = [Sequence(c.prompt_ids, c.token_ids, advantage=float(i % 2) - 0.5, old_logprobs=c.logprobs)
             for group in groups for i, c in enumerate(group) if c.token_ids]
    stats = learner.rl_step(batch, lr=1e-2, algorithm=AlgorithmConfig(drop_uniform_groups=False))
    assert stats["expert_load"] == [] and stats["router_aux_loss"] == 0.0
    assert stats["mean_abs_logprob_diff"] > 1e-3  # the SFT step moved the learner away from the engine

    ray_local.get(rollout.load_weights.remote(learner.state_dict(), 1))
    synced = ray_local.get(rollout.generate.remote(prompts, 2, 1.0, 16))
    ray_local.kill(rollout)
    batch = [Sequence(c.prompt_ids, c.token_ids, old_logprobs=c.logprobs) for group in synced for c in group
             if c.token_ids]
    learned = learner.logprobs(batch)
    diffs = [abs(a - b) for seq, row in zip(batch, learned) for a, b in zip(seq.old_logprobs, row)]
    assert max(diffs) < 1e-3, max(diffs)  # fp32 on both sides: the engine holds the learner's weights
