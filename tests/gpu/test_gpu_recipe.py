"""recipes/gpu.yaml in miniature, end to end through the CLI: real Ray, vLLM on CUDA and DeepSpeed
over NCCL on one card, colocated. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run_mini(run_dir: Path, overrides: list[str] = ()) -> None:
    """`zaya-rl run` of the mini recipe on its own local Ray, which must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "mini_gpu.yaml"), "--run-dir",
                           str(run_dir), *[a for o in overrides for a in ("--set", o)]],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_mini_gpu_recipe_runs_colocated_with_cuda_ipc_sync(tmp_path):
    run_dir = tmp_path / "run"
    run_mini(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    placed = summary["placement"]
    assert (placed["placement"], placed["gpus"], placed["weight_transfer"]) == ("colocated", 1.0, "ipc")
    assert len(placed["learner_devices"]) == 1 and placed["learner_devices"][0] != "cpu"
    for stage in summary["stages"].values():
        assert 0.0 <= stage["eval_accuracy"] <= 1.0 and stage["eval_sampled"]["n"] == 64
        assert stage["generated_tokens_per_second"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl] == [0, 1, 2, 3]
    for r in rl:  # every step trained, synced by CUDA IPC, and the engine sampled the learner's policy
        assert r["mean_abs_logprob_diff"] < 0.1, r
        assert r["train_seconds"] > 0 and r["sync_seconds"] > 0 and r["generate_seconds"] > 0
    warmup = [r for r in records if r["stage"] == "warmup" and "loss" in r]
    assert len(warmup) == 30 and warmup[-1]["loss"] < warmup[0]["loss"]


def test_mini_gpu_recipe_split_in_halves_of_one_card_runs_one_step_off(tmp_path):
    """Split placement on one card: the engine and the learner rank each hold half of it (Ray's
    fractional GPUs), the engine never sleeps, weights still go by CUDA IPC (same device), and with
    max_off_policy_steps 1 the next batch is generated while the learner trains: what
    `benchmarks.async_rl` measures on a GPU."""
    run_dir = tmp_path / "run"
    run_mini(run_dir, ["resources.placement=split", "resources.rollout_gpus=0.5", "resources.learner_gpus=0.5",
                       "algorithm.max_off_policy_steps=1", "stages.rl.steps=6"])
    placed = json.loads((run_dir / "summary.json").read_text())["placement"]
    assert (placed["placement"], placed["gpus"], placed["weight_transfer"]) == ("split", 1.0, "ipc")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl] == list(range(6))
    # Overlapped, within the bound; the run's own drift check (max_logprob_drift) passed at every step.
    assert max(r["staleness"] for r in rl) == 1, [r["staleness"] for r in rl]
