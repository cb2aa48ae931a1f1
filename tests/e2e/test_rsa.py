"""Markovian RSA through real Ray: `zaya-rl eval` spreads every round over its rollout workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def zaya_rl(*args: str) -> subprocess.CompletedProcess:
    """The CLI on a local Ray of its own (as `zaya-rl run` starts one when RAY_ADDRESS is unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "zaya_rl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_eval_cli_writes_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    proc = zaya_rl("eval", "--checkpoint", str(tiny_checkpoint), "--num-problems", "4", "--levels", "1",
                   "--population", "4", "--tails", "2", "--rounds", "1", "--budget", "24", "--tail-tokens", "8",
                   "--aggregation-temperature", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray dashboard at" in proc.stdout and "1 rollout worker, rollout-0" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("single_sample", "majority_vote", "rsa_mean", "rsa_majority", "matched_majority"):
        assert 0.0 <= report[key]["accuracy"] <= 1.0 and report[key]["tokens_per_problem"] >= 0
    assert 0.0 <= report["pass_at_n"]["round_0"] <= 1.0
    paired = report["rsa_minus_matched"]
    gap = report["rsa_mean"]["accuracy"] - report["matched_majority"]["accuracy"]
    assert paired["difference"] == pytest.approx(gap)
    assert paired["a_higher"] + paired["b_higher"] <= 4 and paired["standard_error"] >= 0.0
    assert report["rsa"]["temperature"] == 1.0 and report["rsa"]["aggregation_temperature"] == 0.0
    assert len(report["rounds"]) == 2 and report["rounds"][1]["longest_prompt_tokens"] > 0
    assert 0.0 <= report["rounds"][1]["candidate_vote_accuracy"] <= report["pass_at_n"]["round_0"]
    assert 0.0 <= report["rounds"][1]["answer_from_candidates"] <= 1.0
    assert "RSA" in proc.stdout


def test_eval_cli_reports_each_source_of_a_recipe(tiny_checkpoint, tmp_path):
    """`zaya-rl eval --recipe` on a recipe with two sources: chain_sum's held-out set and a
    file source's held-out file, each read out on its own, over the recipe's two rollout workers."""
    rows = [{"q": f"{i}+{i}=?\n", "a": str(2 * i)} for i in range(3)]
    (tmp_path / "facts_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(f"""name: two
eval: {{num_problems: 4, levels: [1]}}
resources: {{num_rollout_workers: 2}}
rollout: {{max_tokens: 24, rsa: {{population: 4, tails: 2, rounds: 1, tail_tokens: 8}}}}
data:
  sources:
    - {{kind: gym, name: sums, generator: chain_sum}}
    - {{kind: file, name: facts, path: {tmp_path}/facts.jsonl, held_out: {tmp_path}/facts_test.jsonl,
       fields: {{prompt: q, answer: a}}}}
stages:
  - {{name: rl, kind: rl, steps: 1, lr: 0.1}}
""")
    out = tmp_path / "eval.json"
    proc = zaya_rl("eval", "--recipe", str(tmp_path / "r.yaml"), "--checkpoint", str(tiny_checkpoint),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rollout workers, rollout-0, rollout-1" in proc.stdout
    report = json.loads(out.read_text())
    by_source = report["by_source"]
    # chain_sum at level 1; the file's rows are all level 0, its top level, and there are 3.
    assert {name: r["num_problems"] for name, r in by_source.items()} == {"sums": 4, "facts": 3}
    assert report["num_problems"] == 7
    # Each round's prompts, split over the two engines and joined in order: N per problem.
    assert [r["prompts"] for r in report["rounds"]] == [7, 7 * 4]
    assert report["rounds"][1]["generated_tokens"] > 0
    for key in ("single_sample", "majority_vote", "rsa_mean", "matched_majority"):
        assert all(0.0 <= r[key] <= 1.0 for r in by_source.values())
        pooled = sum(r[key] * r["num_problems"] for r in by_source.values()) / 7
        assert report[key]["accuracy"] == pytest.approx(pooled)
    assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("sums ", "facts "))] == [
        ["sums", "4"], ["facts", "3"]]
