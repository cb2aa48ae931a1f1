"""LoRA against full fine-tuning in the learner: memory, step time and checkpoint size, side by side.

For each model, each mode builds the project's `Learner` from one random-initialised Qwen3-MoE
checkpoint with the CPU default job's DeepSpeed settings (ZeRO-2, fp32) and times its real
`rl_step` (PPO-clip, on-policy, collation to optimizer step) on a batch of random tokens (1/8
prompt, 7/8 completion):

- `full`: every weight trains (the default);
- `lora`: `deepspeed.lora` with its default targets, the attention projections and the fused
  expert weights (one adapter per expert), rank 8, alpha 16;
- `lora_attention`: the same on the attention projections alone.

Each mode runs in its own process, so memory is the mode's own: `learner_mib` is the process's
peak resident memory during the timed steps (the kernel's high-water mark, reset once the
learner is built) less its resident memory just before the learner was built (torch, DeepSpeed
and transformers imported): weights, gradients, optimizer state and activations. `step_s` is the
median of the timed steps; the modes alternate for `--rounds` rounds, so a shared machine's
changing load weighs them alike, and the table gives each mode's median over rounds. After the
steps each mode writes a run checkpoint's learner part (`save_checkpoint_model`, `save_state`)
and reports its size.

Models: `tiny` is the CPU default job's (recipes/tiny.yaml, 1.9M parameters, 128 tokens a
sequence); `moe_140m` a bigger CPU one (hidden 512, 8 layers, 16 experts top-4, vocabulary
32768: 140M parameters, 256 tokens a sequence), where weights and optimizer state outweigh
torch's own memory.

    python -m benchmarks.lora                      # both models: benchmarks/results/lora.json
    python -m benchmarks.lora --sizes tiny --rounds 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.learner_gpu import SIZES, model_config, param_counts, random_batch, write_checkpoint
from benchmarks.report import machine, markdown_table, text_table, write_json

RESULTS = Path(__file__).parent / "results" / "lora.json"
MODES = ("full", "lora", "lora_attention")
BATCH = {"tiny": 16, "moe_140m": 8}  # sequences a step; their length is learner_gpu.SIZES' seq_len


def lora_settings(mode: str):
    from zaya_rl.recipe import LoraSettings

    if mode == "full":
        return None
    if mode == "lora":
        return LoraSettings(rank=8, alpha=16)
    return LoraSettings(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])


def resident_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its high-water mark (VmHWM), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- one mode, in its own process ---------------------------------------------------------


def run_mode(size: str, checkpoint: str, mode: str, steps: int, warmup: int, out_dir: Path) -> dict:
    import deepspeed  # noqa: F401  (imported before the baseline: its memory is no learner's)
    import torch
    from transformers import Qwen3MoeForCausalLM  # noqa: F401  (the model code, likewise)

    from workers.learner import Learner, free_port
    from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig

    before = resident_mib()
    learner = Learner(checkpoint, DeepSpeedConfig(zero_stage=2, lora=lora_settings(mode)), master_port=free_port(),
                      torch_threads=int(os.environ.get("LEARNER_THREADS", "2")))
    built = resident_mib()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current size
    seq_len, batch = SIZES[size]["seq_len"], BATCH[size]
    seqs = random_batch(learner.engine.module.config.vocab_size, batch, seq_len)
    for seq, logprobs in zip(seqs, learner.logprobs(seqs)):  # on-policy, as after a weight sync
        seq.old_logprobs = logprobs
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        stats = learner.rl_step(seqs, lr=1e-5, algorithm=AlgorithmConfig(loss="ppo_clip"))
        if step >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(stats["loss"])
    peak = resident_mib("VmHWM")
    learner.save_checkpoint_model(str(out_dir / "model"))
    learner.save_state(str(out_dir / "optimizer"))
    module = learner.engine.module
    adam = learner.engine.optimizer.optimizer.state.values()  # ZeRO-2 wraps torch's AdamW
    return {
        "mode": mode, "seq_len": seq_len, "batch": batch, "tokens_per_step": seq_len * batch,
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "adam_state_mib": sum(t.numel() * t.element_size() for s in adam for t in s.values()
                              if torch.is_tensor(t)) / 2**20,
        "resident_before_learner_mib": before, "resident_after_build_mib": built, "peak_during_steps_mib": peak,
        "learner_mib": peak - before,
        "step_s": statistics.median(times), "step_s_spread": [min(times), max(times)], "losses": losses,
        "checkpoint_mib": {"model": directory_bytes(out_dir / "model") / 2**20,
                           "optimizer": directory_bytes(out_dir / "optimizer") / 2**20},
    }


# --- driver --------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """Each (size, mode)'s median over rounds, with LoRA's ratios to full fine-tuning."""
    rows = []
    for size in dict.fromkeys(r["size"] for r in runs):
        by_mode = {}
        for mode in MODES:
            done = [r for r in runs if r["size"] == size and r["mode"] == mode and "error" not in r]
            if done:
                by_mode[mode] = {
                    "size": size, "mode": mode, "rounds": len(done), "parameters": done[0]["parameters"],
                    "trainable_parameters": done[0]["trainable_parameters"],
                    "adam_state_mib": done[0]["adam_state_mib"],
                    "learner_mib": statistics.median(r["learner_mib"] for r in done),
                    "step_s": statistics.median(r["step_s"] for r in done),
                    "checkpoint_mib": sum(done[0]["checkpoint_mib"].values()),
                }
        full = by_mode.get("full")
        for row in by_mode.values():
            if full:
                row["memory_vs_full"] = row["learner_mib"] / full["learner_mib"]
                row["step_time_vs_full"] = row["step_s"] / full["step_s"]
            rows.append(row)
    return rows


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["size"], r["mode"], f"{r['trainable_parameters'] / 1e6:.3g}M of {r['parameters'] / 1e6:.3g}M",
             r["learner_mib"], r.get("memory_vs_full", "-"), r["step_s"], r.get("step_time_vs_full", "-"),
             r["adam_state_mib"], r["checkpoint_mib"]] for r in rows]


HEADER = ["model", "mode", "trainable", "learner MiB", "vs full", "step s", "vs full", "Adam state MiB",
          "checkpoint MiB"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,moe_140m", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--rounds", type=int, default=2, help="times each mode runs, the modes alternating")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # SIZE:MODE:CHECKPOINT:OUT_DIR
    args = parser.parse_args()
    if args.child:
        size, mode, checkpoint, out_dir = args.child.split(":")
        result = run_mode(size, checkpoint, mode, args.steps, args.warmup, Path(out_dir))
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
        return 0

    started = machine()
    work = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    runs = []
    try:
        for size in args.sizes.split(","):
            checkpoint = work / size
            write_checkpoint(size, checkpoint)
            print(f"{size}: {param_counts(model_config(size))['total'] / 1e6:.1f}M parameters", flush=True)
            for round_index in range(args.rounds):
                for mode in MODES:
                    out_dir = work / f"{size}-{mode}-{round_index}"
                    out_dir.mkdir()
                    command = [sys.executable, "-m", "benchmarks.lora", "--child",
                               f"{size}:{mode}:{checkpoint}:{out_dir}", "--steps", str(args.steps),
                               "--warmup", str(args.warmup)]
                    start = time.time()
                    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                    if proc.returncode == 0:
                        run = {"size": size, "round": round_index, **json.loads((out_dir / "result.json").read_text())}
                    else:
                        run = {"size": size, "round": round_index, "mode": mode,
                               "error": (proc.stdout + proc.stderr)[-3000:]}
                        print(f"--- {size} {mode} failed:\n{run['error']}", flush=True)
                    run["wall_s"] = round(time.time() - start, 1)
                    runs.append(run)
                    print(json.dumps({k: v for k, v in run.items() if k not in ("losses", "error")}), flush=True)
                    shutil.rmtree(out_dir)
                    write_results(args, started, runs)  # after every run: a cut-short run keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + text_table("LoRA against full fine-tuning: learner rl_step, ZeRO-2 fp32, one rank",
                            HEADER, table_rows(summarise(runs))))
    return 0 if all("error" not in r for r in runs) else 1


def write_results(args, started: dict, runs: list[dict]) -> None:
    rows = summarise(runs)
    write_json(args.out, {
        "command": " ".join(["python -m benchmarks.lora", *sys.argv[1:]]), "machine_at_start": started,
        "machine_at_end": machine(), "sizes": {s: {**SIZES[s], "batch": BATCH[s]} for s in args.sizes.split(",")},
        "table": markdown_table(HEADER, table_rows(rows)), "summary": rows, "runs": runs,
    })


if __name__ == "__main__":
    sys.exit(main())
