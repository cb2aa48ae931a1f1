"""Does RL earn its wall time? The default recipe (warmup, then RL) beside the sceptic's
alternative: continue the warmup (SFT) from the same warmup checkpoint for as long as the RL
stage trained, then evaluate on the same held-out set.

    python -m benchmarks.warmup_vs_rl [--recipe recipes/tiny.yaml] [--out benchmarks/results] [--run runs/tiny]

Prints a table and writes warmup_vs_rl.json. Both runs go through `zaya-rl run`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from zaya_rl.recipe import RlStage, SftStage, load_recipe


def run(recipe_path: Path, run_dir: Path) -> dict:
    start = time.time()
    subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(recipe_path), "--run-dir", str(run_dir)],
                   check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["job_seconds"] = time.time() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--run", type=Path, help="a finished run of the recipe (e.g. the default job's "
                        "runs/tiny) to compare against, instead of running it again")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    warmup = next(s for s in recipe.stages if isinstance(s, SftStage))
    rl = next(s for s in recipe.stages if isinstance(s, RlStage))
    args.out.mkdir(parents=True, exist_ok=True)

    if args.run is not None:
        with_rl = json.loads((args.run / "summary.json").read_text())
        with_rl["job_seconds"] = None
    else:
        with_rl = run(args.recipe, args.out / "runs" / "warmup_then_rl")
    rl_seconds = with_rl["stages"][rl.name]["train_seconds"]

    baseline = recipe.model_dump(mode="json")
    baseline["model"]["path"] = with_rl["stages"][warmup.name]["checkpoint"]
    baseline["stages"] = [{**warmup.model_dump(mode="json"), "name": "warmup_continued", "steps": 10**6,
                           "max_seconds": rl_seconds, "warmup_steps": 0}]
    baseline_path = args.out / "warmup_continued.yaml"
    baseline_path.write_text(yaml.safe_dump(baseline, sort_keys=False))
    continued = run(baseline_path, args.out / "runs" / "warmup_continued")

    rows = [("after warmup", with_rl["stages"][warmup.name]),
            (f"warmup + RL ({rl_seconds:.0f} s)", with_rl["stages"][rl.name]),
            (f"warmup + more SFT ({rl_seconds:.0f} s)", continued["stages"]["warmup_continued"])]
    print(f"\nheld-out accuracy, {recipe.eval.num_problems} problems, levels {recipe.eval.levels}, seed {recipe.seed}")
    print(f"{'run':34} {'sampled (T=%g)' % recipe.eval.temperature:>16} {'95% CI':>16} {'greedy':>8} {'95% CI':>16}")
    table = []
    for name, stage in rows:
        s, g = stage["eval_sampled"], stage["eval_greedy"]
        print(f"{name:34} {s['accuracy']:16.3f} {'[%.3f, %.3f]' % tuple(s['ci95']):>16} "
              f"{g['accuracy']:8.3f} {'[%.3f, %.3f]' % tuple(g['ci95']):>16}")
        table.append({"run": name, "sampled": s, "greedy": g, "steps": stage["steps"],
                      "train_seconds": stage["train_seconds"]})
    result = {"recipe": str(args.recipe), "seed": recipe.seed, "rows": table,
              "job_seconds": {"warmup_then_rl": with_rl["job_seconds"], "warmup_continued": continued["job_seconds"]}}
    (args.out / "warmup_vs_rl.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
