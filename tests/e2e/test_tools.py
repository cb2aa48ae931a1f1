"""tiny_tools.yaml's path (tools.yaml: a smaller model, fewer steps) through the CLI on a local Ray:
SFT on tool demonstrations, then RL on multi-turn episodes in the Python tool environment, with
the real sandbox, vLLM, DeepSpeed and verifiers; then the RL stage again, asynchronous."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.ray


def run(run_dir: Path, *args: str) -> list[dict]:
    """`zaya-rl run tools.yaml` with `args`; the records of its metrics.jsonl."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "tools.yaml"), "--run-dir", str(run_dir),
                           *args], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_episodes(rl: list[dict]) -> None:
    for r in rl:
        # Multi-turn episodes: the warmed-up policy calls the tool, sees its output and answers.
        assert r["max_turns"] > 1 and r["multi_turn_samples"] > 0 and r["turns"] > 1.0, r
        # The tool outputs were in the training sequences and masked from the loss.
        assert r["masked_tokens"] > 0 and r["tokens"] > r["masked_tokens"], r
        assert r["sequences"] == 16  # 4 prompts x 4 episodes, none dropped


@pytest.fixture(scope="module")
def tools_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    run(run_dir)
    return run_dir


def test_tool_recipe_runs_multi_turn_episodes_with_tool_outputs_masked(tools_run):
    records = [json.loads(line) for line in (tools_run / "metrics.jsonl").read_text().splitlines()]
    # The demonstrations' tool outputs were left out of the SFT loss.
    sft = [r for r in records if r["stage"] == "warmup" and "loss" in r]
    assert len(sft) == 40 and all(r["masked_tokens"] > 0 for r in sft)
    assert sft[-1]["loss"] < 0.5 * sft[0]["loss"]
    rl = [r for r in records if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl] == [0, 1, 2]
    check_episodes(rl)
    for r in rl:
        # The engine/learner log-prob check over the policy's tokens passed: fp32 on the CPU agrees
        # to about 1e-6 (max_logprob_drift would have stopped the run above 0.25).
        assert r["mean_abs_logprob_diff"] < 1e-3, r
    summary = json.loads((tools_run / "summary.json").read_text())
    for name in ("warmup", "rl"):
        stage = summary["stages"][name]
        # Evaluation ran episodes in the environment too.
        assert stage["eval_greedy"]["turns"] > 1.0 and 0.0 <= stage["eval_accuracy"] <= 1.0


def test_asynchronous_rl_samples_episodes_ahead(tools_run, tmp_path):
    """The same RL stage from the warmed-up weights, one batch of episodes in flight ahead."""
    rl = [r for r in run(tmp_path / "async", "--stage", "rl", "--from", str(tools_run / "stages" / "warmup"),
                         "--set", "stages.rl.algorithm.max_off_policy_steps=1")
          if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl] == [0, 1, 2]
    check_episodes(rl)
    assert [r["staleness"] for r in rl] == [0, 1, 1]
    # The check passed; from step 1 on it also measures one optimizer step of staleness.
    assert rl[0]["mean_abs_logprob_diff"] < 1e-3 and all(r["mean_abs_logprob_diff"] < 0.25 for r in rl)
