"""Does the rollout worker keep vLLM's speed? Generated tokens per second of a `RolloutWorker`
(Ray actor: our `Rollout`, with per-token log-probs and `Completion` records, results shipped
back through Ray) against the bare vLLM engine in this process, on the same prompts.

    python -m benchmarks.rollout_throughput [--quick] [--out benchmarks/results]
    python -m benchmarks.rollout_throughput --gpu      # benchmarks/results/gpu/rollout_throughput.json

Both engines are built with the same arguments (`workers.rollout.llm_options`; on CPU: fp32,
eager, in-process, 1 GiB KV cache, 2 threads; with --gpu: recipes/gpu.yaml's model in bf16 with
CUDA graphs, each engine on its own share of the card), so the ratio is the cost of our layer,
not of engine options; on CPU the bare engine runs at the niceness of Ray's workers
(benchmarks/report.py). The model is the recipe's, untrained (throughput does not depend on
what the weights know). Calls alternate between the two, one at a time, after one warm-up call
each; the ratio is of total tokens over total seconds. Target: ratio >= 0.9 (CPU), >= 0.95 (GPU).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine, match_ray_workers_niceness, text_table, write_json
from zaya_rl.recipe import RlStage, load_recipe
from zaya_rl.tasks import TaskStream, held_out

SETTINGS = {"quick": {"num_prompts": 32, "repeats": 2}, "full": {"num_prompts": 32, "repeats": 5},
            "gpu": {"num_prompts": 256, "repeats": 5}}
THREADS = 2


def bare_engine(model_path: str, seed: int, max_model_len: int, dtype: str, gpu):
    """vLLM's `LLM` as `VllmEngine` builds it, and a generate function counting tokens that asks
    for what the worker asks for: each sampled token's log-prob (the learner needs it)."""
    from vllm import LLM, SamplingParams

    from workers.rollout import llm_options

    llm = LLM(**llm_options(model_path, seed, max_model_len, dtype, gpu))

    def generate(prompts: list[str], n: int, temperature: float, max_tokens: int) -> int:
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    return generate


def main(argv: list[str] | None = None) -> dict:
    import ray
    import torch

    from workers.rollout import GpuOptions, RolloutWorker
    from zaya_rl.models import build_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="on a CUDA card, with recipes/gpu.yaml's model")
    parser.add_argument("--recipe", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = SETTINGS["gpu" if args.gpu else "quick" if args.quick else "full"]
    recipe = load_recipe(args.recipe or Path("recipes/gpu.yaml" if args.gpu else "recipes/tiny.yaml"))
    rl = next(s for s in recipe.stages if isinstance(s, RlStage))
    torch.set_num_threads(THREADS)

    stream = TaskStream(recipe.tasks.generator, recipe.seed)
    corpus = [t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)]
    tmp = tempfile.TemporaryDirectory()  # kept until exit: both engines load from it
    path = str(build_checkpoint(recipe.model.tiny, corpus, Path(tmp.name) / "model", seed=recipe.seed))
    max_len = recipe.model.tiny.max_position_embeddings
    prompts = [t.prompt for t in held_out(recipe.tasks.generator, [1], settings["num_prompts"])]
    call = (prompts, rl.rollout.group_size, rl.rollout.temperature, rl.rollout.max_tokens)
    # On a card both engines are up at once, each with the recipe's share of it.
    gpu = GpuOptions(memory_utilization=recipe.resources.gpu_memory_utilization) if args.gpu else None
    dtype = "bfloat16" if args.gpu else "float32"

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if not args.gpu:
        match_ray_workers_niceness()  # after ray.init: Ray's workers take the raylet's niceness + 15
    try:
        bare = bare_engine(path, recipe.seed, max_len, dtype, gpu)
        worker = RolloutWorker.options(num_gpus=0.5 if args.gpu else 0,
                                       runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS)}}).remote(
            "vllm", path, seed=recipe.seed, max_model_len=max_len, torch_threads=THREADS, dtype=dtype, gpu=gpu)

        def actor(*a) -> int:
            return sum(len(c.token_ids) for group in ray.get(worker.generate.remote(*a)) for c in group)

        totals = {"bare vLLM": [0, 0.0], "RolloutWorker": [0, 0.0]}
        for repeat in range(settings["repeats"] + 1):
            for name, generate in (("bare vLLM", bare), ("RolloutWorker", actor)):
                start = time.perf_counter()
                tokens = generate(*call)
                if repeat > 0:  # the first call of each allocates KV blocks: not throughput
                    totals[name][0] += tokens
                    totals[name][1] += time.perf_counter() - start
        ray.kill(worker)
    finally:
        ray.shutdown()

    rows = {name: {"generated_tokens": t, "seconds": s, "tokens_per_second": t / s} for name, (t, s) in totals.items()}
    ratio = rows["RolloutWorker"]["tokens_per_second"] / rows["bare vLLM"]["tokens_per_second"]
    result = {"machine": machine(), "settings": settings, "samples_per_call": len(prompts) * rl.rollout.group_size,
              "max_tokens": rl.rollout.max_tokens, "rows": rows, "ratio": ratio}
    if args.gpu:
        result["device"] = torch.cuda.get_device_name()
    write_json(args.out / ("gpu" if args.gpu else "") / "rollout_throughput.json", result)
    print(text_table(f"\nRollout: {len(prompts)} prompts x {rl.rollout.group_size} samples, up to "
                     f"{rl.rollout.max_tokens} tokens, {settings['repeats']} calls each (alternating)",
                     ["engine", "tokens", "seconds", "tokens/s"],
                     [[name, r["generated_tokens"], r["seconds"], r["tokens_per_second"]] for name, r in rows.items()]))
    print(f"RolloutWorker / bare vLLM (target >= {0.95 if args.gpu else 0.9}): {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
