"""Asynchronous RL through real Ray on the CPU: the engines sample the next batches while the
learner trains; the staleness bound holds; bound 0 is the synchronous loop; a killed driver
resumes with the batches it had in flight, and no batch is trained twice or lost."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from benchmarks.chaos import records, start_run, steps_of, stop, wait_for_step
from zaya_rl import checkpoint

HERE = Path(__file__).parent
pytestmark = pytest.mark.ray


def rl_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if r["stage"] == "rl" and "reward" in r]


def run(run_dir: Path, *overrides: str) -> dict:
    proc = start_run(HERE / "mini.yaml", run_dir, *[arg for item in overrides for arg in ("--set", item)])
    try:
        assert proc.wait(timeout=900) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    finally:
        stop(proc)
    return json.loads((run_dir / "summary.json").read_text())


# The untrained mini model never answers right: a length penalty gives its samples rewards that
# differ, so every step updates the weights and staleness means something.
SHAPED = ("algorithm.overlong=shape", "algorithm.overlong_buffer=16", "stages.rl.steps=4")


def test_staleness_stays_within_the_bound_and_bound_0_is_the_synchronous_loop(tmp_path):
    # A log-prob limit far above fp32's engine/learner gap (about 1e-7) and below a stale batch's
    # (its policy moved since: about 5e-3): the check holds only batches of the current weights.
    runs = {bound: run(tmp_path / f"bound{bound}", f"algorithm.max_off_policy_steps={bound}",
                       "algorithm.max_logprob_drift=1e-3", *SHAPED)
            for bound in (0, 1, 2)}
    steps = {bound: rl_records(tmp_path / f"bound{bound}") for bound in runs}
    # Each step trains the oldest batch in flight: sent `staleness` optimizer steps ago.
    assert [r["staleness"] for r in steps[0]] == [0, 0, 0, 0]
    assert [r["staleness"] for r in steps[1]] == [0, 1, 1, 1]
    assert [r["staleness"] for r in steps[2]] == [0, 1, 2, 2]
    assert all(r["mean_abs_logprob_diff"] < 1e-3 for r in steps[0])
    assert max(r["mean_abs_logprob_diff"] for r in steps[2] if r["staleness"] > 0) > 1e-3
    for bound, summary in runs.items():
        assert summary["stages"]["rl"]["staleness_histogram"] == {
            0: {"0": 4}, 1: {"0": 1, "1": 3}, 2: {"0": 1, "1": 1, "2": 2}}[bound]
        assert summary["stages"]["rl"]["dropped_batches"] == 0
        trained = [uid for r in steps[bound] for uid in r["tasks"]]
        assert len(trained) == len(set(trained)) == 4 * 4  # no prompt trained twice
    # Step 0 trains the same prompts, sampled by the same engine with the same weights, in every
    # run: the same loss (above bound 0 the off-policy correction is on, and weighs each token 1).
    assert steps[1][0]["tasks"] == steps[0][0]["tasks"] == steps[2][0]["tasks"]
    assert steps[0][0]["loss"] != 0.0 and steps[1][0]["loss"] == pytest.approx(steps[0][0]["loss"], rel=1e-3)
    # Later steps train other batches (sampled ahead, with older weights): other losses.
    assert steps[1][1]["loss"] != pytest.approx(steps[0][1]["loss"], rel=1e-3)
    assert "tis_weight" in steps[1][0] and "tis_weight" not in steps[0][0]


def test_a_killed_driver_resumes_its_batches_in_flight(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(HERE / "faults.yaml", run_dir, "--set", "algorithm.max_off_policy_steps=1")
    try:
        wait_for_step(run_dir, "rl", "reward", 6, proc)  # past the checkpoint at global step 9 (rl step 4)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    state = json.loads((checkpoint.latest(run_dir) / "state.json").read_text())
    [in_flight] = state["in_flight"]  # bound 1: one batch was sampling ahead at the checkpoint
    proc = start_run(HERE / "faults.yaml", run_dir, "--resume", "--set", "algorithm.max_off_policy_steps=1")
    try:
        assert proc.wait(timeout=900) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    finally:
        stop(proc)
    assert steps_of(run_dir, "rl", "reward") == list(range(10))  # every step once
    rl = rl_records(run_dir)
    resumed_at = state["position"]["step"]
    assert rl[resumed_at]["tasks"] == [t["uid"] for t in in_flight["tasks"]]  # trained first after resuming
    trained = [uid for r in rl for uid in r["tasks"]]
    assert len(trained) == len(set(trained))  # none trained twice
    assert all(r["staleness"] <= 1 for r in rl)


def test_partial_rollouts_take_new_weights_between_decode_steps(tmp_path):
    """Partial rollouts at bound 2: a step's weights reach the engine while it samples batches
    sent ahead (long ones: the untrained model runs to max_tokens), whose samples record the
    weights versions they span; the bound and the bookkeeping hold as without."""
    long = ("stages.rl.rollout.max_tokens=160", "algorithm.overlong_buffer=64", "stages.rl.steps=5")
    summary = run(tmp_path / "partial", "algorithm.max_off_policy_steps=2", "algorithm.partial_rollouts=true",
                  "stages.rl.algorithm.router_replay=false", *SHAPED, *long)
    steps = rl_records(tmp_path / "partial")
    assert [r["staleness"] for r in steps] == [0, 1, 2, 2, 2]
    assert summary["stages"]["rl"]["dropped_batches"] == 0
    trained = [uid for r in steps for uid in r["tasks"]]
    assert len(trained) == len(set(trained)) == 5 * 4
    # Step 0's batch was collected before the first update. A batch spans at most the updates
    # made while it was in flight (no more than its staleness); the later ones spanned some.
    assert steps[0]["max_versions_spanned"] == 0
    assert all(r["max_versions_spanned"] <= r["staleness"] for r in steps)
    assert sum(r["partial_samples"] for r in steps[1:]) > 0
