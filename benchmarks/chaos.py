"""Fault injection for the fault-tolerance tests and benchmark: start a run in its own
process group, follow its metrics, and SIGKILL one of its actors in the middle of a call.

Actors are found by the process title Ray gives a worker while it runs a method
("ray::LearnerWorker.rl_step"), so a kill lands mid-call, never between calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_run(recipe: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """`zaya-rl run` on a local Ray, in its own session: killing the group takes the driver and
    the Ray instance it started. Output goes to RUN_DIR.log beside the run directory."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "zaya_rl.cli", "run", str(recipe), "--run-dir", str(run_dir),
                             *extra], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_of(run_dir: Path, stage: str, key: str) -> list[int]:
    """Steps of `stage` logged with `key` (e.g. "reward" for RL steps, "loss" for SFT steps)."""
    return [r["step"] for r in records(run_dir) if r["stage"] == stage and key in r]


def wait_for_step(run_dir: Path, stage: str, key: str, step: int, proc: subprocess.Popen,
                  timeout: float = 900) -> float:
    """Block until `stage` has logged `step`; returns the time it was seen."""
    deadline = time.time() + timeout
    while max(steps_of(run_dir, stage, key), default=-1) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {stage} step {step}")
        if time.time() > deadline:
            raise TimeoutError(f"{stage} step {step} not reached in {timeout} s")
        time.sleep(0.05)
    return time.time()


def title_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def kill_mid_call(actor_class: str, method: str, timeout: float = 300) -> int:
    """SIGKILL the process of an `actor_class` actor while it runs `method`; returns its pid."""
    deadline = time.time() + timeout
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and title_of(int(p)).startswith(f"ray::{actor_class}")]
    if not pids:
        raise LookupError(f"no {actor_class} actor process")
    while time.time() < deadline:
        for pid in pids:
            if title_of(pid) == f"ray::{actor_class}.{method}":
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.001)
    raise TimeoutError(f"{actor_class} never ran {method} in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
