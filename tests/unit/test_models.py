"""The engines' context length comes from the checkpoint being served, not the recipe's tiny model."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from zaya_rl.models import context_length
from zaya_rl.recipe import TinyModelConfig


def test_context_length_is_the_checkpoints(tmp_path):
    Qwen3MoeConfig(max_position_embeddings=4096).save_pretrained(tmp_path)
    assert context_length(tmp_path) == 4096 != TinyModelConfig().max_position_embeddings
