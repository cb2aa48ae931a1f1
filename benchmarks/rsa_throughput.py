"""Does Markovian RSA keep the engine as busy as plain generation, and does its prompt stay flat?

    python -m benchmarks.rsa_throughput [--quick] [--repeats R] [--out benchmarks/results]

On one vLLM engine (in-process; an untrained tiny MoE as in tests/conftest.py: throughput does
not depend on what the weights know):

1. generated tokens per second of Markovian RSA against plain generation of the same number
   of samples from the questions with the same budget; target ratio >= 0.9. Each RSA round
   sits between two plain calls of its size, and all are timed in wall and in CPU
   seconds of this process (vLLM runs in-process): on a shared, oversubscribed machine wall
   time swung the ratio between 0.5 and 1.2 for identical calls, CPU time much less. One RSA
   run still swung between 0.81 and 0.94 from run to run, so RSA runs R times (default 5,
   --quick 3) and the report gives each run's ratio, their median, and each round's figures
   averaged over the runs;
2. per round: longest prompt (tokens) and seconds, for Markovian RSA (τ < β) and full RSA
   (τ = β, whole traces carried; not paired, to keep the benchmark short).

β = 64 > C·τ = 32, the regime of the report's setting (β = 40K, C·τ = 16K): RSA's extra work
is the prefill of its longer prompts, so the ratio falls as the prompt grows past the budget
(β = 24 with a 99-token prompt measured about 0.7 here). N·problems = 256 = vLLM's CPU
max_num_seqs, so every call fills the engine (on CPU a decode step of this model costs about
the same for 32 sequences as for 256, so a smaller batch would lose throughput to its size,
not to RSA); --quick: 16 problems, T = 2. Prints a table and writes rsa_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from workers.rollout import Rollout
from zaya_rl.models import build_checkpoint
from zaya_rl.recipe import TinyModelConfig
from zaya_rl.rsa import RsaConfig, run_rsa
from zaya_rl.tasks import TaskStream, held_out

NUM_PROBLEMS, ROUNDS = 32, 3
QUICK_NUM_PROBLEMS, QUICK_ROUNDS = 16, 2
REPEATS, QUICK_REPEATS = 5, 3


def paired_rsa(rollout: Rollout, questions: list[str], cfg: RsaConfig) -> dict:
    """RSA, with a plain engine call of the same size (questions only) right before and right
    after each round, so that neither side always runs first (round 0, the same call as plain
    generation, measured 0.91 with plain always second); wall and CPU seconds of both, per
    round and in total, the plain figures the mean of the two calls."""
    plain: list[dict] = []
    cpu_mark = time.process_time()

    def plain_call(size: int, temperature: float) -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        groups = rollout.generate(questions, size, temperature, cfg.budget)
        return (time.perf_counter() - wall, time.process_time() - cpu,
                sum(len(c.token_ids) for g in groups for c in g))

    def generate(prompts: list[str], n: int, temperature: float):
        nonlocal cpu_mark
        size = len(prompts) * n // len(questions)
        before = plain_call(size, temperature)
        out = rollout.generate(prompts, n, temperature, cfg.budget)
        rsa_cpu = time.process_time() - cpu_mark - before[1]  # since the last plain call: tail cutting + engine
        after = plain_call(size, temperature)
        plain.append({"cpu_seconds": rsa_cpu, "plain_seconds": (before[0] + after[0]) / 2,
                      "plain_cpu_seconds": (before[1] + after[1]) / 2,
                      "plain_generated_tokens": round((before[2] + after[2]) / 2),
                      "plain_calls_seconds": before[0] + after[0]})
        cpu_mark = time.process_time()
        return out

    result = run_rsa(generate, rollout.engine.tokenizer, questions, cfg)
    rounds = [{**asdict(stats), **base, "seconds": stats.seconds - base.pop("plain_calls_seconds")}
              for stats, base in zip(result.rounds, plain)]
    return _with_ratios(_summed(rounds), rounds=rounds)


def pooled(runs: list[dict]) -> dict:
    """Runs of `paired_rsa` as one: each round's figures averaged over runs (the longest prompt
    the longest), and each run's ratios with their median."""
    rounds = [{**{key: value / len(runs) for key, value in _summed(same).items()},
               "longest_prompt_tokens": max(r["longest_prompt_tokens"] for r in same)}
              for same in zip(*(run["rounds"] for run in runs))]
    return _with_ratios(
        _summed(rounds), rounds=rounds,
        **{f"runs_{kind}": [run[kind] for run in runs] for kind in ("wall_ratio", "cpu_ratio")},
        **{f"median_{kind}": statistics.median(run[kind] for run in runs) for kind in ("wall_ratio", "cpu_ratio")})


def _summed(rows: list[dict]) -> dict:
    """Every figure of the rows added up, but the longest prompt, which does not add."""
    return {key: sum(r[key] for r in rows) for key in rows[0] if key != "longest_prompt_tokens"}


def _with_ratios(total: dict, **extra) -> dict:
    return {**total, "wall_ratio": _ratio(total, "seconds"), "cpu_ratio": _ratio(total, "cpu_seconds"), **extra}


def _ratio(r: dict, seconds: str) -> float:
    """RSA's generated tokens per second over plain generation's."""
    return (r["generated_tokens"] / r[seconds]) / (r["plain_generated_tokens"] / r[f"plain_{seconds}"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, help="RSA runs, each paired (default 5, --quick 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    num_problems, rounds = (QUICK_NUM_PROBLEMS, QUICK_ROUNDS) if args.quick else (NUM_PROBLEMS, ROUNDS)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)

    model_cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                                num_experts=4, experts_per_token=2, moe_intermediate_size=64)
    stream = TaskStream("chain_sum", 0)
    corpus = [t.prompt + t.solution for level in range(3) for t in stream.take(level, 300)]
    tmp = tempfile.TemporaryDirectory()  # kept until exit: the engine was loaded from it
    checkpoint = build_checkpoint(model_cfg, corpus, Path(tmp.name) / "tiny", seed=0)
    rollout = Rollout("vllm", str(checkpoint), seed=0, max_model_len=model_cfg.max_position_embeddings,
                      torch_threads=2)
    questions = [t.prompt for t in held_out("chain_sum", [1, 2], num_problems)]
    markov = RsaConfig(population=8, tails=4, rounds=rounds, budget=64, tail_tokens=8, temperature=1.0)
    full = replace(markov, tail_tokens=markov.budget)

    # Warm-up at full size: the first large call allocates KV blocks and is not throughput.
    rollout.generate(questions, markov.population, markov.temperature, markov.budget)
    markov_run = pooled([paired_rsa(rollout, questions, replace(markov, seed=seed)) for seed in range(repeats)])
    full_result = rollout.rsa(questions, full)  # unpaired, to keep the benchmark short
    full_run = {"generated_tokens": sum(r.generated_tokens for r in full_result.rounds),
                "seconds": sum(r.seconds for r in full_result.rounds),
                "rounds": [asdict(r) for r in full_result.rounds]}

    print(f"\n{num_problems} problems, N={markov.population} C={markov.tails} T={markov.rounds} "
          f"beta={markov.budget}; each round between two plain calls of {markov.population} samples/question; "
          f"the mean of {repeats} runs")
    print(f"{'round':>5} {'longest prompt':>14} {'gen tok':>8} {'plain tok':>9} {'s':>6} {'plain s':>7} "
          f"{'cpu s':>6} {'plain cpu s':>11} {'ratio wall':>10} {'ratio cpu':>9}   "
          f"Markovian RSA (tau={markov.tail_tokens})")
    for t, row in [*enumerate(markov_run["rounds"]), ("all", markov_run)]:
        print(f"{t:>5} {row.get('longest_prompt_tokens', ''):>14} {row['generated_tokens']:8.0f} "
              f"{row['plain_generated_tokens']:9.0f} {row['seconds']:6.2f} {row['plain_seconds']:7.2f} "
              f"{row['cpu_seconds']:6.2f} {row['plain_cpu_seconds']:11.2f} {_ratio(row, 'seconds'):10.2f} "
              f"{_ratio(row, 'cpu_seconds'):9.2f}")
    print(f"throughput Markovian RSA / plain (target >= 0.9), pooled: {markov_run['wall_ratio']:.2f} wall, "
          f"{markov_run['cpu_ratio']:.2f} CPU; median of runs: {markov_run['median_wall_ratio']:.2f} wall "
          f"({', '.join(f'{x:.2f}' for x in markov_run['runs_wall_ratio'])}), "
          f"{markov_run['median_cpu_ratio']:.2f} CPU ({', '.join(f'{x:.2f}' for x in markov_run['runs_cpu_ratio'])})")
    print(f"\n{'round':>5} {'longest prompt (Markov)':>24} {'s (Markov)':>11} {'longest prompt (full)':>22} "
          f"{'s (full)':>9}")
    for t, (m, f) in enumerate(zip(markov_run["rounds"], full_run["rounds"])):
        print(f"{t:5d} {m['longest_prompt_tokens']:24d} {m['seconds']:11.2f} {f['longest_prompt_tokens']:22d} "
              f"{f['seconds']:9.2f}")
    print(f"{'all':>5} {'':24} {markov_run['seconds']:11.2f} {'':22} {full_run['seconds']:9.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"num_problems": num_problems, "repeats": repeats, "model": model_cfg.model_dump(),
              "markov_config": asdict(markov), "full_config": asdict(full), "markov": markov_run, "full": full_run}
    (args.out / "rsa_throughput.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'rsa_throughput.json'}")
    return report


if __name__ == "__main__":
    main()
