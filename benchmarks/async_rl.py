"""Does asynchronous RL buy speed without costing learning? The default recipe's RL stage from
one warmup checkpoint at staleness bounds 0 (the synchronous loop), 1 and 2
(`algorithm.max_off_policy_steps`), and at 1 and 2 with partial rollouts (new weights between
decode steps of the generations in flight), bounded by steps, side by side: RL steps per second
of the stage's loop (evaluation left out) and the training reward per step.

    python -m benchmarks.async_rl [--recipe recipes/tiny.yaml] [--steps 40] [--out benchmarks/results] [--quick]
                                  [--bounds 0 1 2 ...] [--set KEY=VALUE ...] [--rl-set KEY=VALUE ...]
                                  [--warmup-from CHECKPOINT]

The warmup runs once (`zaya-rl run --stage warmup`-style: the recipe's first stage), or is a
checkpoint given by `--warmup-from` (the recipe's own run's `stages/warmup`); each bound then runs
the RL stage from it (`--stage rl --from`). Writes async_rl.json and
plots/async_rl.png (reward per step, and the reward's running mean over 10 steps) after each
bound, bound 0 first, so a run stopped part-way (a lease's time limit) keeps the bounds it finished. `--quick`
(the suite's): a 60-second warmup, 12 RL steps and 200 held-out problems per source. Through
`zaya-rl run`, so on a GPU recipe with split placement it measures the GPU loop; `--set` overrides
the recipe in every run, `--rl-set` in the RL runs only (one card split in halves: `--recipe
recipes/gpu.yaml --rl-set resources.placement=split --rl-set resources.rollout_gpus=0.5 --rl-set
resources.learner_gpus=0.5 --rl-set deepspeed.length_buckets=4`: the warmup, which has no engine
beside it, keeps the whole card and takes its batch in one pass).
Each run's checkpoints are deleted once its summary is read: only its figures are kept (a GPU
recipe's run checkpoint is about 10 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.report import curves_plot, machine, text_table, write_json
from zaya_rl.recipe import RlStage, SftStage, load_recipe

# Row name -> the RL stage's algorithm settings.
VARIANTS = {"0": {"max_off_policy_steps": 0}, "1": {"max_off_policy_steps": 1}, "2": {"max_off_policy_steps": 2},
            "1 partial": {"max_off_policy_steps": 1, "partial_rollouts": True},
            "2 partial": {"max_off_policy_steps": 2, "partial_rollouts": True}}


def run(recipe: Path, run_dir: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(recipe), "--run-dir", str(run_dir), *extra],
                   check=True)
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="RL steps of each run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="a 60 s warmup, 12 RL steps, 200 held-out problems")
    parser.add_argument("--bounds", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="the rows to run; 0 is needed as the speed-ups' base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every run (as zaya-rl run --set)")
    parser.add_argument("--rl-set", dest="rl_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the RL runs only, not the warmup")
    parser.add_argument("--warmup-from", type=Path, help="a warmup checkpoint to start from instead of running one")
    args = parser.parse_args(argv)
    if "0" not in args.bounds:
        parser.error("--bounds must include 0: the speed-ups are over the synchronous loop")
    common = [arg for override in args.overrides for arg in ("--set", override)]
    common += ["--set", "eval.num_problems=200"] if args.quick else []
    rl_only = [arg for override in args.rl_overrides for arg in ("--set", override)]
    if args.quick:
        args.steps = 12
    recipe = load_recipe(args.recipe, args.overrides + args.rl_overrides)
    warmup = next(s for s in recipe.stages if isinstance(s, SftStage))
    rl = next(s for s in recipe.stages if isinstance(s, RlStage))
    runs = args.out / "runs" / "async_rl"
    if args.warmup_from:
        start = str(args.warmup_from)
    else:
        warmup_stage = warmup.model_dump(mode="json") | ({"max_seconds": 60} if args.quick else {})
        first = run(args.recipe, runs / "warmup", "--set", f"stages={json.dumps([warmup_stage])}", *common)
        shutil.rmtree(runs / "warmup" / "checkpoints", ignore_errors=True)  # the RL runs start from stages/
        start = first["stages"][warmup.name]["checkpoint"]

    rows, rewards = {}, {}
    for name in ["0"] + [b for b in args.bounds if b != "0"]:  # rewritten after each: a stopped run keeps its rows
        algorithm = VARIANTS[name]
        run_dir = runs / f"bound{name.replace(' ', '_')}"
        settings = [arg for key, value in algorithm.items() for arg in ("--set", f"algorithm.{key}={json.dumps(value)}")]
        run(args.recipe, run_dir, "--stage", rl.name, "--from", start,
            "--set", f"stages.{rl.name}.steps={args.steps}", "--set", f"stages.{rl.name}.max_seconds=null",
            *settings, *common, *rl_only)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        rows[name], rewards[f"bound {name}"] = bound_row(run_dir, rl.name)
        result = report(rows, rewards, args, recipe.name)
    print(text_table(f"\n{recipe.name}: {args.steps} RL steps from one warmup, by staleness bound",
                     ["bound", "steps/s", "speed-up", "mean reward", "reward, last half", "held-out sampled",
                      "staleness", "samples spanning an update"],
                     [[b, r["steps_per_second"], r["speedup_over_bound_0"], r["mean_reward"], r["mean_reward_last_half"],
                       r["eval_sampled"], json.dumps(r["staleness_histogram"]), r["partial_samples"]]
                      for b, r in rows.items()]))
    return result


def bound_row(run_dir: Path, stage_name: str) -> tuple[dict, list[float]]:
    """One finished run's row (steps/s of the stage's loop, phases, staleness, rewards, held-out
    accuracy) and its training reward per step, from its summary.json and metrics.jsonl."""
    stage = json.loads((run_dir / "summary.json").read_text())["stages"][stage_name]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] == stage_name and "reward" in r]
    rewards = [r["reward"] for r in steps]
    half = len(rewards) // 2
    row = {"steps": stage["steps"], "loop_seconds": stage["train_seconds"],
           "steps_per_second": stage["steps"] / stage["train_seconds"],
           "phase_seconds": stage["phase_seconds"], "staleness_histogram": stage["staleness_histogram"],
           "dropped_batches": stage["dropped_batches"], "mean_reward": sum(rewards) / len(rewards),
           "mean_reward_last_half": sum(rewards[half:]) / (len(rewards) - half),
           "eval_sampled": stage["eval_sampled"]["accuracy"], "eval_greedy": stage["eval_greedy"]["accuracy"],
           "partial_samples": sum(r["partial_samples"] for r in steps)}
    return row, rewards


def report(rows: dict, rewards: dict, args, recipe_name: str) -> dict:
    """async_rl.json and its plot for the bounds run so far (bound 0 first: the speed-ups' base)."""
    for row in rows.values():
        row["speedup_over_bound_0"] = row["steps_per_second"] / rows["0"]["steps_per_second"]
    result = {"machine": machine(), "recipe": str(args.recipe), "overrides": args.overrides,
              "rl_overrides": args.rl_overrides, "quick": args.quick, "rl_steps": args.steps, "rows": rows}
    write_json(args.out / "async_rl.json", result)
    curves_plot(args.out / "plots" / "async_rl.png", f"{recipe_name}: RL from one warmup at staleness bounds 0-2",
                rewards, {f"bound {b}": [(args.steps, rows[b]["eval_sampled"])] for b in rows})
    return result


if __name__ == "__main__":
    main()
