"""Fault injection through real Ray: kill -9 a rollout worker, a verifier, a learner and the
driver in the middle of a run; every run must finish with each step logged exactly once.

Actors are found by the process title Ray gives a worker while it runs a method
("ray::LearnerWorker.rl_step"), so each kill lands mid-call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zaya_rl import checkpoint
from zaya_rl.models import load_model

HERE = Path(__file__).parent
RECIPE = HERE / "faults.yaml"
WARMUP_STEPS, RL_STEPS = 4, 10
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    # Its own session: killing the group takes the driver and the local Ray it started.
    return subprocess.Popen([sys.executable, "-m", "zaya_rl.cli", "run", str(RECIPE), "--run-dir", str(run_dir),
                             *extra], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_of(run_dir: Path, stage: str, key: str) -> list[int]:
    return [r["step"] for r in records(run_dir) if r["stage"] == stage and key in r]


def wait_for_rl_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while max(steps_of(run_dir, "rl", "reward"), default=-1) < step:
        assert proc.poll() is None, f"the run ended early:\n{log_tail(run_dir)}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.2)


def title_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def kill_mid_call(actor_class: str, method: str, timeout: float = 300) -> int:
    """SIGKILL the actor process of `actor_class` while it runs `method`: Ray retitles a
    worker "ray::Class.method" for the duration of a call."""
    deadline = time.time() + timeout
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and title_of(int(p)).startswith(f"ray::{actor_class}")]
    assert pids, f"no {actor_class} process"
    while time.time() < deadline:
        for pid in pids:
            if title_of(pid) == f"ray::{actor_class}.{method}":
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.001)
    raise AssertionError(f"{actor_class} never ran {method}")


def log_tail(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return path.read_text()[-4000:] if path.exists() else ""


def finish(proc: subprocess.Popen, run_dir: Path) -> dict:
    assert proc.wait(timeout=900) == 0, log_tail(run_dir)
    # Every step of every stage is logged once: none skipped, none counted twice.
    assert steps_of(run_dir, "warmup", "loss") == list(range(WARMUP_STEPS))
    assert steps_of(run_dir, "rl", "reward") == list(range(RL_STEPS))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["rl"]["steps"] == RL_STEPS
    model = load_model(run_dir / "final")
    assert model.config.num_experts == 4
    return summary


@pytest.mark.parametrize("actor_class, method", [("RolloutWorker", "generate"), ("Verifier", "score")])
def test_restarted_actor_retries_its_work(tmp_path, actor_class, method):
    """Ray restarts a rollout worker or verifier; the call is retried and the run goes on."""
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    try:
        wait_for_rl_step(run_dir, 2, proc)
        kill_mid_call(actor_class, method)
        summary = finish(proc, run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert summary["recoveries"] == []  # Ray itself replaced the actor: no checkpoint restore


def test_dead_learner_resumes_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    try:
        wait_for_rl_step(run_dir, 4, proc)
        killed_at = time.time()
        kill_mid_call("LearnerWorker", "rl_step")
        summary = finish(proc, run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [recovery] = summary["recoveries"]
    assert recovery["checkpoint"] and recovery["resumed_at_global_step"] >= WARMUP_STEPS
    assert 0 < recovery["recovery_seconds"] < time.time() - killed_at
    # The checkpoint written after the recovery is whole and serves: vLLM generates from it.
    newest = checkpoint.latest(run_dir)
    assert checkpoint.verify(newest) is None
    from workers.rollout import Rollout

    engine = Rollout("vllm", str(newest / "model"), max_model_len=128)
    [[completion]] = engine.generate(["1+2=?\n"], 1, 0.0, 8)
    assert completion.token_ids


def test_killed_driver_resumes_with_the_same_curriculum(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    try:
        wait_for_rl_step(run_dir, 5, proc)  # past the checkpoint at global step 9 (rl step 4)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = checkpoint.latest(run_dir)
    state = json.loads((saved / "state.json").read_text())
    assert state["position"]["stage_index"] == 1 and state["curriculum"] is not None

    proc = start_run(run_dir, "--resume")
    try:
        finish(proc, run_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [resumed] = [r for r in records(run_dir) if r["stage"] == "_resume"]
    assert resumed["position"] == state["position"]
    assert resumed["curriculum"] == state["curriculum"]
    assert resumed["stream"] == state["stream"]
