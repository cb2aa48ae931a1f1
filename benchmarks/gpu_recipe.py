"""Where a GPU run's RL step time goes, and the learner's MFU inside the loop: reads a finished
run of recipes/gpu.yaml (or any GPU recipe with a built-from-config model) and writes the
mean seconds of each phase of an RL step (generate, verify, train, sync: the sync includes the
colocated engine's sleep and wake), the learner's training tokens/s and MFU within its train
phase, and the held-out accuracy after each stage.

    zaya-rl run recipes/gpu.yaml --run-dir runs/gpu
    python -m benchmarks.gpu_recipe --run-dir runs/gpu   # benchmarks/results/gpu/gpu_recipe.json

MFU = training tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x N_active + attention
(benchmarks/learner_gpu.py's formula; N_active: the matmul weights a token uses) at the batch's
mean sequence length, and the peak a bf16 8192^3 matmul measured here, now. A training token is
every position of a sequence (prompt and completion). The first RL step is left out (CUDA graph
and allocator warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.report import machine, text_table, write_json

PHASES = ("generate", "verify", "train", "sync")


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoConfig

    from benchmarks.learner_gpu import flops_per_token, matmul_peak_tflops

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=Path("runs/gpu"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    summary = json.loads((args.run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    rl_name = next(name for name, stage in summary["stages"].items() if stage["kind"] == "rl")
    steps = [r for r in records if r["stage"] == rl_name and "reward" in r][1:]
    config = AutoConfig.from_pretrained(args.run_dir / "final")
    peak = matmul_peak_tflops() * 1e12

    phase = {p: statistics.mean(r.get(f"{p}_seconds", 0.0) for r in steps) for p in PHASES}
    step_seconds = sum(phase.values())
    # Training tokens: every position of every sequence; the completion tokens and their mean
    # response length give the prompt part.
    trained = [r for r in steps if "train_seconds" in r]
    tokens_per_second = statistics.mean(
        r["tokens"] * (1 + r["prompt_tokens"] / max(r["tokens"], 1)) / r["train_seconds"] for r in trained)
    sequence = statistics.mean((r["tokens"] + r["prompt_tokens"]) / r["sequences"] for r in trained)
    mfu = tokens_per_second * flops_per_token(config, int(sequence)) / peak
    result = {
        "machine": machine(), "device": torch.cuda.get_device_name(), "run_dir": str(args.run_dir),
        "recipe": summary["recipe"], "placement": summary.get("placement"), "rl_steps_measured": len(steps),
        "phase_seconds": phase, "step_seconds": step_seconds,
        "phase_share": {p: s / step_seconds for p, s in phase.items()},
        "learner_tokens_per_second": tokens_per_second, "mean_sequence_tokens": sequence,
        "peak_bf16_tflops": peak / 1e12, "learner_mfu": mfu,
        "eval": {name: {"sampled": stage["eval_sampled"]["accuracy"], "greedy": stage.get("eval_greedy", {}).get("accuracy"),
                        "ci95_sampled": stage["eval_sampled"]["ci95"], "steps": stage["steps"],
                        "wall_seconds": stage["wall_seconds"]}
                 for name, stage in summary["stages"].items()},
        "wall_seconds": summary["wall_seconds"],
    }
    write_json(args.out / "gpu" / "gpu_recipe.json", result)
    print(text_table(f"\n{summary['recipe']}: one RL step on {result['device']} ({len(steps)} steps)",
                     ["phase", "seconds", "share"],
                     [[p, phase[p], phase[p] / step_seconds] for p in PHASES] + [["step", step_seconds, 1.0]]))
    print(f"learner inside the loop: {tokens_per_second:,.0f} tokens/s, MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s")
    print(text_table("held-out accuracy after each stage", ["stage", "steps", "sampled", "greedy"],
                     [[n, e["steps"], e["sampled"], e["greedy"]] for n, e in result["eval"].items()]))
    return result


if __name__ == "__main__":
    main()
