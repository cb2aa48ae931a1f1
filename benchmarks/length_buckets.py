"""What do length buckets save when aggregation prompts join a batch?

    python -m benchmarks.length_buckets [--steps 6] [--out benchmarks/results]

The learner feeds each pass one right-padded (batch, time) tensor, so one long sequence makes
every sequence of the pass as long. Aggregation prompts (Markovian RSA, `aggregation_share`)
carry C = 4 tails and run to ~170 tokens beside ~30 for a plain chain-sum prompt and its
solution. `deepspeed.length_buckets` splits each step into passes over sequences of similar
length and accumulates the gradient (the same update: tests/unit/test_learner.py).

On the tiny MoE of recipes/tiny.yaml (one DeepSpeed rank, ZeRO-2, 2 threads): the median
seconds of an SFT step of 64 sequences and of an RL step of 128 (16 prompts x 8), for
aggregation shares 0, 0.25 and 0.5 and 1, 2 and 3 buckets. The configurations take turns
step by step, so machine noise falls on all of them alike. Prints a table and writes
length_buckets.json with each time and its ratio to one bucket.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from workers.learner import Learner, Sequence, free_port
from zaya_rl import rsa
from zaya_rl.models import build_checkpoint, load_tokenizer
from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig, load_recipe
from zaya_rl.tasks import TaskStream

SHARES, BUCKETS, TAILS, TAIL_TOKENS = (0.0, 0.25, 0.5), (1, 2, 3), 4, 32


def make_batch(tokenizer, tasks, share: float, size: int, rng: random.Random, rl: bool) -> list[Sequence]:
    """`size` sequences of a prompt and its worked solution; the first `share` of them prompted
    as aggregation prompts whose candidates are other tasks' solutions, cut to τ tokens."""
    eos = [tokenizer.eos_token_id]
    out = []
    for i in range(size):
        task = tasks[i % len(tasks)]
        prompt = task.prompt
        if i < round(share * size):
            tails = rsa.last_tokens([t.solution for t in rng.sample(tasks, TAILS)], TAIL_TOKENS, tokenizer)
            prompt = rsa.aggregation_prompt(task.prompt, tails)
        completion = tokenizer(task.solution)["input_ids"] + eos
        out.append(Sequence(tokenizer(prompt)["input_ids"], completion, advantage=1.0 if i % 2 else -1.0,
                            old_logprobs=[-1.0] * len(completion) if rl else None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one untimed)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    recipe = load_recipe("recipes/tiny.yaml")
    stream = TaskStream("chain_sum", recipe.seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [t.prompt + t.solution for level in range(recipe.tasks.max_level + 1) for t in stream.take(level, 500)]
        checkpoint = build_checkpoint(recipe.model.tiny, corpus, Path(tmp) / "tiny", recipe.seed)
        tokenizer = load_tokenizer(checkpoint)
        tasks = stream.take(1, 128)
        learners = {b: Learner(str(checkpoint), DeepSpeedConfig(length_buckets=b), master_port=free_port(),
                               torch_threads=recipe.resources.torch_threads) for b in BUCKETS}
        rng = random.Random(0)
        batches = {(kind, share): make_batch(tokenizer, tasks, share, 64 if kind == "sft" else 128, rng, kind == "rl")
                   for kind in ("sft", "rl") for share in SHARES}
        seconds: dict[tuple, list[float]] = {(kind, share, b): [] for (kind, share) in batches for b in BUCKETS}
        for step in range(args.steps + 1):
            for (kind, share, b), times in seconds.items():
                batch, learner = batches[kind, share], learners[b]
                start = time.perf_counter()
                if kind == "sft":
                    learner.sft_step(batch, lr=1e-4)
                else:
                    learner.rl_step(batch, lr=1e-5, algorithm=AlgorithmConfig())
                if step:  # the first round warms allocators and caches
                    times.append(time.perf_counter() - start)
    rows = []
    for (kind, share, b), times in seconds.items():
        base = statistics.median(seconds[kind, share, 1])
        batch = batches[kind, share]
        rows.append({"step": kind, "aggregation_share": share, "length_buckets": b,
                     "sequences": len(batch), "tokens": sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch),
                     "padded_tokens": len(batch) * max(len(s.prompt_ids) + len(s.completion_ids) for s in batch),
                     "median_seconds": statistics.median(times), "ratio_to_one_bucket": statistics.median(times) / base})
    print(f"tiny MoE, 1 rank, ZeRO-2, median of {args.steps} steps; aggregation prompts carry {TAILS} tails of "
          f"<= {TAIL_TOKENS} tokens")
    print("| step | aggregation share | tokens | padded (1 bucket) | buckets | seconds | ratio to 1 bucket |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} x{r['sequences']} | {r['aggregation_share']} | {r['tokens']} | {r['padded_tokens']} | "
              f"{r['length_buckets']} | {r['median_seconds']:.3f} | {r['ratio_to_one_bucket']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "length_buckets.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
