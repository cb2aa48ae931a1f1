"""A run whose engines sample a policy other than the learner's stops with a clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.ray


def test_log_prob_drift_above_the_recipe_limit_stops_the_run(tmp_path):
    """A limit below fp32 rounding: the first RL step's engine/learner gap (about 1e-6) passes
    it, and the run stops there, non-zero, naming the field, with the warmup's checkpoint kept."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "mini.yaml"), "--run-dir",
                           str(run_dir), "--set", "algorithm.max_logprob_drift=1e-12"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "above algorithm.max_logprob_drift 1e-12" in proc.stderr
    assert "weight sync by object_store" in proc.stderr
    assert (run_dir / "stages" / "warmup").is_dir() and any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "summary.json").exists()
