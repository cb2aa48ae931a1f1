"""How long does a weight sync take as the model grows? Seconds per sync of a full fp32 state
dict into a `RolloutWorker`'s vLLM engine, as the controller does it (the learner's weights,
as numpy arrays, put in Ray's object store once, the worker fetches them and reloads its
engine in place), beside the same sync with the weights as torch tensors (which Ray pickles:
how it was done before) and a plain in-memory copy (`clone`) of the state dict in one process.

    python -m benchmarks.weight_sync [--quick] [--out benchmarks/results]
    python -m benchmarks.weight_sync --gpu     # benchmarks/results/gpu/weight_sync.json

With --gpu: Qwen3-MoEs of about 0.5B and 1B parameters, each placed as recipes/gpu.yaml places
its model (one engine and one learner rank colocated on the card, bf16) by the controller, and
three syncs side by side: CUDA IPC into an awake engine (the transfer), the colocated cycle of
a training step (the engine sleeps, then CUDA IPC wakes it with the new weights), and the object
store (the learner's fp32 CPU copy, the object store, the engine's in-place reload).

Models: Qwen3-MoEs from the recipe's tiny one (~2M parameters) up to ~450M (--quick stops at
~120M: the machine has 24 GiB, and at the top size the state dict lives four times at once:
this process, the object store, the engine, the engine's incoming copy). The median of a few
syncs after a warm-up one. Writes weight_sync.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine, text_table, write_json
from zaya_rl.models import weights_for_transport
from zaya_rl.recipe import TinyModelConfig
from zaya_rl.tasks import TaskStream

MODELS = {  # name: TinyModelConfig overrides (hidden, layers, heads, kv heads, head dim, experts, expert width)
    "tiny (recipe)": {},
    "~25M": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, num_experts=8,
                 moe_intermediate_size=512),
    "~120M": dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64, num_experts=8,
                  moe_intermediate_size=768),
    "~450M": dict(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=64, num_experts=8,
                  moe_intermediate_size=1024),
}
SETTINGS = {"quick": {"models": ["tiny (recipe)", "~25M", "~120M"], "repeats": 2},
            "full": {"models": list(MODELS), "repeats": 3}}
THREADS = 2


def measure(name: str, tokenizer, repeats: int, workdir: Path) -> dict:
    import ray

    from workers.rollout import RolloutWorker
    from zaya_rl.models import build_tiny_moe

    cfg = TinyModelConfig(**MODELS[name])
    model = build_tiny_moe(cfg, tokenizer, seed=0)
    path = workdir / f"model-{cfg.hidden_size}-{cfg.num_layers}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    num_bytes = sum(v.numel() * v.element_size() for v in state.values())
    worker = RolloutWorker.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(THREADS)}}).remote(
        "vllm", str(path), seed=0, max_model_len=cfg.max_position_embeddings, torch_threads=THREADS)
    payloads = {"numpy": weights_for_transport(state), "torch": state}
    sync, copy = {name: [] for name in payloads}, []
    try:
        for version in range(1, repeats + 2):
            for name, payload in payloads.items():  # alternated, so both see the same machine
                start = time.perf_counter()
                ray.get(worker.load_weights.remote(ray.put(payload), version))
                sync[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            copied = {k: v.clone() for k, v in state.items()}
            copy.append(time.perf_counter() - start)
            del copied
    finally:
        ray.kill(worker)
    # the first of each is a warm-up
    sync_s, torch_s, copy_s = (statistics.median(x[1:]) for x in (sync["numpy"], sync["torch"], copy))
    return {"parameters": sum(v.numel() for v in state.values()), "bytes": num_bytes, "sync_seconds": sync_s,
            "sync_bytes_per_second": num_bytes / sync_s, "sync_torch_tensors_seconds": torch_s,
            "sync_torch_tensors_bytes_per_second": num_bytes / torch_s, "copy_seconds": copy_s,
            "copy_bytes_per_second": num_bytes / copy_s, "config": cfg.model_dump()}


GPU_MODELS = {  # recipes/gpu.yaml's shape (hidden 1024, 16 layers, top-4 of experts 512 wide), more or fewer experts
    "~0.5B": dict(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64, num_experts=18,
                  experts_per_token=4, moe_intermediate_size=512, vocab_size=512),
    "~1B": dict(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64, num_experts=40,
                experts_per_token=4, moe_intermediate_size=512, vocab_size=512),
}


def measure_gpu(name: str, corpus: list[str], repeats: int, workdir: Path) -> dict:
    """Median seconds of each sync, on the controller's own workers of recipes/gpu.yaml with this model."""
    import ray
    import torch

    from zaya_rl.controller import Controller, StageTimes
    from zaya_rl.models import build_checkpoint
    from zaya_rl.recipe import load_recipe

    cfg = TinyModelConfig(**GPU_MODELS[name])
    path = build_checkpoint(cfg, corpus, workdir / name.strip("~"), seed=0)
    # Eager engines start in seconds; a sync does not run the CUDA graphs.
    recipe = load_recipe("recipes/gpu.yaml", [f"model.path={path}", "resources.enforce_eager=true"])
    controller = Controller(recipe, workdir / f"run-{name}")
    engine = controller.rollouts[0]
    seconds: dict[str, list[float]] = {"ipc": [], "sleep_and_ipc": [], "object_store": []}
    try:
        parameters = sum(int(torch.tensor(s).prod()) for s in ray.get(
            controller.learners.workers[0].weight_metadata.remote(torch.bfloat16))["shapes"])
        for _ in range(repeats + 1):  # the first of each is a warm-up
            start = time.perf_counter()
            controller.sync_weights()
            seconds["ipc"].append(time.perf_counter() - start)
            start = time.perf_counter()
            controller.release_engines(StageTimes())
            controller.sync_weights()
            seconds["sleep_and_ipc"].append(time.perf_counter() - start)
            controller.weights_version += 1
            start = time.perf_counter()
            ray.get(engine.load_weights.remote(controller.learners.state_dict_ref(), controller.weights_version))
            seconds["object_store"].append(time.perf_counter() - start)
    finally:
        controller.shutdown()
    medians = {f"{way}_seconds": statistics.median(times[1:]) for way, times in seconds.items()}
    return {"parameters": parameters, "bf16_bytes": 2 * parameters, **medians,
            "object_store_over_ipc": medians["object_store_seconds"] / medians["ipc_seconds"],
            "config": cfg.model_dump()}


def main_gpu(out: Path) -> dict:
    import ray
    import torch

    stream = TaskStream("chain_sum", 0)
    corpus = [t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in GPU_MODELS:
            rows[name] = measure_gpu(name, corpus, repeats=5, workdir=Path(tmp))
            print(f"weight sync {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()
                                                      if k.endswith("seconds")), flush=True)
    ray.shutdown()
    result = {"machine": machine(), "device": torch.cuda.get_device_name(), "rows": rows}
    write_json(out / "gpu" / "weight_sync.json", result)
    print(text_table("\nWeight sync on one card (engine and learner colocated, bf16), median of 5",
                     ["model", "parameters", "CUDA IPC s", "sleep + CUDA IPC s", "object store s", "store / IPC"],
                     [[name, r["parameters"], r["ipc_seconds"], r["sleep_and_ipc_seconds"], r["object_store_seconds"],
                       r["object_store_over_ipc"]] for name, r in rows.items()]))
    return result


def main(argv: list[str] | None = None) -> dict:
    import ray
    import torch

    from zaya_rl.models import train_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="CUDA IPC against the object store on a card")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.gpu:
        return main_gpu(args.out)
    settings = SETTINGS["quick" if args.quick else "full"]
    torch.set_num_threads(THREADS)
    stream = TaskStream("chain_sum", 0)
    tokenizer = train_tokenizer([t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)],
                                TinyModelConfig().vocab_size)
    rows = {}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in settings["models"]:
                rows[name] = measure(name, tokenizer, settings["repeats"], Path(tmp))
                print(f"weight sync {name}: {rows[name]['sync_seconds']:.3f} s "
                      f"(torch tensors: {rows[name]['sync_torch_tensors_seconds']:.3f} s)", flush=True)
    finally:
        ray.shutdown()
    result = {"machine": machine(), "settings": settings, "rows": rows}
    write_json(args.out / "weight_sync.json", result)
    print(text_table("\nWeight sync into a RolloutWorker (object store + in-place vLLM reload) vs a plain copy",
                     ["model", "parameters", "MB", "sync s", "sync MB/s", "as torch tensors s", "ratio", "copy s",
                      "copy MB/s"],
                     [[name, r["parameters"], r["bytes"] / 1e6, r["sync_seconds"], r["sync_bytes_per_second"] / 1e6,
                       r["sync_torch_tensors_seconds"], r["sync_torch_tensors_seconds"] / r["sync_seconds"],
                       r["copy_seconds"], r["copy_bytes_per_second"] / 1e6] for name, r in rows.items()]))
    return result


if __name__ == "__main__":
    main()
