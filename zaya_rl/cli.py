"""Command line: `zaya-rl run | validate | show RECIPE`.

A recipe that cannot be run is reported (file, field, line) with exit code 2 before
anything starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zaya_rl.recipe import RecipeError, dump_recipe, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-rl")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (starts a local Ray unless RAY_ADDRESS is set)")
    run.add_argument("recipe")
    run.add_argument("--run-dir", type=Path, help="overrides the recipe's run_dir")
    sub.add_parser("validate", help="check a recipe and exit").add_argument("recipe")
    sub.add_parser("show", help="print the fully resolved recipe").add_argument("recipe")
    args = parser.parse_args(argv)

    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as err:
        print(f"zaya-rl: invalid recipe\n{err}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.recipe}: ok ({len(recipe.stages)} stages)")
        return 0
    if args.command == "show":
        print(dump_recipe(recipe), end="")
        return 0

    from zaya_rl.controller import Controller

    controller = Controller(recipe, args.run_dir)
    try:
        summary = controller.run()
    finally:
        controller.shutdown()
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"zaya-rl {summary['recipe']} (seed {summary['seed']})")
    for column in ("stage", "steps", "wall s", "held-out acc (sampled)", "95% CI", "greedy acc", "gen tok/s"):
        table.add_column(column)
    for name, s in summary["stages"].items():
        sampled, greedy = s.get("eval_sampled"), s.get("eval_greedy")
        table.add_row(
            name, str(s["steps"]), f"{s['wall_seconds']:.0f}",
            f"{sampled['accuracy']:.3f}" if sampled else "-",
            "[{:.3f}, {:.3f}]".format(*sampled["ci95"]) if sampled else "-",
            f"{greedy['accuracy']:.3f}" if greedy else "-",
            f"{s['generated_tokens_per_second']:.0f}" if "generated_tokens_per_second" in s else "-",
        )
    Console(width=140).print(table)
    print(f"final checkpoint: {summary['final_checkpoint']}")


if __name__ == "__main__":
    sys.exit(main())
