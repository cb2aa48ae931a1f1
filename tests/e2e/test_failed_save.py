"""A stage's evaluation is recorded before its checkpoint is written: a save that fails (a full
disk, on a GPU machine once) ends the run but does not take the stage's figures with it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.ray


def test_a_stage_whose_checkpoint_cannot_be_written_keeps_its_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stages").write_text("a file where the stage checkpoints' folder goes: every save fails")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "mini.yaml"), "--run-dir",
                           str(run_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode != 0, proc.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["stage"] == "warmup" and "eval_accuracy" in r]
    assert len(ends) == 1 and 0.0 <= ends[0]["eval_accuracy"] <= 1.0, records[-3:]
    assert len((run_dir / "held_out" / "warmup.jsonl").read_text().splitlines()) == 24
