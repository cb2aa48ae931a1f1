"""Markovian RSA through real Ray: `zaya-rl eval` spreads every round over its rollout workers,
and an rl stage trains on whole RSA traces sampled the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
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
    assert "Ray dashboard at" in proc.stdout and "spread over rollout-0\n" in proc.stdout
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
    assert "spread over rollout-0, rollout-1\n" in proc.stdout
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


def test_eval_ends_with_an_error_naming_the_call_when_an_engine_does_not_answer(tiny_checkpoint, tmp_path):
    """A generate call past its deadline (the recipe's `timeouts`, here far below what one call
    takes) ends `zaya-rl eval` with exit 1 and the call named, instead of a wait without end."""
    (tmp_path / "r.yaml").write_text("""name: hang
eval: {num_problems: 4, levels: [1]}
timeouts: {min_seconds: 0.001, generate_tokens_per_second: 1.0e9}
rollout: {max_tokens: 24, rsa: {population: 4, tails: 2, rounds: 1, tail_tokens: 8}}
stages:
  - {name: rl, kind: rl, steps: 1, lr: 0.1}
""")
    out = tmp_path / "eval.json"
    proc = zaya_rl("eval", "--recipe", str(tmp_path / "r.yaml"), "--checkpoint", str(tiny_checkpoint),
                   "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RolloutWorker.generate did not answer within its deadline" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_rl_stage_trains_every_round_of_whole_rsa_traces(tiny_checkpoint, tmp_path):
    """An rl stage with rsa_traces on two rollout workers: each step samples 2 problems as RSA
    traces (N = 4, C = 2, T = 2) and trains all N * (T + 1) members of each, every group's
    rewards from the verifier; metrics.jsonl has each round's reward and trained samples."""
    run_dir = tmp_path / "run"
    # The untrained model never answers right: a length penalty makes a group's rewards differ,
    # so that every step updates the weights.
    sets = ["resources.num_rollout_workers=2", "stages.rl.steps=2", "stages.rl.prompts_per_step=2",
            "stages.rl.eval_at_end=false", "stages.rl.aggregation_share=0", "stages.rl.rsa_traces=true",
            "stages.rl.rollout.rsa={population: 4, tails: 2, rounds: 2}", "algorithm.overlong=shape",
            "algorithm.overlong_buffer=16"]
    proc = zaya_rl("run", str(HERE / "mini.yaml"), "--run-dir", str(run_dir), "--stage", "rl",
                   "--from", str(tiny_checkpoint), *[arg for item in sets for arg in ("--set", item)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for r in steps:
        # drop_uniform_groups is off in mini.yaml: all 3 rounds x 2 problems x 4 members are trained.
        assert r["rsa_round_samples"] == [2 * 4] * 3 and r["sequences"] == 2 * 4 * 3
        assert r["kept_groups"] == r["sampled_groups"] == 2 * 3
        assert r["aggregation_prompts"] == 2 * 2 * 4  # rounds 1 and 2: one prompt per member
        assert len(r["rsa_round_rewards"]) == 3 and all(0.0 <= x <= 1.0 for x in r["rsa_round_rewards"])
        assert r["reward"] == pytest.approx(sum(r["rsa_round_rewards"]) / 3)
        assert len(r["tasks"]) == 2 and r["staleness"] == 0 and r["loss"] != 0.0
        # Router replay (mini.yaml) over aggregation prompts: the learner ran the engines' experts.
        assert r["routing_mismatch"] < 0.01
    assert not set(steps[0]["tasks"]) & set(steps[1]["tasks"])
    # The second step sampled with the weights the first one trained, pushed to both engines.
    assert steps[1]["mean_abs_logprob_diff"] < 1e-3


def test_a_run_whose_aggregation_prompts_overflow_the_context_stops_before_its_first_stage(tmp_path):
    run_dir = tmp_path / "run"
    proc = zaya_rl("run", str(HERE / "mini.yaml"), "--run-dir", str(run_dir),
                   "--set", "model.tiny.max_position_embeddings=96", "--set", "stages.rl.aggregation_tails=4",
                   "--set", "stages.rl.aggregation_tail_tokens=40")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "zaya-rl: the recipe cannot run on this model: stages.1 ('rl'): its aggregation prompts plus their " \
           "budget need up to" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "stages").exists()  # vLLM used to refuse the prompts mid-run, after the warmup
