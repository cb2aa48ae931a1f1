"""Models: the engines' context length comes from the checkpoint being served, not the recipe's tiny
model; the tokenizer trained from scratch."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from zaya_rl.models import context_length
from zaya_rl.recipe import TinyModelConfig


def test_context_length_is_the_checkpoints(tmp_path):
    Qwen3MoeConfig(max_position_embeddings=4096).save_pretrained(tmp_path)
    assert context_length(tmp_path) == 4096 != TinyModelConfig().max_position_embeddings


def test_tokenizer_takes_the_aggregation_templates_fixed_strings_whole():
    from zaya_rl.models import train_tokenizer
    from zaya_rl.rsa import NUMBERED_TAILS_IN_VOCAB, aggregation_prompt, template_overhead_tokens

    tok = train_tokenizer(["12+3=15\n\\boxed{15}", "7-2=5\n\\boxed{5}"] * 50, vocab_size=300)
    # Per tail: its marker and the newline after it; plus the instruction.
    assert template_overhead_tokens(tok, 4) == 4 * 2 + 1
    assert template_overhead_tokens(tok, NUMBERED_TAILS_IN_VOCAB + 1) > 2 * (NUMBERED_TAILS_IN_VOCAB + 1) + 1
    prompt = aggregation_prompt("12+3=?\n", ["12+3=15\n\\boxed{15}", "x é [2]\ny"])
    assert tok.decode(tok.encode(prompt)) == prompt
