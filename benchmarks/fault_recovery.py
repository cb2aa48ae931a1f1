"""How a run notices a fault and how long it takes to go on: each fault of the fault-tolerance
tests injected into its own run of a small recipe through real Ray.

    python -m benchmarks.fault_recovery [--recipe tests/e2e/faults.yaml] [--out benchmarks/results]

Faults: an actor of each role killed (SIGKILL) or hung (SIGSTOP; the runs have the tests' short
deadlines) in the middle of a call; the driver killed under `zaya-rl supervise`; a second Ray node
holding the rollout worker and the verifier lost (the recipe prefers its label). For each: detection
(from the fault to the run's first record of it: a recovery event, or the supervisor seeing its
driver end), recovery (from there to the next RL step logged), the RL steps lost (indices not
logged exactly once in the end: 0 is the promise) and redone (logged before the fault, rolled
back by a checkpoint restore), and the events the run recorded. Prints a table and writes
fault_recovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.chaos import (driver_pids, lose_node, records, signal_mid_call, start_node, start_run, stop,
                              stop_node, wait_for_nodes, wait_for_step)
from zaya_rl.recipe import load_recipe

# As tests/e2e/test_fault_tolerance.py: deadlines of a few tens of seconds.
SHORT_DEADLINES = ("--set", "timeouts.min_seconds=20", "--set", "timeouts.score_seconds_per_item=0.5")
# As the test: the second node's label, preferred by the rollout worker and the verifier.
SECOND_NODE = {"zaya-node": "second"}
ON_SECOND_NODE = ("--set", f"resources.prefer_nodes={{rollout: {SECOND_NODE}, verifier: {SECOND_NODE}}}")


@dataclass(frozen=True)
class Fault:
    inject: Callable[[subprocess.Popen, Path, object], float]  # (run, run dir, second node or None) -> when
    extra: tuple[str, ...] = ()
    command: str = "run"
    two_nodes: bool = False


def mid_call(actor_class: str, method: str, sig: int) -> Callable[[subprocess.Popen, Path, object], float]:
    def inject(run: subprocess.Popen, run_dir: Path, node) -> float:
        signal_mid_call(actor_class, method, sig, run.pid)
        return time.time()
    return inject


def kill_driver(run: subprocess.Popen, run_dir: Path, node) -> float:
    [pid] = driver_pids(run_dir)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def lose_second_node(run: subprocess.Popen, run_dir: Path, node) -> float:
    struck = time.time()
    lose_node(node)
    return struck


FAULTS = {
    "rollout worker killed mid-generate": Fault(mid_call("RolloutWorker", "generate", signal.SIGKILL)),
    "verifier killed mid-score": Fault(mid_call("Verifier", "score", signal.SIGKILL)),
    "learner killed mid-step": Fault(mid_call("LearnerWorker", "rl_step", signal.SIGKILL)),
    "rollout worker hung mid-generate": Fault(mid_call("RolloutWorker", "generate", signal.SIGSTOP), SHORT_DEADLINES),
    "verifier hung mid-score": Fault(mid_call("Verifier", "score", signal.SIGSTOP), SHORT_DEADLINES),
    "learner hung mid-step": Fault(mid_call("LearnerWorker", "rl_step", signal.SIGSTOP), SHORT_DEADLINES),
    "driver killed (zaya-rl supervise)": Fault(kill_driver, command="supervise"),
    "node lost (a rollout worker, a verifier)": Fault(lose_second_node, ON_SECOND_NODE, two_nodes=True),
}


def rl_times(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["time"]) for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]


def measure(recipe: Path, run_dir: Path, fault: Fault, rl_steps: int) -> dict:
    head = node = None
    address = None
    if fault.two_nodes:
        head, address = start_node(num_cpus=2)
        node, _ = start_node(num_cpus=1, head_address=address, labels=SECOND_NODE)
        wait_for_nodes(address, 2)
    proc = start_run(recipe, run_dir, *fault.extra, command=fault.command, ray_address=address)
    try:
        wait_for_step(run_dir, "rl", "reward", 4, proc)
        injected = fault.inject(proc, run_dir, node)
        done_before = len(rl_times(run_dir))
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"the run failed; see {run_dir}.log")
    finally:
        stop(proc)
        for ray_node in (node, head):
            if ray_node is not None:
                stop_node(ray_node)
    steps = rl_times(run_dir)
    times = [t for _, t in steps]
    events = json.loads((run_dir / "summary.json").read_text())["recoveries"]
    # The run's first record of the fault: a recovery event, or the supervisor seeing its driver end.
    supervised = run_dir / "supervise.jsonl"
    ends = [json.loads(line)["time"] for line in supervised.read_text().splitlines()] if supervised.exists() else []
    detected = min(t for t in [e["detected_at"] for e in events] + ends if t >= injected)
    logged = [step for step, _ in steps]
    return {
        "detection_seconds": detected - injected,
        "recovery_seconds": min(t for t in times if t > detected) - detected,
        "steps_lost": sum(logged.count(i) != 1 for i in range(rl_steps)) + len(set(logged) - set(range(rl_steps))),
        "steps_redone": done_before - sum(1 for t in times if t < injected),
        "normal_step_seconds": statistics.median(b - a for a, b in zip(times, times[1:])),
        "events": [{k: e[k] for k in ("role", "fault", "action", "recovery_seconds") if k in e} for e in events],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", type=Path, default=Path("tests/e2e/faults.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), help="measure these faults (default: all)")
    args = parser.parse_args()
    rl_steps = next(s.steps for s in load_recipe(args.recipe).stages if s.kind == "rl")
    work = Path(tempfile.mkdtemp(prefix="zaya-faults-"))
    rows = {}
    for i, name in enumerate(args.only or FAULTS):
        rows[name] = measure(args.recipe, work / f"run{i}", FAULTS[name], rl_steps)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print(f"\nfault recovery, {args.recipe} ({os.cpu_count()} CPUs, {platform.machine()})")
    print(f"{'fault':42} {'detection s':>11} {'recovery s':>10} {'steps lost':>10} {'redone':>6} {'step s':>6}")
    for name, row in rows.items():
        print(f"{name:42} {row['detection_seconds']:11.1f} {row['recovery_seconds']:10.1f} {row['steps_lost']:10d} "
              f"{row['steps_redone']:6d} {row['normal_step_seconds']:6.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "recipe": str(args.recipe), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "rows": rows}
    (args.out / "fault_recovery.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
