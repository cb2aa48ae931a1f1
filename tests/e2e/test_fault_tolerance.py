"""Fault injection through real Ray: kill -9 a rollout worker, a verifier, a learner and the
driver in the middle of a run, stop (SIGSTOP) one actor of each role so that it hangs, kill -9
the driver of a `ray job submit` job run by `zaya-rl supervise`, and lose a second Ray node that
holds a rollout worker and a verifier; every run must finish with each step logged exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from benchmarks.chaos import (descendants, driver_pids, free_port, lose_node, process_state, records, signal_mid_call,
                              start_node, start_run, steps_of, stop, stop_node, submit_job, title_of, wait_for_nodes,
                              wait_for_step)
from zaya_rl import checkpoint
from zaya_rl.controller import CALLED_AGAIN, RESTORED
from zaya_rl.models import load_model

RECIPE = Path(__file__).parent / "faults.yaml"
WARMUP_STEPS, RL_STEPS = 4, 10
# Deadlines of a few tens of seconds on the faults recipe, whose steps take about a second.
SHORT_DEADLINES = ("--set", "timeouts.min_seconds=20", "--set", "timeouts.score_seconds_per_item=0.5")
# A second Ray node's label, and the recipe's rollout worker and verifier preferring it.
SECOND_NODE = {"zaya-node": "second"}
ON_SECOND_NODE = ("--set", f"resources.prefer_nodes={{rollout: {SECOND_NODE}, verifier: {SECOND_NODE}}}")
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
    # Each recovery is in summary.json and, as it was when it happened, in metrics.jsonl.
    logged = [{k: v for k, v in r.items() if k not in ("time", "stage", "step")}
              for r in records(run_dir) if r["stage"] == "_recovery"]
    assert logged == summary["recoveries"]
    return summary


@pytest.mark.parametrize("actor_class, method", [("RolloutWorker", "generate"), ("Verifier", "score")])
def test_restarted_actor_retries_its_work(tmp_path, actor_class, method):
    """Ray restarts a rollout worker or verifier; the call is made again and the run goes on."""
    run_dir = tmp_path / "run"
    proc = start_run(RECIPE, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 2, proc)
        signal_mid_call(actor_class, method, signal.SIGKILL, proc.pid)
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    [event] = summary["recoveries"]  # Ray itself replaced the actor: no checkpoint restore
    assert event["fault"] in ("died", "unavailable") and event["recovery_seconds"] > 0
    if actor_class == "RolloutWorker":  # the batch is generated again on the current weights
        assert (event["role"], event["action"]) == ("rollout", CALLED_AGAIN)
    else:  # the pool scored the chunk again on the restarted actor instead of scoring it "died"
        assert (event["role"], event["action"]) == ("verifier", "restarted, scored again")
        rl = [r for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]
        assert rl[-1]["verifier_num_failures"] == 0


def test_dead_learner_resumes_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(RECIPE, run_dir)
    try:
        wait_for_step(run_dir, "rl", "reward", 4, proc)
        killed_at = time.time()
        signal_mid_call("LearnerWorker", "rl_step", signal.SIGKILL, proc.pid)
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    [recovery] = summary["recoveries"]
    assert (recovery["role"], recovery["actors"], recovery["action"]) == ("learner", ["learner-0"], RESTORED)
    assert recovery["checkpoint"] and recovery["resumed_at_global_step"] >= WARMUP_STEPS
    assert 0 < recovery["recovery_seconds"] < time.time() - killed_at
    # The checkpoint written after the recovery is whole and serves: vLLM generates from it.
    newest = checkpoint.latest(run_dir)
    assert checkpoint.verify(newest) is None
    from workers.rollout import Rollout

    engine = Rollout("vllm", str(newest / "model"), max_model_len=128)
    [[completion]] = engine.generate(["1+2=?\n"], 1, 0.0, 8)
    assert completion.token_ids


@pytest.mark.parametrize("actor_class, method, role, action", [
    ("RolloutWorker", "generate", "rollout", CALLED_AGAIN),
    ("LearnerWorker", "rl_step", "learner", RESTORED),
    ("Verifier", "score", "verifier", "restarted, scored again"),
])
def test_hung_actor_is_killed_and_recovered(tmp_path, actor_class, method, role, action):
    """An actor stopped mid-call (alive, never answering) misses its deadline, is killed and is
    recovered as a dead one of its role would be."""
    run_dir = tmp_path / "run"
    proc = start_run(RECIPE, run_dir, *SHORT_DEADLINES)
    try:
        wait_for_step(run_dir, "rl", "reward", 4, proc)  # past the checkpoint at rl step 4
        stopped = signal_mid_call(actor_class, method, signal.SIGSTOP, proc.pid)
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    [event] = summary["recoveries"]
    assert (event["role"], event["fault"], event["action"]) == (role, "hung", action)
    assert event["actors"] == [f"{role}-0"]
    assert process_state(stopped) is None  # killed, not left stopped
    if role == "verifier":
        rl = [r for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]
        assert (rl[-1]["verifier_num_hangs"], rl[-1]["verifier_num_failures"]) == (1, 0)


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

    proc = start_run(RECIPE, run_dir, "--resume", "auto")
    try:
        summary = finish(proc, run_dir)
    finally:
        stop(proc)
    [resumed] = [r for r in records(run_dir) if r["stage"] == "_resume"]
    assert resumed["position"] == state["position"]
    assert resumed["curriculum"] == state["curriculum"]
    assert resumed["data"] == state["data"]
    [event] = summary["recoveries"]
    assert (event["role"], event["checkpoint"]) == ("driver", str(saved))


def test_killed_driver_of_a_submitted_job_is_started_again(tmp_path):
    dashboard = free_port()
    head, _ = start_node(num_cpus=2, dashboard_port=dashboard)
    work, run_dir = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    shutil.copy(RECIPE, work / "faults.yaml")
    job = None
    try:
        job = submit_job(dashboard, work, ["zaya-rl", "supervise", "faults.yaml", "--run-dir", str(run_dir)],
                         tmp_path / "run.log")
        wait_for_step(run_dir, "rl", "reward", 5, job)  # past the checkpoint at rl step 4
        [driver] = driver_pids(run_dir)
        os.kill(driver, signal.SIGKILL)
        summary = finish(job, run_dir)
        assert "succeeded" in (tmp_path / "run.log").read_text()
    finally:
        if job is not None:
            stop(job)
        stop_node(head)
    ends = [json.loads(line) for line in (run_dir / "supervise.jsonl").read_text().splitlines()]
    assert [(e["pid"], e["exit"], e["restarting"]) for e in ends] == [(driver, -signal.SIGKILL, True),
                                                                      (ends[1]["pid"], 0, False)]
    [event] = summary["recoveries"]
    assert event["role"] == "driver" and event["resumed_at_global_step"] >= 9


def test_lost_node_leaves_the_run_on_the_first(tmp_path):
    """The second node holds the rollout worker and the verifier (the recipe prefers its label);
    the driver and the learner are on the head."""
    head, address = start_node(num_cpus=2)
    second, _ = start_node(num_cpus=1, head_address=address, labels=SECOND_NODE)
    run_dir = tmp_path / "run"
    proc = None
    try:
        wait_for_nodes(address, 2)
        proc = start_run(RECIPE, run_dir, *ON_SECOND_NODE, ray_address=address)
        wait_for_step(run_dir, "rl", "reward", 2, proc)
        workers = {"ray::RolloutWorker", "ray::Verifier", "ray::LearnerWorker"}
        on_second = sorted(title for title in (title_of(pid).split(".")[0] for pid in descendants(second.pid))
                           if title in workers)
        assert on_second == ["ray::RolloutWorker", "ray::Verifier"], (on_second, log_tail(run_dir))
        lose_node(second)
        summary = finish(proc, run_dir)
    finally:
        if proc is not None:
            stop(proc)
        stop_node(second)
        stop_node(head)
    events = summary["recoveries"]
    [lost] = [e for e in events if e["role"] == "node"]
    assert lost["fault"] == "lost" and lost["labels"]["zaya-node"] == "second"
    # Its rollout worker came back on the first node, and its verifier (recorded when a call
    # failed; a verifier that Ray restarted between calls answers the next one); no checkpoint
    # was restored.
    assert "rollout" in {e["role"] for e in events} <= {"node", "rollout", "verifier"}
    assert all(e["action"] in (CALLED_AGAIN, "restarted, scored again") for e in events if e["role"] != "node")
    rl = [r for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]
    assert rl[-1]["verifier_num_failures"] == 0
