"""Command line: `zaya-rl run [--resume [auto] | --stage NAME --from CKPT] | supervise | validate |
show RECIPE`, `zaya-rl eval` (test-time compute, zaya_rl/evaluate.py) and `zaya-rl report RUN_DIR`
(plots, zaya_rl/report.py); `--set KEY=VALUE` overrides a field of the recipe.

A recipe that cannot be run is reported (file, field, line) with exit code 2 before
anything starts. A run that fails on actors it could not recover exits with EXIT_RESUMABLE;
`zaya-rl supervise` runs the driver again (with --resume auto) after that exit or its death.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from zaya_rl.recipe import EvalConfig, Recipe, RecipeError, RolloutConfig, RsaSettings, dump_recipe, load_recipe
from zaya_rl.rsa import RsaConfig

# EX_TEMPFAIL: the run failed on actors or nodes; a new driver may get past it from the newest checkpoint.
EXIT_RESUMABLE = 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-rl")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (starts a local Ray unless RAY_ADDRESS is set)")
    run.add_argument("recipe")
    run.add_argument("--run-dir", type=Path, help="overrides the recipe's run_dir")
    run.add_argument("--resume", nargs="?", const="auto", choices=["auto"],
                     help="continue from the run directory's newest complete checkpoint, or start anew when it "
                          "has none ('auto'; the bare flag means the same); a checkpoint the recipe cannot "
                          "continue from is refused")
    run.add_argument("--stage", help="start at this stage (skipping the ones before it)")
    run.add_argument("--from", dest="init_from", type=Path,
                     help="with --stage: the HF checkpoint to start from (default: the recipe's model)")
    supervise = sub.add_parser("supervise", help="`run --resume auto`, run again the same way when its driver "
                               "dies or fails on actors (a `ray job submit` entrypoint)")
    supervise.add_argument("recipe")
    supervise.add_argument("--run-dir", type=Path, help="overrides the recipe's run_dir")
    supervise.add_argument("--max-restarts", type=int, default=3, help="drivers started after the first (default 3)")
    validate = sub.add_parser("validate", help="check a recipe and exit")
    validate.add_argument("recipe")
    show = sub.add_parser("show", help="print the fully resolved recipe")
    show.add_argument("recipe")
    for command in (run, supervise, validate, show):
        add_set_argument(command)
    add_eval_parser(sub)
    report = sub.add_parser("report", help="plot a run (finished or running) into PNG files and one HTML page")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="where the page and plots go (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "report":
        return report_command(args.run_dir, args.out or args.run_dir / "report")

    recipe = load_or_report(args.recipe, args.overrides)
    if recipe is None:
        return 2
    if args.command == "validate":
        print(f"{args.recipe}: ok ({len(recipe.stages)} stages)")
        return 0
    if args.command == "show":
        print(dump_recipe(recipe), end="")
        return 0
    if args.command == "supervise":
        if args.max_restarts < 0:
            print(f"zaya-rl: --max-restarts must be >= 0, got {args.max_restarts}", file=sys.stderr)
            return 2
        return supervise_command(args, args.run_dir or recipe.run_dir)

    names = [stage.name for stage in recipe.stages]
    if args.stage is not None and args.stage not in names:
        print(f"zaya-rl: --stage {args.stage!r} is not a stage of {args.recipe} (stages: {names})", file=sys.stderr)
        return 2
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        print(f"zaya-rl: --from {args.init_from}: not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    if recipe.unresolved_paths():
        print(f"zaya-rl: set the environment variables in {recipe.unresolved_paths()} "
              "(the recipe's data and model paths) before running it", file=sys.stderr)
        return 2
    if args.resume and (args.stage or args.init_from):
        print("zaya-rl: --resume takes the position from the checkpoint; drop --stage/--from", file=sys.stderr)
        return 2

    import ray

    from zaya_rl.checkpoint import ResumeError
    from zaya_rl.controller import Controller, LogprobDriftError
    from zaya_rl.deadlines import Hung
    from zaya_rl.placement import PlacementError

    # Faults of actors the run could not recover from (or that came at its start).
    actor_faults = (ray.exceptions.RayActorError, Hung)
    resume_hint = ("`zaya-rl run --resume auto` continues from the newest checkpoint "
                   "(`zaya-rl supervise` does it itself)")
    try:
        controller = Controller(recipe, args.run_dir, resume=args.resume is not None, start_stage=args.stage,
                                init_from=args.init_from)
    except ResumeError as err:
        print(f"zaya-rl: cannot resume: {err}", file=sys.stderr)
        return 2
    except RecipeError as err:  # what only the built model can tell (its tokenizer, its context)
        print(f"zaya-rl: the recipe cannot run on this model: {err}", file=sys.stderr)
        return 2
    except PlacementError as err:
        print(f"zaya-rl: the cluster cannot hold this recipe's resources: {err}", file=sys.stderr)
        return 2
    except actor_faults as err:
        print(f"zaya-rl: the run failed while starting: {type(err).__name__}: {err}\n{resume_hint}", file=sys.stderr)
        return EXIT_RESUMABLE
    try:
        summary = controller.run()
    except LogprobDriftError as err:
        print(f"zaya-rl: stopped: {err}; the run's checkpoints are kept", file=sys.stderr)
        return 1
    except actor_faults as err:
        print(f"zaya-rl: the run failed: {type(err).__name__}: {err}\n{resume_hint}", file=sys.stderr)
        return EXIT_RESUMABLE
    finally:
        controller.shutdown()
    print_summary(summary)
    return 0


def supervise_command(args, run_dir: Path) -> int:
    """Run the recipe's driver with --resume auto until it finishes, stops for a reason of its
    own (exit 0, 1, 2) or has been restarted --max-restarts times. A driver that died (a
    signal: killed, out of memory) or failed on actors (EXIT_RESUMABLE) is started again. Each
    driver's end is appended to RUN_DIR/supervise.jsonl. SIGTERM and SIGINT (`ray job stop`,
    Ctrl-C) go on to the driver and end the supervision."""
    command = [sys.executable, "-m", "zaya_rl.cli", "run", args.recipe, "--resume", "auto", "--run-dir", str(run_dir),
               *(f"--set={item}" for item in args.overrides)]
    stopping: list[int] = []
    driver: subprocess.Popen | None = None

    def stop(signum, frame) -> None:
        stopping.append(signum)
        if driver is not None and driver.poll() is None:
            driver.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run_dir.mkdir(parents=True, exist_ok=True)
    for restart in range(args.max_restarts + 1):
        driver = subprocess.Popen(command)
        code = driver.wait()
        again = not stopping and (code < 0 or code == EXIT_RESUMABLE) and restart < args.max_restarts
        with open(run_dir / "supervise.jsonl", "a") as log:
            log.write(json.dumps({"time": time.time(), "pid": driver.pid, "exit": code, "restarting": again}) + "\n")
        if not again:
            break
        why = f"died of signal {-code}" if code < 0 else "failed on actors"
        print(f"zaya-rl supervise: the driver {why}; starting it again with --resume auto "
              f"({restart + 1} of {args.max_restarts})", file=sys.stderr)
    return code if code >= 0 else 128 - code


def add_set_argument(parser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one recipe field (repeatable): a dotted key, a list element by "
                             "index or name, a YAML value; e.g. --set stages.rl.lr=3e-5 --set rollout.group_size=4")


def load_or_report(path: str, overrides: list[str] = ()):
    """The recipe, or None after printing why it cannot be run (the caller exits with 2)."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as err:
        print(f"zaya-rl: invalid recipe\n{err}", file=sys.stderr)
        return None


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint: Markovian RSA vs sampling and majority vote")
    ev.add_argument("--checkpoint", type=Path, help="checkpoint directory (with --recipe: default RUN_DIR/final)")
    ev.add_argument("--recipe", help="take every source's held-out set, the temperature, seed and RSA settings "
                    "(rollout.rsa) from this recipe")
    ev.add_argument("--population", type=int, help="N: samples per problem (default: rollout.rsa.population or 8)")
    ev.add_argument("--tails", type=int, help="C: candidate tails per aggregation prompt "
                    "(default: rollout.rsa.tails or 4)")
    ev.add_argument("--rounds", type=int, help="T: aggregation rounds (default: rollout.rsa.rounds or 2)")
    ev.add_argument("--budget", type=int, help="beta: max new tokens per rollout (default: rollout.rsa.budget, "
                    "else rollout.max_tokens, else 64)")
    ev.add_argument("--tail-tokens", type=int, help="tau: tokens carried per candidate (default: "
                    "rollout.rsa.tail_tokens, else budget // 2)")
    ev.add_argument("--temperature", type=float, help="default: recipe eval.temperature or 1.0")
    ev.add_argument("--hybrid", action=argparse.BooleanOptionalAction,
                    help="finished candidates pass their final-answer section (default: rollout.rsa.hybrid or off)")
    ev.add_argument("--aggregation-temperature", type=float,
                    help="temperature of the aggregation rounds (default: rollout.rsa.aggregation_temperature, "
                         "else --temperature)")
    ev.add_argument("--continuation", action="store_true", help="Delethink chunking (needs --tails 1)")
    ev.add_argument("--num-problems", type=int, help="problems per source (default: recipe eval.num_problems or 100)")
    ev.add_argument("--levels", type=int, nargs="+", help="held-out levels (default: recipe eval.levels or 1)")
    ev.add_argument("--seed", type=int, help="default: the recipe's seed or 0")
    ev.add_argument("--engines", type=int, help="rollout workers (vLLM engines) in Ray to spread every round "
                    "over (default: resources.num_rollout_workers or 1); Ray is RAY_ADDRESS's or a local one")
    ev.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    ev.add_argument("--out", type=Path, help="write the report here as JSON")
    add_set_argument(ev)


def eval_command(args) -> int:
    """`zaya-rl eval`: settings from the command line, then the recipe, then defaults."""
    from zaya_rl.deadlines import Hung
    from zaya_rl.evaluate import check_context, format_report, run_eval
    from zaya_rl.tasks import held_out, held_out_tasks

    recipe = None
    if args.recipe:
        recipe = load_or_report(args.recipe, args.overrides)
        if recipe is None:
            return 2
    elif args.overrides:
        print("zaya-rl: --set changes a recipe: give --recipe", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint or (recipe.run_dir / "final" if recipe else None)
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        print(f"zaya-rl: no checkpoint at {checkpoint} (give --checkpoint DIR)", file=sys.stderr)
        return 2

    # The recipe's eval settings (or the plain defaults) fill what the command line leaves out.
    base = recipe.eval if recipe else EvalConfig(num_problems=100, levels=[1])
    try:
        cfg = rsa_config(args, recipe)
        levels, num_problems = args.levels or base.levels, args.num_problems or base.num_problems
        # Every source's held-out problems (num_problems each), or chain_sum's without a recipe.
        tasks = (held_out_tasks(recipe.sources(), levels, num_problems) if recipe
                 else held_out("chain_sum", levels, num_problems))
        if not tasks:
            raise ValueError(f"no source of {args.recipe} has a held-out set (see `held_out` in docs/recipes.md)")
        max_model_len = check_context(checkpoint, tasks, cfg)
        engines = args.engines if args.engines is not None else recipe.resources.num_rollout_workers if recipe else 1
        if engines < 1:
            raise ValueError(f"--engines must be >= 1, got {engines}")
    except ValueError as err:
        print(f"zaya-rl: {err}", file=sys.stderr)
        return 2
    try:
        report = run_eval(checkpoint, tasks, cfg, max_model_len, engines, seed=cfg.seed, torch_threads=args.threads,
                          timeouts=recipe.timeouts if recipe else None)
    except Hung as err:
        print(f"zaya-rl: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


def report_command(run_dir: Path, out_dir: Path) -> int:
    from zaya_rl.report import write_report

    if not (run_dir / "metrics.jsonl").is_file():
        print(f"zaya-rl: {run_dir} holds no metrics.jsonl: not a run directory", file=sys.stderr)
        return 2
    page, *plots = write_report(run_dir, out_dir)
    print(f"wrote {page} and its plots: {', '.join(p.name for p in plots)}")
    return 0


def rsa_config(args: argparse.Namespace, recipe: Recipe | None) -> RsaConfig:
    """`zaya-rl eval`'s RSA settings: each flag given, else the recipe's rollout.rsa (β: its
    rollout.max_tokens; temperature: eval.temperature; its seed), else the defaults."""
    rollout, base = (recipe.rollout, recipe.eval) if recipe else (RolloutConfig(), EvalConfig())
    flags = {k: getattr(args, k) for k in RsaSettings.model_fields if getattr(args, k) is not None}
    temperature = args.temperature if args.temperature is not None else base.temperature
    seed = args.seed if args.seed is not None else recipe.seed if recipe else 0
    return rollout.rsa.model_copy(update=flags).config(rollout.max_tokens, temperature, seed, args.continuation)


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
