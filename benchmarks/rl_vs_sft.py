"""Does the RL stage earn its compute? The sceptic's baseline beside it: from the same warmup
checkpoint, the RL stage's training time spent instead on SFT over every worked solution the
recipe has; both on the recipe's held-out set, problem by problem, over several seeds.

    python -m benchmarks.rl_vs_sft [--quick] [--recipe recipes/tiny.yaml] [--seeds 0 1 2]
                                   [--out benchmarks/results]

For each seed, through `zaya-rl run --set seed=S`:

1. the recipe as it is: its sft stages (the warmup), then its rl stages;
2. the sceptic: from that run's warmup checkpoint (`--stage more_sft --from`), one sft stage
   over the sources of the recipe's sft stages, at their levels, with the warmup stage's
   settings, for as many steps as the warmup takes in the seconds the rl stages trained (the
   warmup's own seconds per step, measured in the same run); steps, not seconds, bound it, so
   the comparison is one experiment on any machine once the step count is recorded.

Both are evaluated by the controller on the recipe's held-out set (`held_out/<stage>.jsonl`,
one line per problem), so the comparison is paired: per problem, RL's correctness minus the
sceptic's. Per seed: both runs' accuracies (all, per source, per level), the paired difference
with its 95% interval, RL's gain over the warmup the same way, and the training reward of the
first and last 10% of RL steps. Pooled over seeds: the per-problem differences averaged over
the seeds, with the interval over problems. Writes rl_vs_sft.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.report import machine, text_table, write_json
from zaya_rl.evaluate import paired_difference
from zaya_rl.recipe import Recipe, RlStage, SftStage, load_recipe

SCEPTIC = "more_sft"
MODES = ("sampled", "greedy")
# --quick: one seed of a shortened recipe (the suite's 15 minutes); the full run: the recipe as it is.
SETTINGS = {
    "quick": {"seeds": [0], "overrides": ["stages.warmup.steps=150", "stages.rl.steps=40", "eval.num_problems=200"]},
    "full": {"seeds": [0, 1, 2], "overrides": []},
}


def run(recipe_path: Path, run_dir: Path, *options: str) -> dict:
    """`zaya-rl run` of a recipe into `run_dir`; its summary.json, with the job's wall seconds.
    The run's checkpoints (optimizer state, for resuming: 10 GB for recipes/gpu.yaml) are deleted
    once it has finished: the comparison reads held_out/ and summary.json, and the sceptic starts
    from the warmup's stage model (stages/<name>)."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(recipe_path), "--run-dir", str(run_dir), *options],
                   check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["job_seconds"] = time.time() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def problems(run_dir: Path, stage: str) -> dict[str, dict]:
    """The held-out problems of a stage's evaluation, by uid."""
    lines = (run_dir / "held_out" / f"{stage}.jsonl").read_text().splitlines()
    return {row["uid"]: row for row in map(json.loads, lines)}


def interval(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over paired problems with its 95% interval (normal approximation)."""
    d = paired_difference(a, b)
    half = 1.96 * d["standard_error"]
    return {**d, "ci95": [d["difference"] - half, d["difference"] + half], "n": len(a)}


def compare(first: dict[str, dict], second: dict[str, dict], mode: str) -> dict:
    """first - second in `mode` over all problems and per source, paired by problem."""
    uids = sorted(first)
    if set(second) != set(uids):
        raise ValueError("the two evaluations are not over the same held-out problems")
    out = interval([float(first[u][mode]) for u in uids], [float(second[u][mode]) for u in uids])
    sources = sorted({first[u]["source"] for u in uids})
    out["by_source"] = {s: interval([float(first[u][mode]) for u in uids if first[u]["source"] == s],
                                    [float(second[u][mode]) for u in uids if first[u]["source"] == s])
                        for s in sources}
    return out


def accuracies(rows: dict[str, dict], mode: str) -> dict:
    """Accuracy over all problems, per source and per source and level."""
    def mean(values):
        return sum(values) / len(values)

    out = {"all": mean([r[mode] for r in rows.values()]), "by_source": {}}
    for source in sorted({r["source"] for r in rows.values()}):
        mine = [r for r in rows.values() if r["source"] == source]
        levels = sorted({r["level"] for r in mine})
        out["by_source"][source] = {"all": mean([r[mode] for r in mine]),
                                    "by_level": {str(lv): mean([r[mode] for r in mine if r["level"] == lv])
                                                 for lv in levels}}
    return out


def reward_ends(run_dir: Path, stages: list[str]) -> dict:
    """Mean training reward of the first and the last 10% of the rl stages' steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if r["stage"] in stages and "reward" in r]
    tenth = max(1, len(rewards) // 10)
    return {"steps": len(rewards), "first_10pct": sum(rewards[:tenth]) / tenth,
            "last_10pct": sum(rewards[-tenth:]) / tenth}


def sceptic_recipe(recipe_path: Path, overrides: list[str], steps: int) -> dict:
    """The recipe with one sft stage after its stages: the warmup stage's settings and data (every
    worked solution the recipe's sft stages train on, at their levels), `steps` long, evaluated on
    the recipe's held-out set. The run starts at it from the warmup checkpoint (--stage/--from);
    the recipe's own stages stay in it, unrun, because the held-out set is their sources' (an rl
    stage's problems may be all of it). `model.path` stays the recipe's."""
    recipe = load_recipe(recipe_path, overrides)
    sft = [s for s in recipe.stages if isinstance(s, SftStage)]
    if not sft or not any(isinstance(s, RlStage) for s in recipe.stages):
        raise ValueError(f"{recipe_path}: the comparison needs a recipe with sft stages and rl stages")
    levels = sorted({level for s in sft for level in s.levels})
    sources = {source.name: source for s in sft for source in recipe.data_for(s).sources}
    warmup = sft[-1].model_dump(mode="json", exclude={"data", "steps", "epochs", "max_seconds", "levels", "name"})
    out = recipe.model_dump(mode="json")
    out["stages"] = [s.model_dump(mode="json") for s in recipe.stages] + [{
        **warmup, "name": SCEPTIC, "steps": steps, "levels": levels,
        "data": {"sources": [s.model_dump(mode="json") for s in sources.values()]}}]
    return out


def finished_run(run_dir: Path, recipe: Recipe) -> dict:
    """The summary of a finished run of exactly `recipe` (every field but run_dir, every stage
    done), to compare instead of running the recipe again; anything else is refused."""
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    wanted = recipe.model_dump(mode="json")
    differ = sorted(k for k in set(wanted) | set(resolved) if k != "run_dir" and wanted.get(k) != resolved.get(k))
    missing = [s.name for s in recipe.stages if s.name not in summary["stages"]]
    if differ or missing:
        raise ValueError(f"{run_dir} is not a finished run of this recipe (fields that differ: {differ}; "
                         f"stages not run: {missing})")
    return {**summary, "job_seconds": None}


def seed_run(recipe_path: Path, seed: int, overrides: list[str], work: Path, recipe_run: Path | None = None) -> dict:
    """The recipe and the sceptic for one seed; their held-out problems and timings.
    `recipe_run`: a finished run of the recipe at this seed to use instead of a new one."""
    options = [f"--set=seed={seed}"] + [f"--set={item}" for item in overrides]
    recipe = load_recipe(recipe_path, [f"seed={seed}"] + overrides)
    sft_names = [s.name for s in recipe.stages if isinstance(s, SftStage)]
    rl_names = [s.name for s in recipe.stages if isinstance(s, RlStage)]
    rl_dir = recipe_run or work / f"seed{seed}" / "recipe"
    with_rl = finished_run(rl_dir, recipe) if recipe_run else run(recipe_path, rl_dir, *options)
    stages = with_rl["stages"]
    warmup_seconds_per_step = sum(stages[n]["train_seconds"] for n in sft_names) / sum(stages[n]["steps"] for n in sft_names)
    rl_seconds = sum(stages[n]["train_seconds"] for n in rl_names)
    steps = max(1, round(rl_seconds / warmup_seconds_per_step))
    sceptic_path = work / f"seed{seed}" / "sceptic.yaml"
    sceptic_path.parent.mkdir(parents=True, exist_ok=True)
    sceptic_path.write_text(yaml.safe_dump(sceptic_recipe(recipe_path, [f"seed={seed}"] + overrides, steps),
                                           sort_keys=False))
    sceptic_dir = work / f"seed{seed}" / "sceptic"
    sceptic = run(sceptic_path, sceptic_dir, "--stage", SCEPTIC, "--from", stages[sft_names[-1]]["checkpoint"])
    return {
        "warmup": problems(rl_dir, sft_names[-1]), "rl": problems(rl_dir, rl_names[-1]),
        "sceptic": problems(sceptic_dir, SCEPTIC), "reward": reward_ends(rl_dir, rl_names),
        "steps": {"warmup": sum(stages[n]["steps"] for n in sft_names), "rl": sum(stages[n]["steps"] for n in rl_names),
                  "sceptic": steps},
        "train_seconds": {"warmup": sum(stages[n]["train_seconds"] for n in sft_names), "rl": rl_seconds,
                          "sceptic": sceptic["stages"][SCEPTIC]["train_seconds"]},
        "job_seconds": {"recipe": with_rl["job_seconds"], "sceptic": sceptic["job_seconds"]},
    }


def pooled(runs: list[dict], first: str, second: str, mode: str) -> dict:
    """first - second over all seeds: each problem's difference averaged over the seeds, with
    the interval over problems (the seeds share the held-out set)."""
    uids = sorted(runs[0][first])
    return interval([sum(float(r[first][u][mode]) for r in runs) / len(runs) for u in uids],
                    [sum(float(r[second][u][mode]) for r in runs) / len(runs) for u in uids])


def done_when(result: dict) -> dict:
    """Issue 23's three conditions, per mode: the pooled RL - more SFT interval above 0; per seed,
    RL at least 10 points over the warmup and the last 10% of RL steps' training reward above
    the first 10%'s."""
    out = {}
    for mode in MODES:
        seeds = {str(s["seed"]): {"rl_gain_at_least_10_points": s[mode]["rl_minus_warmup"]["difference"] >= 0.10,
                                  "reward_rose": s["training_reward"]["last_10pct"] > s["training_reward"]["first_10pct"]}
                 for s in result["seeds"]}
        beats = result["pooled"][mode]["rl_minus_sceptic"]["ci95"][0] > 0
        out[mode] = {"rl_beats_more_sft_pooled": beats, "seeds": seeds,
                     "met": beats and all(all(v.values()) for v in seeds.values())}
    return out


def summarise(seeds: list[int], runs: list[dict], start: dict, args, settings: dict) -> dict:
    """rl_vs_sft.json's content for the seeds run so far."""
    per_seed = []
    for seed, r in zip(seeds, runs):
        per_seed.append({
            "seed": seed, "steps": r["steps"], "train_seconds": r["train_seconds"], "job_seconds": r["job_seconds"],
            "training_reward": r["reward"],
            **{mode: {"accuracy": {name: accuracies(r[name], mode) for name in ("warmup", "rl", "sceptic")},
                      "rl_minus_sceptic": compare(r["rl"], r["sceptic"], mode),
                      "rl_minus_warmup": compare(r["rl"], r["warmup"], mode),
                      "sceptic_minus_warmup": compare(r["sceptic"], r["warmup"], mode)} for mode in MODES}})
    result = {
        "machine": start, "machine_at_end": machine(), "recipe": str(args.recipe), "quick": args.quick,
        "overrides": settings["overrides"], "seeds": per_seed,
        "pooled": {mode: {"rl_minus_sceptic": pooled(runs, "rl", "sceptic", mode),
                          "rl_minus_warmup": pooled(runs, "rl", "warmup", mode),
                          "sceptic_minus_warmup": pooled(runs, "sceptic", "warmup", mode)} for mode in MODES},
    }
    result["done_when"] = done_when(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed of a shortened recipe")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--recipe-run", type=Path, help="a finished run of the recipe at the first seed (e.g. "
                        "gpu_suite's recipe step's) to compare instead of running it again")
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    seeds = args.seeds or settings["seeds"]
    work = args.out / "runs" / "rl_vs_sft"
    start = machine()
    runs: list[dict] = []
    for seed in seeds:  # the file is rewritten after each seed: a long run reports what it has
        reuse = args.recipe_run if seed == seeds[0] else None
        runs.append(seed_run(args.recipe, seed, settings["overrides"], work, reuse))
        result = summarise(seeds[:len(runs)], runs, start, args, settings)
        write_json(args.out / "rl_vs_sft.json", result)
    per_seed = result["seeds"]
    print(text_table(
        f"\nRL against more SFT from the same warmup ({args.recipe}); held-out accuracy, paired differences "
        "with 95% intervals",
        ["seed", "mode", "warmup", "RL", "more SFT", "RL - SFT", "95% interval", "RL - warmup",
         "reward first/last 10%"],
        [[s["seed"], mode, s[mode]["accuracy"]["warmup"]["all"], s[mode]["accuracy"]["rl"]["all"],
          s[mode]["accuracy"]["sceptic"]["all"], s[mode]["rl_minus_sceptic"]["difference"],
          "[%+.3f, %+.3f]" % tuple(s[mode]["rl_minus_sceptic"]["ci95"]), s[mode]["rl_minus_warmup"]["difference"],
          "%.3f / %.3f" % (s["training_reward"]["first_10pct"], s["training_reward"]["last_10pct"])]
         for s in per_seed for mode in MODES]
        + [["pooled", mode, "", "", "", p["rl_minus_sceptic"]["difference"],
            "[%+.3f, %+.3f]" % tuple(p["rl_minus_sceptic"]["ci95"]), p["rl_minus_warmup"]["difference"], ""]
           for mode, p in result["pooled"].items()]))
    return result


if __name__ == "__main__":
    main()
