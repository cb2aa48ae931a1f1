"""GPU learner benchmark: training tokens/s and MFU of a ~1B-parameter Qwen3-MoE under DeepSpeed.

Builds a random-initialised Qwen3-MoE (hidden 2048, 16 layers, 16 experts top-4, expert width
512: 1.11B parameters, 0.44B active), wraps it in DeepSpeed the way `workers.learner.Learner`
does (torch AdamW, ZeRO stage, gradient clipping 1.0, one micro-batch per step) plus bf16, and
times full training steps (forward, backward, optimizer step) on random token batches.

    MFU = tokens/s * FLOPs per token / peak
    FLOPs per token = 6 * N_active + 6 * L * n_heads * head_dim * T

N_active counts the weights one token multiplies (attention projections, router, top-k
experts, LM head; not the embedding lookup or norms); the second term is causal attention
(QK^T and AV, forward + backward, averaged over positions 0..T-1). The peak is a bf16
8192^3 torch.matmul loop measured in the same run.

Measured on one H200 (benchmarks/results/learner_gpu.json): 17% MFU as the learner runs today
(grouped_mm, ZeRO-2, 8 x 2048 tokens), 34% with regional torch.compile and fused AdamW, 42-44%
at 16-24 x 2048 tokens. The forward passes `use_cache=False`: a KV cache filled during
training made torch.compile build one graph per layer.

Each variant (experts implementation x ZeRO stage x batch) runs in its own process, so one
that fails or runs out of memory does not take the others with it. Without CUDA it exits 0
with a message; `--cpu-smoke` runs the same code path on a tiny config on CPU.

    python -m benchmarks.learner_gpu                  # on a GPU machine
    python -m benchmarks.learner_gpu --cpu-smoke      # 2-3 minutes on CPU: the path runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "learner_gpu.json"

SIZES = {
    "1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, head_dim=128, num_experts=16, num_experts_per_tok=4,
               moe_intermediate_size=512, seq_len=2048),
    "smoke": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, seq_len=64),
}
# impl:zero_stage:batch[:option+option]; options: compile (regional torch.compile of the
# decoder layers), fused (torch's fused AdamW kernel). grouped_mm is what the learner uses;
# eager is HF's per-expert loop; deepspeed_moe is zaya_rl.expert_parallel's DeepSpeed MoE
# layer (ep_size=1 on one GPU).
GPU_VARIANTS = ("eager:2:8,deepspeed_moe:2:8,grouped_mm:2:8,grouped_mm:2:8:fused,grouped_mm:2:8:compile+fused,"
                "grouped_mm:0:8:compile+fused,grouped_mm:2:16:compile+fused,grouped_mm:2:24:compile+fused")
SMOKE_VARIANTS = "grouped_mm:2:2,eager:0:2,deepspeed_moe:2:2"


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


def run_variant(size: str, impl: str, zero_stage: int, batch: int, options: set[str], steps: int,
                warmup: int) -> dict:
    import deepspeed
    from transformers import Qwen3MoeForCausalLM

    from zaya_rl.recipe import DeepSpeedConfig

    on_gpu = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda" if on_gpu else "cpu")
    config = model_config(size)
    seq_len = SIZES[size]["seq_len"]
    torch.manual_seed(0)
    with device:  # initialise on the device: a CPU init of 1B parameters takes minutes
        model = Qwen3MoeForCausalLM(config)
    if impl == "deepspeed_moe":
        from zaya_rl.expert_parallel import convert_to_deepspeed_moe, optimizer_param_groups

        model = convert_to_deepspeed_moe(model, ep_size=1).to(device)
        params = optimizer_param_groups(model)
    else:
        model.set_experts_implementation(impl)
        params = model.parameters()
    if "compile" in options:
        # Regional compilation: one decoder layer's graph, reused by all 16, fuses the norms,
        # rotary and SwiGLU elementwise work that otherwise runs as many memory-bound kernels.
        # A guard that tells the layers apart (the KV cache's did) compiles once per layer; past
        # the default limit of 8 the remaining layers would silently run eager: allow them all.
        torch._dynamo.config.recompile_limit = 4 * config.num_hidden_layers
        for layer in model.model.layers:
            layer.compile()
    model.train()
    total_params = sum(p.numel() for p in model.parameters())

    ds = DeepSpeedConfig(zero_stage=zero_stage)  # the learner's defaults: clip 1.0, no decay
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=ds.weight_decay, fused="fused" in options or None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        # As workers/learner.py, plus bf16 (the learner runs fp32 for engine agreement on CPU).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": True},
    })
    generator = torch.Generator(device=device).manual_seed(1)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    fwd_bwd, opt, losses = [], [], []
    for step in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device, generator=generator)
        sync()
        t0 = time.perf_counter()
        # use_cache=False: otherwise HF fills a KV cache during training, and its per-layer
        # guards made torch.compile build one graph per layer.
        logits = engine(input_ids=ids, use_cache=False).logits
        # The learner's SFT loss: fp32 next-token NLL of every position after the first.
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        engine.backward(loss)
        sync()
        t1 = time.perf_counter()
        engine.step()
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)
            losses.append(float(loss.detach()))
    step_s = statistics.median(a + b for a, b in zip(fwd_bwd, opt))
    tokens = batch * seq_len
    return {
        "impl": impl, "zero_stage": zero_stage, "batch": batch, "options": sorted(options), "seq_len": seq_len,
        "tokens_per_step": tokens, "params_instantiated": total_params,
        "step_s": step_s, "fwd_bwd_s": statistics.median(fwd_bwd), "optimizer_s": statistics.median(opt),
        "tokens_per_s": tokens / step_s,
        "model_tflops": tokens * flops_per_token(config, seq_len) / step_s / 1e12,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "losses": losses,
        # One graph per direction when the compiled layers share their code; more means recompiles.
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


# --- driver --------------------------------------------------------------------------------


def child(args) -> None:
    impl, zero, batch, *options = args.child.split(":")
    options = set(options[0].split("+")) if options else set()
    result = run_variant(args.size, impl, int(zero), int(batch), options, args.steps, args.warmup)
    Path(args.child_out).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU: checks the code path")
    parser.add_argument("--variants", default=None, help=f"impl:zero:batch[:opts],... (GPU default {GPU_VARIANTS})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results (GPU default {RESULTS})")
    parser.add_argument("--logs", type=Path, default=None, help="write each variant's output here")
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("learner_gpu: CUDA is not available; skipping the GPU learner benchmark.")
        return 0
    args.size = "smoke" if args.cpu_smoke else "1b"
    variants = (args.variants or (SMOKE_VARIANTS if args.cpu_smoke else GPU_VARIANTS)).split(",")
    out = args.out or (None if args.cpu_smoke else RESULTS)

    config = model_config(args.size)
    seq_len = SIZES[args.size]["seq_len"]
    counts = param_counts(config)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; bf16 matmul peak {peak and round(peak, 1)} TFLOP/s; "
          f"params total {counts['total'] / 1e9:.3f}B, active matmul {counts['active_matmul'] / 1e9:.3f}B; "
          f"{flops_per_token(config, seq_len) / 1e9:.2f} GFLOP/token", flush=True)

    runs = []
    for index, spec in enumerate(variants):
        child_out = Path(f"/tmp/learner_gpu_{os.getpid()}_{index}.json")
        cmd = [sys.executable, "-m", "benchmarks.learner_gpu", "--size", args.size, "--child", spec,
               "--child-out", str(child_out), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, MASTER_PORT=str(29511 + index))
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
        if out:  # after every variant: a run stopped part-way still leaves what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "command": " ".join(["python -m benchmarks.learner_gpu", *sys.argv[1:]]), "device": device, "torch": torch.__version__, "peak_bf16_tflops": peak,
                "config": SIZES[args.size], "params": counts,
                "flops_per_token": flops_per_token(config, seq_len),
                "formula": "MFU = tokens/s * (6 * N_active + 6 * L * n_heads * head_dim * T) / peak",
                "runs": runs,
            }, indent=1))

    print_table(runs)
    return 0 if all("error" not in r for r in runs) else 1


def print_table(runs: list[dict]) -> None:
    print(f"\n{'variant':<30}{'tokens':>8}{'step s':>9}{'fwd+bwd':>9}{'optim':>8}"
          f"{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}")
    for r in runs:
        if "error" in r:
            print(f"{r['spec']:<30} FAILED (see output above)")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['max_memory_gb']:.1f}" if r["max_memory_gb"] is not None else "-"
        print(f"{r['spec']:<30}{r['tokens_per_step']:>8}{r['step_s']:>9.3f}"
              f"{r['fwd_bwd_s']:>9.3f}{r['optimizer_s']:>8.3f}{r['tokens_per_s']:>11.0f}"
              f"{r['model_tflops']:>9.1f}{mfu:>7}{mem:>8}")


if __name__ == "__main__":
    sys.exit(main())
