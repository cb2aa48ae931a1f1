"""The benchmark suite's pure parts: tables, JSON, charts and the headline rows."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from benchmarks.async_rl import bound_row, report
from benchmarks.report import bar_chart, markdown_table, text_table, write_json
from benchmarks.rl_vs_sft import finished_run
from benchmarks.run import headline_rows
from zaya_rl.recipe import load_recipe


def test_text_table_aligns_columns():
    table = text_table("T", ["name", "value"], [["a", 1.23456], ["longer name", 12345.6]])
    lines = table.splitlines()
    assert lines[0] == "T"
    assert lines[2] == "a".ljust(11) + "  " + "1.23".rjust(6)
    assert lines[3] == "longer name  12,346"
    assert len({len(line) for line in lines[1:]}) == 1


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 0.5]]) == "| a | b |\n|---|---|\n| x | 0.5 |"


def test_write_json_and_bar_chart(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    png = bar_chart(tmp_path / "plots" / "b.png", "t", ["a", "b"], {"s1": [1.0, 2.0], "s2": [3.0, 4.0]}, "y", log=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headline_rows_ratios():
    acc = {"sampled": {"accuracy": 0.5}, "greedy": {"accuracy": 0.6}}
    results = {
        "vs_trl": {"prompts_per_step": 16, "group_size": 8, "speedup": 4.0, "warmup_eval": acc,
                   "rows": {"zaya_rl": {"steps": 3, "samples_per_second": 40.0, "eval": acc},
                            "trl": {"steps": 3, "samples_per_second": 10.0,
                                    "eval": {"sampled": {"accuracy": 0.25}, "greedy": {"accuracy": 0.0}}}}},
        "rollout_throughput": {"ratio": 0.95, "rows": {"RolloutWorker": {"tokens_per_second": 95.0},
                                                       "bare vLLM": {"tokens_per_second": 100.0}}},
        # As read back from JSON: the bounds are string keys.
        "async_rl": {"rl_steps": 12, "rows": {"0": {"steps_per_second": 0.5},
                                              "1": {"steps_per_second": 0.6, "speedup_over_bound_0": 1.2}}},
    }
    rows = headline_rows(results)
    assert [row[3] for row in rows] == [4.0, 2.0, "-", 0.95, 1.2]
    assert rows[-1][:3] == ["RL steps/s, staleness bound 1 vs 0 (12 steps)", 0.6, 0.5]
    assert rows[0][0] == "RL samples/s vs TRL GRPOTrainer (3 steps of 16x8)"


def write_rl_run(run_dir, rewards, train_seconds, staleness):
    """A finished RL run's summary.json and metrics.jsonl as `zaya-rl run` writes them (the fields read)."""
    run_dir.mkdir(parents=True)
    steps = [{"stage": "warmup", "step": 0, "loss": 1.0}]
    steps += [{"stage": "rl", "step": i, "reward": r, "partial_samples": 0} for i, r in enumerate(rewards)]
    steps.append({"stage": "rl", "step": len(rewards), "eval_accuracy": 0.3})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    stage = {"steps": len(rewards), "train_seconds": train_seconds, "phase_seconds": {"generate": 1.0},
             "staleness_histogram": {str(staleness): len(rewards)}, "dropped_batches": 0,
             "eval_sampled": {"accuracy": 0.3}, "eval_greedy": {"accuracy": 0.4}}
    (run_dir / "summary.json").write_text(json.dumps({"stages": {"rl": stage}}))


def test_async_rl_report_keeps_each_finished_bound(tmp_path):
    args = Namespace(recipe="r.yaml", overrides=[], rl_overrides=["resources.placement=split"], quick=False, steps=4,
                     out=tmp_path / "out")
    write_rl_run(tmp_path / "bound0", [0.1, 0.2, 0.3, 0.4], train_seconds=8.0, staleness=0)
    write_rl_run(tmp_path / "bound1", [0.1, 0.1, 0.3, 0.3], train_seconds=5.0, staleness=1)
    rows, rewards = {}, {}
    rows["0"], rewards["bound 0"] = bound_row(tmp_path / "bound0", "rl")
    report(rows, rewards, args, "r")
    written = json.loads((args.out / "async_rl.json").read_text())
    assert list(written["rows"]) == ["0"] and written["rows"]["0"]["speedup_over_bound_0"] == 1.0
    assert written["rows"]["0"]["mean_reward"] == 0.25 and written["rows"]["0"]["mean_reward_last_half"] == 0.35
    rows["1"], rewards["bound 1"] = bound_row(tmp_path / "bound1", "rl")
    report(rows, rewards, args, "r")
    written = json.loads((args.out / "async_rl.json").read_text())
    assert written["rows"]["1"]["speedup_over_bound_0"] == 1.6
    assert written["rows"]["1"]["staleness_histogram"] == {"1": 4}
    assert (args.out / "plots" / "async_rl.png").read_bytes()[:4] == b"\x89PNG"


def test_rl_vs_sft_takes_a_finished_run_only_of_the_same_recipe(tmp_path):
    recipe = load_recipe(Path("recipes/tiny.yaml"), ["seed=0"])
    resolved = {**recipe.model_dump(mode="json"), "run_dir": str(tmp_path)}  # run_dir may differ
    (tmp_path / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved))
    (tmp_path / "summary.json").write_text(json.dumps({"stages": {"warmup": {"steps": 1}, "rl": {"steps": 1}}}))
    assert finished_run(tmp_path, recipe)["stages"]["rl"] == {"steps": 1}
    with pytest.raises(ValueError, match=r"fields that differ: \['seed'\]"):
        finished_run(tmp_path, load_recipe(Path("recipes/tiny.yaml"), ["seed=1"]))
    (tmp_path / "summary.json").write_text(json.dumps({"stages": {"warmup": {"steps": 1}}}))
    with pytest.raises(ValueError, match=r"stages not run: \['rl'\]"):
        finished_run(tmp_path, recipe)
