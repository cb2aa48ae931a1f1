"""Shared fixtures: a tiny checkpoint built once per session, and a real local Ray."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _build_tiny(tmp_path_factory, name: str, pieces: tuple[str, ...] = ()):
    from zaya_rl.models import build_checkpoint
    from zaya_rl.recipe import TinyModelConfig
    from zaya_rl.tasks import TaskStream

    stream = TaskStream("chain_sum", 0)
    corpus = [t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)]
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                          num_experts=4, experts_per_token=2, moe_intermediate_size=64)
    return build_checkpoint(cfg, corpus, tmp_path_factory.mktemp("ckpt") / name, seed=0, pieces=pieces)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer Qwen3-MoE (4 experts, top-2) with a tokenizer trained on chain sums."""
    return _build_tiny(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def batch(checkpoint):
    """Eight level-1 chain sums with their worked solutions, advantages +1 and -1 in turn (one
    list per test module: tests may set their log-probs)."""
    from workers.learner import Sequence
    from zaya_rl.models import load_tokenizer
    from zaya_rl.tasks import TaskStream

    tok = load_tokenizer(checkpoint)
    return [Sequence(tok(t.prompt)["input_ids"], tok(t.solution)["input_ids"] + [tok.eos_token_id],
                     advantage=1.0 if i % 2 == 0 else -1.0)
            for i, t in enumerate(TaskStream("chain_sum", 1).take(1, 8))]


@pytest.fixture(scope="session")
def tool_checkpoint(tmp_path_factory):
    """The same, its tokenizer holding the Python tool's markup as single tokens."""
    from zaya_rl.environments import TOOL_PIECES

    return _build_tiny(tmp_path_factory, "tools", TOOL_PIECES)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the end-to-end tests of one session."""
    import ray

    if not ray.is_initialized():
        import torch

        # Without a GPU, 4 are declared with no device behind them: Ray schedules placement groups
        # onto them (placement tests); actors that ask for none see no device, as everywhere else.
        gpus = None if torch.cuda.is_available() else 4
        ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
