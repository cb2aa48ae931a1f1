"""The benchmark suite: where zaya-rl stands beside what a user would pick instead, measured in
one run on this machine.

    python -m benchmarks.run [--quick] [--out benchmarks/results[/quick]] [--run runs/tiny]

Runs each benchmark in its own process (each starts and stops its own Ray and engines; a
failure is retried once and does not stop the others), in order:

1. vs_trl: the default recipe's RL stage against TRL's GRPOTrainer;
2. rollout_throughput: a RolloutWorker against the bare vLLM engine;
3. weight_sync: seconds per sync against model size, beside a plain copy;
4. verifiers: math and code verifications per second;
5. rsa_throughput: Markovian against full RSA, per round;
6. async_rl: RL steps/s and reward per step at staleness bounds 0, 1 and 2.

Each writes its JSON into --out; then this prints the headline table, writes it as Markdown
(headline.md) with suite.json (the machine, its load before and after each benchmark, and the
seconds each took), and draws the PNG plots into --out/plots. `--run`: a finished default job
whose reward and held-out accuracy to plot as well (used when its metrics.jsonl exists).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import bar_chart, curves_plot, machine, markdown_table, text_table, write_json

BENCHMARKS = ["vs_trl", "rollout_throughput", "weight_sync", "verifiers", "rsa_throughput", "async_rl"]


def run_all(names: list[str], quick: bool, out: Path) -> dict:
    """Each benchmark as `python -m benchmarks.NAME`, with the load average around it."""
    runs = {}
    for name in names:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        command = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if quick else [])
        for attempt in (1, 2):  # once more on failure: Ray's 30 s start-up limit fails on an overloaded machine
            print(f"\n=== {' '.join(command[1:])} (attempt {attempt})", flush=True)
            rc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "2"}).returncode
            if rc == 0:
                break
        runs[name] = {"returncode": rc, "attempts": attempt, "seconds": time.perf_counter() - start,
                      "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    return runs


def headline_rows(results: dict[str, dict]) -> list[list]:
    """[benchmark, zaya-rl, alternative, zaya-rl / alternative, target] per headline figure."""
    rows = []
    if r := results.get("vs_trl"):
        ours, trl = r["rows"]["zaya_rl"], r["rows"]["trl"]
        steps = f"{ours['steps']} steps of {r['prompts_per_step']}x{r['group_size']}"
        rows.append([f"RL samples/s vs TRL GRPOTrainer ({steps})", ours["samples_per_second"],
                     trl["samples_per_second"], r["speedup"], ">= 2"])
        for mode in ("sampled", "greedy"):
            a, b = ours["eval"][mode]["accuracy"], trl["eval"][mode]["accuracy"]
            rows.append([f"held-out accuracy after those steps, {mode} (warmup: "
                         f"{r['warmup_eval'][mode]['accuracy']:.3f})", a, b, a / b if b else "-", ">= 1"])
    if r := results.get("rollout_throughput"):
        rows.append(["generated tokens/s, RolloutWorker vs bare vLLM", r["rows"]["RolloutWorker"]["tokens_per_second"],
                     r["rows"]["bare vLLM"]["tokens_per_second"], r["ratio"], ">= 0.9"])
    if r := results.get("weight_sync"):
        name, top = list(r["rows"].items())[-1]
        rows.append([f"weight sync MB/s, {top['parameters'] / 1e6:.0f}M params, vs plain copy",
                     top["sync_bytes_per_second"] / 1e6, top["copy_bytes_per_second"] / 1e6,
                     top["sync_bytes_per_second"] / top["copy_bytes_per_second"], "-"])
        rows.append([f"weight sync MB/s, {top['parameters'] / 1e6:.0f}M params, numpy vs torch tensors in the "
                     "object store", top["sync_bytes_per_second"] / 1e6, top["sync_torch_tensors_bytes_per_second"] / 1e6,
                     top["sync_bytes_per_second"] / top["sync_torch_tensors_bytes_per_second"], "> 1"])
    if r := results.get("verifiers"):
        pools = [k for k in r["rows"] if k.startswith("VerifierPool")]
        plain = r["rows"]["math_verify.verify, one plain process"]["math"]["items_per_second"]
        best = r["rows"][pools[-1]]["math"]["items_per_second"]
        rows.append([f"math verifications/s, {pools[-1]} vs plain math_verify", best, plain, best / plain, "-"])
    if r := results.get("rsa_throughput"):
        last_m, last_f = r["markov"]["rounds"][-1], r["full"]["rounds"][-1]
        t = len(r["markov"]["rounds"]) - 1
        rows.append([f"RSA longest prompt (tokens) at round {t}, Markovian vs full", last_m["longest_prompt_tokens"],
                     last_f["longest_prompt_tokens"], last_m["longest_prompt_tokens"] / last_f["longest_prompt_tokens"], "flat"])
        rows.append([f"RSA seconds of round {t}, Markovian vs full", last_m["seconds"], last_f["seconds"],
                     last_m["seconds"] / last_f["seconds"], "< 1"])
    if r := results.get("async_rl"):
        sync, one = r["rows"]["0"], r["rows"]["1"]
        rows.append([f"RL steps/s, staleness bound 1 vs 0 ({r['rl_steps']} steps)", one["steps_per_second"],
                     sync["steps_per_second"], one["speedup_over_bound_0"], ">= 1.3 on GPU"])
    return rows


def plot_all(results: dict[str, dict], plots: Path, default_run: Path | None) -> list[Path]:
    made = []
    if r := results.get("vs_trl"):
        rows, steps = r["rows"], r["rows"]["zaya_rl"]["steps"]
        warm = r["warmup_eval"]["sampled"]["accuracy"]
        made.append(curves_plot(plots / "vs_trl_curves.png", f"RL from one warmup checkpoint: zaya-rl vs TRL ({steps} steps)",
                                {name: row["rewards"] for name, row in rows.items()},
                                {name: [(0, warm), (row["steps"], row["eval"]["sampled"]["accuracy"])]
                                 for name, row in rows.items()}))
        made.append(bar_chart(plots / "vs_trl_samples_per_second.png", "RL training samples/s (higher is better)",
                              list(rows), {"samples/s": [row["samples_per_second"] for row in rows.values()]}, "samples/s"))
    if default_run is not None and (default_run / "metrics.jsonl").exists():
        made.append(default_job_plot(default_run, plots / "default_job.png"))
    if r := results.get("rollout_throughput"):
        made.append(bar_chart(plots / "rollout_tokens_per_second.png", "Generated tokens/s on the same prompts",
                              list(r["rows"]), {"tokens/s": [x["tokens_per_second"] for x in r["rows"].values()]},
                              "tokens/s"))
    if r := results.get("weight_sync"):
        labels = [f"{x['parameters'] / 1e6:.0f}M" for x in r["rows"].values()]
        series = {"sync into RolloutWorker": "sync_bytes_per_second",
                  "the same, as torch tensors": "sync_torch_tensors_bytes_per_second",
                  "plain copy": "copy_bytes_per_second"}
        made.append(bar_chart(plots / "weight_sync.png", "Weight sync vs plain in-memory copy (MB/s, log scale)", labels,
                              {label: [x[key] / 1e6 for x in r["rows"].values()] for label, key in series.items()},
                              "MB/s", log=True))
    if r := results.get("verifiers"):
        made.append(bar_chart(plots / "verifiers.png", "Math verifications/s", [k.replace(", ", "\n") for k in r["rows"]],
                              {"items/s": [x["math"]["items_per_second"] for x in r["rows"].values()]}, "items/s"))
    if r := results.get("rsa_throughput"):
        labels = [f"round {t}" for t in range(len(r["markov"]["rounds"]))]
        for key, ylabel in (("longest_prompt_tokens", "tokens"), ("seconds", "seconds")):
            made.append(bar_chart(plots / f"rsa_{key}.png", f"RSA per round: {key.replace('_', ' ')}", labels,
                                  {"Markovian": [x[key] for x in r["markov"]["rounds"]],
                                   "full": [x[key] for x in r["full"]["rounds"]]}, ylabel))
    return made


def default_job_plot(run_dir: Path, path: Path) -> Path:
    """Reward per RL step and held-out accuracy at each stage's end, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in records if "reward" in m]
    stage_ends = [m for m in records if "eval_accuracy" in m]
    rl_stage = rl[0]["stage"] if rl else None
    points = [(m["step"] if m["stage"] == rl_stage else 0, m["eval_accuracy"]) for m in stage_ends]
    return curves_plot(path, f"default job {run_dir}", {"zaya-rl": [m["reward"] for m in rl]}, {"zaya-rl": points})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller settings: the whole suite in under 15 minutes")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results, or benchmarks/results/quick "
                        "with --quick (so that quick figures never replace full ones)")
    parser.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a finished default job to plot")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=BENCHMARKS,
                        help="run only these; with no names, only redraw the tables and plots from --out")
    args = parser.parse_args(argv)
    args.out = args.out or Path("benchmarks/results/quick" if args.quick else "benchmarks/results")
    start, before = time.perf_counter(), machine()
    runs = run_all(args.only, args.quick, args.out)
    # Benchmarks not run this time (--only) keep their last results.
    results = {name: json.loads((args.out / f"{name}.json").read_text()) for name in BENCHMARKS
               if (args.out / f"{name}.json").exists() and runs.get(name, {}).get("returncode", 0) == 0}
    rows = headline_rows(results)
    header = ["benchmark", "zaya-rl", "alternative", "ratio", "target"]
    plots = plot_all(results, args.out / "plots", args.run)
    suite = {"quick": args.quick, "machine_at_start": before, "machine_at_end": machine(),
             "seconds": time.perf_counter() - start, "benchmarks": runs, "plots": [str(p) for p in plots]}
    if runs:  # a redraw (--only with no names) keeps the last run's record
        write_json(args.out / "suite.json", suite)
    (args.out / "headline.md").write_text(
        f"{'--quick, ' if args.quick else ''}{before['date']}, {before['cpus']} CPUs ({before['machine']}), "
        f"load average {before['load_average'][0]} at start, {suite['machine_at_end']['load_average'][0]} at end; "
        f"{suite['seconds']:.0f} s\n\n" + markdown_table(header, rows) + "\n")
    print(text_table("\nHeadline", header, rows))
    print(text_table("\nBenchmarks", ["benchmark", "exit", "seconds", "load before", "load after"],
                     [[n, r["returncode"], r["seconds"], r["load_before"], r["load_after"]] for n, r in runs.items()]))
    print(f"suite: {suite['seconds']:.0f} s; wrote {args.out / 'headline.md'}, {args.out / 'suite.json'}, "
          f"{len(plots)} plots")
    if any(r["returncode"] for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
