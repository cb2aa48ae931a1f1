"""How long a run stalls when an actor or the driver dies: the four faults of the
fault-tolerance tests, each injected into its own run of a small recipe through real Ray.

    python -m benchmarks.fault_recovery [--recipe tests/e2e/faults.yaml] [--out benchmarks/results]

For each fault: the stall (from the kill to the next RL step logged, less one normal step),
the controller's own recovery time where it restored a checkpoint, and the steps redone.
Prints a table and writes fault_recovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.chaos import records, signal_mid_call, start_run, stop, wait_for_step

FAULTS = {  # name: (actor class, method), or None for the driver
    "rollout worker, mid-generate": ("RolloutWorker", "generate"),
    "verifier, mid-score": ("Verifier", "score"),
    "learner, mid-step": ("LearnerWorker", "rl_step"),
    "driver, mid-stage (then --resume)": None,
}


def rl_times(run_dir: Path) -> list[float]:
    return [r["time"] for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]


def measure(recipe: Path, run_dir: Path, target) -> dict:
    proc = start_run(recipe, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 5, proc)
        if target is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = time.time()
            proc.wait(timeout=60)
            done_before = len(rl_times(run_dir))
            proc = start_run(recipe, run_dir, "--resume")
        else:
            signal_mid_call(*target, signal.SIGKILL, proc.pid)
            killed = time.time()
            done_before = len(rl_times(run_dir))
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"the run failed; see {run_dir}.log")
    finally:
        stop(proc)
    times = rl_times(run_dir)
    step_seconds = statistics.median(b - a for a, b in zip(times, times[1:]))
    next_step = min(t for t in times if t > killed)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "stall_seconds": next_step - killed - step_seconds,
        "normal_step_seconds": step_seconds,
        "controller_recovery_seconds": [r["recovery_seconds"] for r in summary["recoveries"]],
        "steps_redone": done_before - sum(1 for t in times if t < killed),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", type=Path, default=Path("tests/e2e/faults.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zaya-faults-"))
    rows = {name: measure(args.recipe, work / f"run{i}", target) for i, (name, target) in enumerate(FAULTS.items())}
    print(f"\nfault recovery, {args.recipe} ({os.cpu_count()} CPUs, {platform.machine()})")
    print(f"{'fault':36} {'stall s':>8} {'step s':>7} {'restore s':>10} {'steps redone':>13}")
    for name, row in rows.items():
        restore = ", ".join(f"{s:.1f}" for s in row["controller_recovery_seconds"]) or "-"
        print(f"{name:36} {row['stall_seconds']:8.1f} {row['normal_step_seconds']:7.2f} {restore:>10} "
              f"{row['steps_redone']:13d}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "recipe": str(args.recipe), "cpus": os.cpu_count(), "rows": rows}
    (args.out / "fault_recovery.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
