"""The per-source curriculum through real Ray, vLLM, DeepSpeed and verifier actors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.ray


def write_data(data_dir: Path) -> None:
    data_dir.mkdir()
    easy = [{"prompt": f"{level}:{i}=?\n", "answer": "7", "solution": "\\boxed{7}", "level": level}
            for level in range(3) for i in range(20)]
    (data_dir / "easy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in easy))
    pq.write_table(pa.table({"prompt": [f"{level}?{i}=?\n" for level in range(3) for i in range(20)],
                             "answer": ["987654321"] * 60, "level": [level for level in range(3) for _ in range(20)]}),
                   data_dir / "impossible.parquet")
    code = [{"prompt": f"def add_{i}(x):\n", "test": f"def check(f):\n    assert f(1) == {i + 1}\n",
             "entry_point": f"add_{i}"} for i in range(3)]
    (data_dir / "code.jsonl").write_text("".join(json.dumps(row) + "\n" for row in code))


def test_easy_source_rises_and_impossible_source_falls(tmp_path):
    write_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["ZR_CURRICULUM_DATA"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "curriculum.yaml"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl" and "sources" in r]
    assert [r["step"] for r in rl] == [0, 1, 2]
    for r in rl:
        assert set(r["sources"]) == {"easy", "impossible"}
        for m in r["sources"].values():
            assert set(m) == {"level", "pass_rate", "samples", "reward"}
    # Both start at level 1: the easy one is solved and goes up, the impossible one goes down.
    first, last = rl[0]["sources"], rl[-1]["sources"]
    assert first["easy"]["reward"] > 0.7 and first["easy"]["level"] == 2
    assert first["impossible"]["reward"] == 0.0 and first["impossible"]["level"] == 0
    assert last["easy"]["level"] == 2 and last["impossible"]["level"] == 0
    # Equal weights: the two sources are served alike.
    assert last["easy"]["samples"] == last["impossible"]["samples"] == 6

    # The last stage probes start levels (pass rate nearest 0.5) and keeps prompts at <= 0.75.
    [prepared] = [r["sources"] for r in records if r["stage"] == "filtered/_prepare"]
    assert prepared["impossible"]["probe_pass_rates"] == [0.0] and prepared["impossible"]["start_level"] == 0
    assert prepared["easy"]["probe_pass_rates"][0] > 0.5
    assert prepared["impossible"]["filter_kept"] == prepared["impossible"]["filter_measured"] == 4
    assert prepared["easy"]["filter_kept"] < 4
    # The tiny model writes no working code: the sandboxed tests fail every sample.
    assert prepared["code"]["filter_kept"] == prepared["code"]["filter_measured"] == 4
    # Half an epoch of what the filter kept, 4 prompts a step.
    filtered = [r for r in records if r["stage"] == "filtered" and "sources" in r]
    kept = sum(source["filter_kept"] for source in prepared.values())
    assert len(filtered) == math.ceil(0.5 * kept / 4)
    assert filtered[-1]["sources"]["code"]["samples"] >= 1 and filtered[-1]["sources"]["code"]["reward"] == 0.0
    assert filtered[-1]["sources"]["impossible"]["samples"] >= 1
