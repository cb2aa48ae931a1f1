"""Fault injection through real Ray: kill -9 a rollout worker, a verifier, a learner and the
driver in the middle of a run; every run must finish with each step logged exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from benchmarks.chaos import kill_mid_call, records, start_run, steps_of, stop, wait_for_step
from zaya_rl import checkpoint
from zaya_rl.models import load_model

RECIPE = Path(__file__).parent / "faults.yaml"
WARMUP_STEPS, RL_STEPS = 4, 10
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def log_tail(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return path.read_text()[-4000:] if path.exists() else ""


def finish(proc, run_dir: Path) -> dict:
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
    proc = start_run(RECIPE, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 2, proc)
        kill_mid_call(actor_class, method)
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    assert summary["recoveries"] == []  # Ray itself replaced the actor: no checkpoint restore
    rl = [r for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]
    if actor_class == "RolloutWorker":  # its retried call ran on the initial weights: redone
        [event] = [r for r in records(run_dir) if r["stage"] == "_recovery"]
        assert event["recovery_seconds"] > 0
    else:  # the pool retried the chunk on the restarted actor instead of scoring it "died"
        assert rl[-1]["verifier_num_failures"] == 0


def test_dead_learner_resumes_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(RECIPE, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 4, proc)
        killed_at = time.time()
        kill_mid_call("LearnerWorker", "rl_step")
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    [recovery] = summary["recoveries"]
    assert recovery["checkpoint"] and recovery["resumed_at_global_step"] >= WARMUP_STEPS
    assert 0 < recovery["recovery_seconds"] < time.time() - killed_at
    assert [r["recovery_seconds"] for r in records(run_dir) if r["stage"] == "_recovery"] == [
        recovery["recovery_seconds"]]
    # The checkpoint written after the recovery is whole and serves: vLLM generates from it.
    newest = checkpoint.latest(run_dir)
    assert checkpoint.verify(newest) is None
    from workers.rollout import Rollout

    engine = Rollout("vllm", str(newest / "model"), max_model_len=128)
    [[completion]] = engine.generate(["1+2=?\n"], 1, 0.0, 8)
    assert completion.token_ids


def test_killed_driver_resumes_with_the_same_curriculum(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(RECIPE, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 5, proc)  # past the checkpoint at global step 9 (rl step 4)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    saved = checkpoint.latest(run_dir)
    state = json.loads((saved / "state.json").read_text())
    assert state["position"]["stage_index"] == 1 and state["curriculum"] is not None

    proc = start_run(RECIPE, run_dir, "--resume")
    try:
        finish(proc, run_dir)
    finally:
        stop(proc)
    [resumed] = [r for r in records(run_dir) if r["stage"] == "_resume"]
    assert resumed["position"] == state["position"]
    assert resumed["curriculum"] == state["curriculum"]
    assert resumed["data"] == state["data"]
