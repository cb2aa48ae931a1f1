"""Models: a tiny Qwen3-MoE built from a config, an offline-trained tokenizer, checkpoints.

Qwen3-MoE is served natively by vLLM and transformers, so the one checkpoint directory
written here (`save_pretrained`) is what the rollout engines, the DeepSpeed learner and
evaluation all load. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from zaya_rl.recipe import TinyModelConfig
from zaya_rl.rsa import template_pieces

EOS = "<|endoftext|>"


def train_tokenizer(corpus: Iterable[str], vocab_size: int, pieces: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`; digits stay single tokens so arithmetic is regular, and
    the RSA aggregation template's fixed strings are one token each, as is each of `pieces`
    (the tool environment's markup, for a recipe that uses it)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in template_pieces() + list(pieces)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def build_tiny_moe(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int):
    """A randomly initialised Qwen3MoeForCausalLM in fp32."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size * cfg.experts_per_token,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def build_checkpoint(cfg: TinyModelConfig, corpus: list[str], out_dir: Path, seed: int,
                     pieces: tuple[str, ...] = ()) -> Path:
    """Train the tokenizer (`pieces` as single tokens), build the model and save both as one HF
    checkpoint directory."""
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, pieces)
    model = build_tiny_moe(cfg, tokenizer, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as the user's turn of the checkpoint's chat template, ready for the assistant's
    answer; unchanged for a tokenizer without one (the models built here)."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def context_length(path: Path) -> int:
    """The checkpoint's own context length (its config's max_position_embeddings): the engines
    serve it with that, whether it is a user's model or the tiny one built from the recipe."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path)).max_position_embeddings


def load_model(path: Path):
    """The checkpoint as a transformers model in fp32 (the dtype engine/learner agreement needs)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def weights_for_transport(state_dict: dict) -> dict:
    """A CPU state dict as numpy arrays: Ray's object store keeps those without pickling and
    hands them to an actor on the same node as shared memory; torch tensors it pickles, which
    made a weight sync several times slower (benchmarks/weight_sync.py)."""
    return {name: tensor.numpy() for name, tensor in state_dict.items()}


def weights_as_tensors(weights: dict) -> dict:
    """Torch views of `weights_for_transport`'s arrays (or tensors, passed through). Arrays
    fetched from the object store are read-only; the engines and tests only read them."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(w) if isinstance(w, np.ndarray) else w for name, w in weights.items()}
