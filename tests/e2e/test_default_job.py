"""The default job's whole path through real Ray, vLLM, DeepSpeed and verifier actors."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import chaos
from zaya_rl.models import load_model

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
pytestmark = pytest.mark.ray


def check_run_dir(run_dir: Path, rl_steps: int):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"warmup", "rl"}
    # The installed libraries that shape its figures, to tell two installs' runs apart.
    assert {"torch", "ray", "deepspeed", "transformers"} <= set(summary["packages"])
    # The local-version tag (+cpu, +cu130) is in one or both, depending on how torch was installed.
    assert summary["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    # The code sandbox's isolation is reported; these machines run as root: host namespaces.
    assert summary["sandbox"]["namespaces"] == "host" and summary["sandbox"]["network"] == "network namespace"
    assert summary["placement"] == {"placement": "cpu", "gpus": 0, "learner_devices": ["cpu"],
                                    "weight_transfer": "object_store"}
    for name, stage in summary["stages"].items():
        assert 0.0 <= stage["eval_accuracy"] <= 1.0
        assert stage["eval_sampled"]["n"] == 24
        # One source: its own accuracy is the whole set's.
        assert stage["eval_sampled"]["by_source"]["chain_sum"]["accuracy"] == stage["eval_accuracy"]
        assert stage["wall_seconds"] > 0 and stage["generated_tokens_per_second"] > 0
        assert stage["stopped_by"] == "steps"
        # Each held-out problem's answers and verdicts, for paired comparisons of two runs.
        rows = [json.loads(line) for line in (run_dir / "held_out" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 24 and sum(r["sampled"] for r in rows) == round(24 * stage["eval_accuracy"])
        assert sum(r["greedy"] for r in rows) == round(24 * stage["eval_greedy"]["accuracy"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["stage"] == "warmup" and "loss" in r]
    assert all(r["grad_norm"] > 0 for r in sft)
    # A quarter of each SFT batch are aggregation prompts over samples drawn at the step.
    assert [r["aggregation_prompts"] for r in sft] == [2] * len(sft) and sft
    # Cosine decay over the stage's 4 steps, towards 0.1 of the peak learning rate.
    cosine = [1e-4 + 9e-4 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert [r["lr"] for r in sft] == pytest.approx(cosine)
    rl = [r for r in records if r["stage"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl] == list(range(rl_steps))
    # From the second step on, a quarter of the prompts aggregate the policy's own samples.
    assert [r["aggregation_prompts"] for r in rl] == [0] + [1] * (rl_steps - 1)
    # The learner's weights reached the engine: after a sync both give the same log-probs.
    for r in rl[1:]:
        assert r["mean_abs_logprob_diff"] < 1e-3, r
    # Router replay: the learner ran the engine's experts; in fp32 both sides route alike.
    assert all(r["routing_mismatch"] < 0.01 for r in rl), [r["routing_mismatch"] for r in rl]
    model = load_model(run_dir / "final")
    assert model.config.num_experts == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    return summary


def run_mini(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The mini recipe with 2 RL steps through the CLI on a local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(HERE / "mini.yaml"), "--run-dir",
                           str(run_dir), "--set", "stages.rl.steps=2", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The mini recipe run once through the CLI on a local Ray, with 2 RL steps."""
    run_dir = tmp_path_factory.mktemp("mini") / "run"
    start = time.time()
    proc = run_mini(run_dir)
    print(f"mini recipe through the CLI: {time.time() - start:.0f} s")
    return run_dir, proc


def test_run_through_cli_on_local_ray(mini_run):
    run_dir, proc = mini_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out acc" in proc.stdout
    check_run_dir(run_dir, rl_steps=2)
    assert "steps: 2\n" in (run_dir / "recipe.resolved.yaml").read_text()


def test_report_of_a_finished_and_of_a_running_run(mini_run, tmp_path):
    from PIL import Image

    run_dir, proc = mini_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plots = ["training", "held_out", "tokens_per_second", "step_time", "expert_load", "curriculum"]
    report = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "report", str(run_dir)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (run_dir / "report" / "report.html").read_text()
    for name in plots:
        with Image.open(run_dir / "report" / f"{name}.png") as image:
            image.verify()  # a whole PNG, not a truncated file
            assert image.format == "PNG" and image.width >= 600 and image.height >= 200
        assert f'<img src="{name}.png"' in page
    assert "<td>chain_sum</td><td>24</td>" in page  # the held-out table, per source

    # A run still going has no summary.json yet: the plots from metrics.jsonl, and why not the others.
    running = tmp_path / "running"
    running.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", running)
    report = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "report", str(running)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    drawn = sorted(p.stem for p in (running / "report").glob("*.png"))
    assert drawn == sorted(set(plots) - {"held_out", "step_time"})
    assert (running / "report" / "report.html").read_text().count("summary.json is written when the run finishes") == 2


LORA = "deepspeed.lora={rank: 8, alpha: 16}"


def test_lora_run_passes_the_same_checks_and_resumes(tmp_path):
    """The mini recipe training LoRA adapters (attention and experts) instead of every weight:
    the engines serve the merged weights (the log-prob check), run checkpoints hold the adapters
    alone, the final checkpoint is whole, and a run that lost its last checkpoint resumes from
    the adapters and optimizer state of the one before."""
    from safetensors.torch import load_file

    from zaya_rl import checkpoint
    from zaya_rl.lora import ADAPTER_WEIGHTS

    run_dir = tmp_path / "run"
    proc = run_mini(run_dir, "--set", LORA)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_run_dir(run_dir, rl_steps=2)
    written = checkpoint.complete(run_dir)
    assert [p.name for p in written] == ["step-00000004", "step-00000006"]  # after warmup, after rl
    for path in written:
        assert sorted(p.name for p in (path / "model").iterdir()) == [checkpoint.ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        assert checkpoint.base_model_path(path / "model") == (run_dir / "initial").resolve()
    uninterrupted = load_file(written[-1] / "model" / ADAPTER_WEIGHTS)
    # The warmup moved the adapters' B (zero at the start) by far more than two RL steps at lr 1e-4 can.
    assert max(w.abs().max() for k, w in uninterrupted.items() if ".lora_B." in k) > 2e-3

    shutil.rmtree(written[-1])  # as if the run had died in its RL stage
    resumed = run_mini(run_dir, "--set", LORA, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {written[0]}" in resumed.stdout
    check_run_dir(run_dir, rl_steps=2)
    again = load_file(checkpoint.latest(run_dir) / "model" / ADAPTER_WEIGHTS)
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(again[name], weight, atol=5e-4, rtol=0)


@pytest.mark.slow
def test_ray_job_submit_to_a_head_node(tmp_path):
    """The cluster path: `ray start --head`, then `ray job submit ... -- zaya-rl run`. Every port
    of the head is a free one: other Ray instances on this machine hold Ray's defaults."""
    dashboard = chaos.free_port()
    head, _ = chaos.start_node(num_cpus=2, dashboard_port=dashboard)
    job = None
    try:
        work = tmp_path / "work"
        shutil.copytree(HERE, work / "recipes")
        run_dir, log = tmp_path / "jobrun", tmp_path / "job.log"
        job = chaos.submit_job(dashboard, work, ["zaya-rl", "run", "recipes/mini.yaml", "--run-dir", str(run_dir)], log)
        assert job.wait(timeout=900) == 0, log.read_text()[-3000:]
        assert "succeeded" in log.read_text()
        check_run_dir(run_dir, rl_steps=3)
    finally:
        if job is not None:
            chaos.stop(job)
        chaos.stop_node(head)
