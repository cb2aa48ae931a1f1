"""Does the rollout worker keep vLLM's speed? Generated tokens per second of a `RolloutWorker`
(Ray actor: our `Rollout`, with per-token log-probs and `Completion` records, results shipped
back through Ray) against the bare vLLM engine in this process, on the same prompts.

    python -m benchmarks.rollout_throughput [--quick] [--out benchmarks/results]

Both engines are built with the same settings (`VllmEngine`'s: fp32, eager, in-process, 1 GiB
KV cache, 2 threads), so the ratio is the cost of our layer, not of engine options; the bare
engine runs at the niceness of Ray's workers (benchmarks/report.py). The model
is the recipe's tiny MoE, untrained (throughput does not depend on what the weights know).
Calls alternate between the two, one at a time, after one warm-up call each; the ratio is of
total tokens over total seconds. Target: ratio >= 0.9. Writes rollout_throughput.json.
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

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SETTINGS = {"quick": {"num_prompts": 32, "repeats": 2}, "full": {"num_prompts": 32, "repeats": 5}}
THREADS = 2


def bare_engine(model_path: str, seed: int, max_model_len: int):
    """vLLM's `LLM` as `VllmEngine` builds it, and a generate function counting tokens that asks
    for what the worker asks for: each sampled token's log-prob (the learner needs it)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, distributed_executor_backend="uni", dtype="float32", seed=seed,
              max_model_len=max_model_len, enforce_eager=True, logprobs_mode="processed_logprobs")

    def generate(prompts: list[str], n: int, temperature: float, max_tokens: int) -> int:
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    return generate


def main(argv: list[str] | None = None) -> dict:
    import ray
    import torch

    from workers.rollout import RolloutWorker
    from zaya_rl.models import build_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    recipe = load_recipe(args.recipe)
    rl = next(s for s in recipe.stages if isinstance(s, RlStage))
    torch.set_num_threads(THREADS)

    stream = TaskStream(recipe.tasks.generator, recipe.seed)
    corpus = [t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)]
    tmp = tempfile.TemporaryDirectory()  # kept until exit: both engines load from it
    path = str(build_checkpoint(recipe.model.tiny, corpus, Path(tmp.name) / "tiny", seed=recipe.seed))
    max_len = recipe.model.tiny.max_position_embeddings
    prompts = [t.prompt for t in held_out(recipe.tasks.generator, [1], settings["num_prompts"])]
    call = (prompts, rl.rollout.group_size, rl.rollout.temperature, rl.rollout.max_tokens)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    match_ray_workers_niceness()  # after ray.init: Ray's workers take the raylet's niceness + 15
    try:
        bare = bare_engine(path, recipe.seed, max_len)
        worker = RolloutWorker.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS)}}).remote(
            "vllm", path, seed=recipe.seed, max_model_len=max_len, torch_threads=THREADS)

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
    write_json(args.out / "rollout_throughput.json", result)
    print(text_table(f"\nRollout: {len(prompts)} prompts x {rl.rollout.group_size} samples, up to "
                     f"{rl.rollout.max_tokens} tokens, {settings['repeats']} calls each (alternating)",
                     ["engine", "tokens", "seconds", "tokens/s"],
                     [[name, r["generated_tokens"], r["seconds"], r["tokens_per_second"]] for name, r in rows.items()]))
    print(f"RolloutWorker / bare vLLM (target >= 0.9): {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
