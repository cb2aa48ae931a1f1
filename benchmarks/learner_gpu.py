"""Learner benchmark: training tokens/s and MFU of `workers.learner.Learner` on a Qwen3-MoE.

Writes a random-initialised Qwen3-MoE checkpoint (GPU: hidden 2048, 16 layers, 16 experts
top-4, expert width 512: 1.11B parameters, 0.44B active), then for each variant starts a
process that builds the project's `Learner` from it with a `DeepSpeedConfig` and times its
real steps (`sft_step`, or `rl_step` with PPO-clip: collation, forward, log-probs, loss,
backward, fused AdamW step, stats) on sequences of random tokens (1/8 prompt, 7/8 completion).

    MFU = tokens/s * FLOPs per token / peak
    FLOPs per token = 6 * N_active + 6 * L * n_heads * head_dim * T

tokens counts every position the step runs through (prompt + completion). N_active counts
the weights one token multiplies (attention projections, router, top-k experts, LM head; not
the embedding lookup or norms); the second term is causal attention (QK^T and AV, forward +
backward, averaged over positions 0..T-1). The peak is a bf16 8192^3 torch.matmul loop
measured in the same run.

A variant is mode:zero_stage:batch[:option+option]: mode `sft` or `rl`; options `bf16`,
`compile` (regional torch.compile of the decoder layers) and `ckpt` (activation
checkpointing), the `DeepSpeedConfig` fields of those names. Each runs in its own process, so
one that fails or runs out of memory does not take the others with it.

    python -m benchmarks.learner_gpu          # on a GPU machine: benchmarks/results/learner_gpu.json
    python -m benchmarks.learner_gpu --cpu    # the default job's tiny model on CPU, 3.5 min on 2 cores:
                                              # ZeRO-2/3, checkpointing, fp32/bf16 side by side
                                              # (benchmarks/results/learner_cpu.json)

Without CUDA and without --cpu it exits 0 with a message.
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

import torch

RESULTS = Path(__file__).parent / "results" / "learner_gpu.json"
CPU_RESULTS = Path(__file__).parent / "results" / "learner_cpu.json"

SIZES = {
    "1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, head_dim=128, num_experts=16, num_experts_per_tok=4,
               moe_intermediate_size=512, seq_len=2048),
    # recipes/tiny.yaml's model
    "tiny": dict(vocab_size=320, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=256, seq_len=128),
    # a bigger model for CPU runs (benchmarks/lora.py): 140M parameters
    "moe_140m": dict(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                     moe_intermediate_size=512, seq_len=256),
}
GPU_VARIANTS = ("sft:2:8:bf16+compile,rl:2:8:bf16+compile,sft:2:16:bf16+compile,rl:2:16:bf16+compile,"
                "sft:2:8:bf16,sft:3:8:bf16,sft:0:8:bf16+compile,sft:2:16:bf16+compile+ckpt")
CPU_VARIANTS = "sft:2:16,sft:3:16,sft:2:16:ckpt,sft:2:16:bf16,rl:2:16,rl:3:16,rl:2:16:ckpt,rl:2:16:bf16"


def model_config(size: str):
    from transformers import Qwen3MoeConfig

    s = {k: v for k, v in SIZES[size].items() if k != "seq_len"}
    return Qwen3MoeConfig(**s, intermediate_size=s["moe_intermediate_size"] * s["num_experts_per_tok"],
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          max_position_embeddings=SIZES[size]["seq_len"], tie_word_embeddings=False)


def param_counts(c) -> dict:
    """Total parameters, and the matmul weights one token uses (N_active of the MFU formula)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    router = c.hidden_size * c.num_experts
    norms = c.num_hidden_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
    embed = c.vocab_size * c.hidden_size
    total = c.num_hidden_layers * (attn + router + c.num_experts * expert) + 2 * embed + norms
    active = c.num_hidden_layers * (attn + router + c.num_experts_per_tok * expert) + embed  # + LM head
    return {"total": total, "active_matmul": active}


def flops_per_token(c, seq_len: int) -> float:
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
    return 6 * param_counts(c)["active_matmul"] + attention


def matmul_peak_tflops(n: int = 8192, iters: int = 30) -> float:
    """Median bf16 n^3 matmul rate on random data (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


# --- one variant, in its own process -------------------------------------------------------


def write_checkpoint(size: str, path: Path) -> None:
    """A random-initialised model in bf16 (the Learner loads it as fp32), built on the GPU when
    there is one: a CPU init of 1B parameters takes minutes."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3MoeForCausalLM(model_config(size))
    model.to(torch.bfloat16).save_pretrained(path)


def random_batch(vocab_size: int, batch: int, seq_len: int):
    from workers.learner import Sequence

    generator = torch.Generator().manual_seed(1)
    prompt = seq_len // 8
    seqs = []
    for i in range(batch):
        ids = torch.randint(0, vocab_size, (seq_len,), generator=generator).tolist()
        seqs.append(Sequence(ids[:prompt], ids[prompt:], advantage=1.0 if i % 2 == 0 else -1.0))
    return seqs


def run_variant(size: str, checkpoint: str, mode: str, zero_stage: int, batch: int, options: set[str],
                steps: int, warmup: int) -> dict:
    from workers.learner import Learner
    from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig

    on_gpu = torch.cuda.is_available()
    ds = DeepSpeedConfig(zero_stage=zero_stage, bf16="bf16" in options, compile="compile" in options,
                         activation_checkpointing="ckpt" in options)
    learner = Learner(checkpoint, ds, master_port=int(os.environ.get("MASTER_PORT", "29511")),
                      torch_threads=int(os.environ.get("LEARNER_THREADS", "2")))
    config = learner.engine.module.config
    seq_len = SIZES[size]["seq_len"]
    seqs = random_batch(config.vocab_size, batch, seq_len)
    if mode == "rl":  # on-policy at the first step, as after a weight sync
        for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
            seq.old_logprobs = logprobs
    algorithm = AlgorithmConfig(loss="ppo_clip")

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    times, losses, stats = [], [], []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        if mode == "sft":
            stats.append(learner.sft_step(seqs, lr=1e-5))
        else:
            stats.append(learner.rl_step(seqs, lr=1e-5, algorithm=algorithm))
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(stats[-1]["loss"])
    step_s = statistics.median(times)
    tokens = batch * seq_len
    return {
        "mode": mode, "zero_stage": zero_stage, "batch": batch, "options": sorted(options), "seq_len": seq_len,
        "tokens_per_step": tokens, "step_s": step_s, "step_s_spread": [min(times), max(times)],
        "tokens_per_s": tokens / step_s,
        "model_tflops": tokens * flops_per_token(config, seq_len) / step_s / 1e12,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "losses": losses, "grad_norm": stats[-1]["grad_norm"],
        # The first step is on-policy: what is left is the no-grad vs training forward's rounding.
        "first_step_logprob_diff": stats[0].get("mean_abs_logprob_diff"),
        # One graph per direction when the compiled layers share their code; more means recompiles.
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


# --- driver --------------------------------------------------------------------------------


def child(args) -> None:
    mode, zero, batch, *options = args.child.split(":")
    options = set(options[0].split("+")) if options else set()
    result = run_variant(args.size, args.checkpoint, mode, int(zero), int(batch), options, args.steps, args.warmup)
    Path(args.child_out).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help=f"the tiny model on CPU (default variants {CPU_VARIANTS})")
    parser.add_argument("--variants", default=None, help=f"mode:zero:batch[:opts],... (GPU default {GPU_VARIANTS})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results (default {RESULTS} or {CPU_RESULTS})")
    parser.add_argument("--logs", type=Path, default=None, help="write each variant's output here")
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not torch.cuda.is_available() and not args.cpu:
        print("learner_gpu: CUDA is not available; skipping the GPU learner benchmark (--cpu runs the CPU one).")
        return 0
    on_gpu = torch.cuda.is_available() and not args.cpu
    size = "1b" if on_gpu else "tiny"
    variants = (args.variants or (GPU_VARIANTS if on_gpu else CPU_VARIANTS)).split(",")
    out = args.out or (RESULTS if on_gpu else CPU_RESULTS)

    config = model_config(size)
    seq_len = SIZES[size]["seq_len"]
    counts = param_counts(config)
    peak = matmul_peak_tflops() if on_gpu else None
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({len(os.sched_getaffinity(0))} cores)"
    print(f"device {device}; bf16 matmul peak {peak and round(peak, 1)} TFLOP/s; "
          f"params total {counts['total'] / 1e9:.3f}B, active matmul {counts['active_matmul'] / 1e9:.3f}B; "
          f"{flops_per_token(config, seq_len) / 1e9:.2f} GFLOP/token", flush=True)
    checkpoint = Path(tempfile.mkdtemp(prefix="learner_bench_")) / size
    write_checkpoint(size, checkpoint)
    torch.cuda.empty_cache()

    runs = []
    for index, spec in enumerate(variants):
        child_out = checkpoint.parent / f"variant_{index}.json"
        cmd = [sys.executable, "-m", "benchmarks.learner_gpu", "--size", size, "--checkpoint", str(checkpoint),
               "--child", spec, "--child-out", str(child_out), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        env = dict(os.environ, MASTER_PORT=str(29511 + index), LEARNER_THREADS="4" if on_gpu else "2")
        if not on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a GPU machine: the Learner must not see it
        start = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            ok = proc.returncode == 0 and child_out.exists()
            tail = (proc.stdout + proc.stderr)[-3000:]
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{spec.replace(':', '_').replace('+', '_')}.log").write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired as err:
            ok, tail = False, f"timed out after {args.timeout} s\n{(err.stderr or b'')[-2000:]!r}"
        if ok:
            run = {"spec": spec, **json.loads(child_out.read_text())}
            run["mfu"] = run["model_tflops"] / peak if peak else None
        else:
            run = {"spec": spec, "error": tail}
            print(f"--- {spec} failed:\n{tail}", flush=True)
        run["wall_s"] = round(time.time() - start, 1)
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k not in ("losses", "error")}), flush=True)
        # after every variant: a run stopped part-way still leaves what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python -m benchmarks.learner_gpu", *sys.argv[1:]]), "device": device,
            "torch": torch.__version__, "peak_bf16_tflops": peak, "config": SIZES[size], "params": counts,
            "flops_per_token": flops_per_token(config, seq_len),
            "formula": "MFU = tokens/s * (6 * N_active + 6 * L * n_heads * head_dim * T) / peak",
            "runs": runs,
        }, indent=1))
    shutil.rmtree(checkpoint.parent, ignore_errors=True)

    print_table(runs)
    return 0 if all("error" not in r for r in runs) else 1


def print_table(runs: list[dict]) -> None:
    print(f"\n{'variant':<30}{'tokens':>8}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}")
    for r in runs:
        if "error" in r:
            print(f"{r['spec']:<30} FAILED (see output above)")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['max_memory_gb']:.1f}" if r["max_memory_gb"] is not None else "-"
        print(f"{r['spec']:<30}{r['tokens_per_step']:>8}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{r['model_tflops']:>9.3f}{mfu:>7}{mem:>8}")


if __name__ == "__main__":
    sys.exit(main())
