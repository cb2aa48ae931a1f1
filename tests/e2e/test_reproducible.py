"""Reproducible runs: one seed on one machine, a step-bounded recipe twice, the same numbers.

Paired comparisons (benchmarks/rl_vs_sft.py) rest on it: two runs that share a seed must differ
only in what the comparison changes. What still breaks it is listed in the README
("Reproducible runs").
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The mini recipe's 4 warmup steps and 16 RL steps: the first 20 steps of a run.
RL_STEPS = 16


def run_mini(run_dir: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "mini.yaml"), "--run-dir", str(run_dir),
                           "--set", f"stages.rl.steps={RL_STEPS}"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_step(records: list[dict]) -> list[dict]:
    """Every training step's record without what the clock measures (times, rates)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith(("_seconds", "_per_second"))}
            for r in records if "loss" in r]


def test_two_runs_of_one_seed_give_the_same_steps(tmp_path):
    first, second = per_step(run_mini(tmp_path / "first")), per_step(run_mini(tmp_path / "second"))
    assert [r["stage"] for r in first] == ["warmup"] * 4 + ["rl"] * RL_STEPS
    # Bit for bit, step by step: losses, rewards, gradient norms, the samples' lengths and
    # entropies, log-prob drift, expert loads, curriculum levels.
    for a, b in zip(first, second):
        assert a == b, (a["stage"], a["step"], {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)})
    assert len(first) == len(second)
