"""Run checkpoints: atomic, verified, pruned; the learner's optimizer state round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zaya_rl import checkpoint
from zaya_rl.recipe import dump_recipe, load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes/tiny.yaml"


def fill_with(payload: bytes):
    def fill(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(payload)
        (tmp / "state.json").write_text(json.dumps({"step": len(payload)}))
    return fill


def test_write_keeps_the_last_k_and_latest_is_newest(tmp_path):
    for step in (3, 6, 9):
        path = checkpoint.write(tmp_path, step, fill_with(b"x" * step), keep_last=2)
        assert path.name == f"step-{step:08d}"
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-00000006", "step-00000009"]
    assert checkpoint.latest(tmp_path).name == "step-00000009"
    assert not list(checkpoint.checkpoint_dir(tmp_path).glob(".tmp-*"))


def test_corrupt_or_truncated_checkpoints_are_reported_and_skipped(tmp_path):
    checkpoint.write(tmp_path, 1, fill_with(b"good"), keep_last=5)
    truncated = checkpoint.write(tmp_path, 2, fill_with(b"abcdef"), keep_last=5)
    flipped = checkpoint.write(tmp_path, 3, fill_with(b"abcdef"), keep_last=5)
    (truncated / "model" / "weights.bin").write_bytes(b"abc")
    (flipped / "model" / "weights.bin").write_bytes(b"abcdeX")
    reports = []
    assert checkpoint.latest(tmp_path, reports.append).name == "step-00000001"
    assert "does not match its checksum" in reports[0] and "step-00000003" in reports[0]
    assert "has 3 bytes" in reports[1] and "step-00000002" in reports[1]


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path):
    def crash(tmp):
        (tmp / "state.json").write_text("{}")
        raise KeyboardInterrupt

    try:
        checkpoint.write(tmp_path, 5, crash, keep_last=2)
    except KeyboardInterrupt:
        pass
    assert checkpoint.latest(tmp_path) is None


def test_learner_optimizer_state_round_trips(tiny_checkpoint, tmp_path):
    from workers.learner import Learner, Sequence
    from zaya_rl.recipe import DeepSpeedConfig

    learner = Learner(str(tiny_checkpoint), DeepSpeedConfig(zero_stage=2), master_port=29731)
    batch = [Sequence([5, 6, 7], [8, 9, 1]), Sequence([5, 7], [9, 9, 9, 1])]
    learner.sft_step(batch, lr=1e-2)
    learner.save_state(str(tmp_path / "optimizer"))
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.sft_step(batch, lr=1e-2)
    one_more = learner.state_dict()
    learner.load_state(str(tmp_path / "optimizer"))
    restored = learner.state_dict()
    assert all(torch.equal(before[k], restored[k]) for k in before)
    # The same weights and the same Adam moments and step: the next step repeats exactly.
    learner.sft_step(batch, lr=1e-2)
    again = learner.state_dict()
    assert all(torch.equal(one_more[k], again[k]) for k in one_more)


def test_the_kl_reference_is_saved_with_the_state_and_restored(tiny_checkpoint, tmp_path):
    """A resumed run keeps the KL reference it started from, not the resumed policy."""
    from workers.learner import REFERENCE_FILE, Learner, Sequence
    from zaya_rl.recipe import AlgorithmConfig, DeepSpeedConfig

    learner = Learner(str(tiny_checkpoint), DeepSpeedConfig(zero_stage=2), master_port=29732)
    seqs = [Sequence([5, 6, 7], [8, 9, 1], advantage=1.0), Sequence([5, 7], [9, 9, 9, 1], advantage=-1.0)]
    for seq, logprobs in zip(seqs, learner.logprobs(seqs)):
        seq.old_logprobs = logprobs
    learner.save_state(str(tmp_path / "before_rl"))
    learner.rl_step(seqs, lr=1e-2, algorithm=AlgorithmConfig(kl_coef=0.1))  # the reference: the policy before it
    learner.sft_step(seqs, lr=1e-2)
    reference = {k: v.clone() for k, v in learner.reference.state_dict().items()}
    learner.save_state(str(tmp_path / "after_rl"))
    assert (tmp_path / "after_rl" / REFERENCE_FILE).is_file()
    assert not (tmp_path / "before_rl" / REFERENCE_FILE).exists()

    resumed = Learner(str(tiny_checkpoint), DeepSpeedConfig(zero_stage=2), master_port=29733)
    resumed.load_state(str(tmp_path / "after_rl"))
    restored = resumed.reference.state_dict()
    policy = resumed.state_dict()
    assert all(torch.equal(reference[k], restored[k].cpu()) for k in reference)
    assert not all(torch.equal(reference[k], policy[k]) for k in reference)  # two steps apart
    assert not any(p.requires_grad for p in resumed.reference.parameters())
    resumed.load_state(str(tmp_path / "before_rl"))
    assert resumed.reference is None


def run_checkpoint(tmp_path, position: dict, data: dict, recipe_text: str | None, drop: str | None = None) -> Path:
    """A checkpoint as the controller writes one, of a run at `position`."""
    state = {"position": position, "data": data, "curriculum": None, "summary": {}, "metrics_records": 0,
             "random": {}}
    state.pop(drop, None)

    def fill(tmp):
        (tmp / "state.json").write_text(json.dumps(state))
        if recipe_text is not None:
            (tmp / checkpoint.RECIPE).write_text(recipe_text)
    return checkpoint.write(tmp_path, 7, fill, keep_last=1)


def test_a_checkpoint_resumes_with_other_settings_and_later_stages(tmp_path):
    recipe = load_recipe(TINY)
    written = run_checkpoint(tmp_path, {"stage_index": 1, "step": 5}, {"chain_sum": {}}, dump_recipe(recipe))
    assert checkpoint.resumable_state(written, load_recipe(TINY, ["stages.rl.lr=3e-5"]))["position"]["step"] == 5
    after_warmup = run_checkpoint(tmp_path, {"stage_index": 1, "step": 0}, {"chain_sum": {}}, dump_recipe(recipe))
    assert checkpoint.resumable_state(after_warmup, load_recipe(TINY, ["stages.rl.name=grpo"]))


@pytest.mark.parametrize("position, overrides, drop, message", [
    ({"stage_index": 1, "step": 5}, ["stages.rl.name=grpo"], None,
     "written after stages ['warmup', 'rl'] of ['warmup', 'rl']; the recipe 'tiny' has stages ['warmup', 'grpo']"),
    ({"stage_index": 1, "step": 0}, ["stages.warmup.name=sft"], None, "written after stages ['warmup']"),
    ({"stage_index": 0, "step": 3}, [], "metrics_records", "state.json lacks ['metrics_records'] (an older zaya-rl"),
    ({"stage_index": 0, "step": 3}, ["data={sources: [{kind: gym, name: sums, generator: chain_sum}]}"], None,
     "holds the data position of sources ['chain_sum'], which the recipe 'tiny' does not have (its sources: ['sums'])"),
])
def test_a_checkpoint_the_recipe_cannot_continue_is_refused_by_name(tmp_path, position, overrides, drop, message):
    written = run_checkpoint(tmp_path, position, {"chain_sum": {}}, dump_recipe(load_recipe(TINY)), drop)
    with pytest.raises(checkpoint.ResumeError) as err:
        checkpoint.resumable_state(written, load_recipe(TINY, overrides))
    assert str(err.value).startswith(f"{written}: ") and message in str(err.value), str(err.value)
    assert f"--stage NAME --from {written / 'model'}" in str(err.value)


@pytest.mark.parametrize("written_with, resumed_with", [
    ([], ["deepspeed.lora={rank: 8}"]), (["deepspeed.lora={rank: 8}"], []),
    (["deepspeed.lora={rank: 8}"], ["deepspeed.lora={rank: 4}"])])
def test_a_checkpoint_resumes_only_with_the_lora_settings_that_wrote_it(tmp_path, written_with, resumed_with):
    """Its optimizer state is of every weight (full fine-tuning) or of adapters of one shape."""
    written = run_checkpoint(tmp_path, {"stage_index": 1, "step": 5}, {"chain_sum": {}},
                             dump_recipe(load_recipe(TINY, written_with)))
    assert checkpoint.resumable_state(written, load_recipe(TINY, written_with + ["stages.rl.lr=3e-5"]))
    with pytest.raises(checkpoint.ResumeError) as err:
        checkpoint.resumable_state(written, load_recipe(TINY, resumed_with))
    assert str(err.value).startswith(f"{written}: written with deepspeed.lora ")
    assert "resume with the LoRA settings it trained with" in str(err.value)


def test_a_lora_checkpoint_names_its_base_and_the_whole_weights_to_restart_from(tmp_path):
    lora = ["deepspeed.lora={rank: 8}"]

    def fill(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "/base"}))
        state = {"position": {"stage_index": 1, "step": 5}, "data": {"chain_sum": {}}, "curriculum": None,
                 "summary": {}, "metrics_records": 0, "random": {}}
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / checkpoint.RECIPE).write_text(dump_recipe(load_recipe(TINY, lora)))

    written = checkpoint.write(tmp_path, 7, fill, keep_last=1)
    assert checkpoint.base_model_path(written / "model") == Path("/base")
    with pytest.raises(checkpoint.ResumeError) as err:  # its model is adapters: no --from that
        checkpoint.resumable_state(written, load_recipe(TINY, lora + ["stages.rl.name=grpo"]))
    assert "--stage NAME --from RUN_DIR/stages/NAME" in str(err.value)


def test_a_checkpoint_without_its_recipe_resumes_while_the_recipe_has_its_stage(tmp_path):
    inside = run_checkpoint(tmp_path, {"stage_index": 1, "step": 2}, {"chain_sum": {}}, None)
    assert checkpoint.resumable_state(inside, load_recipe(TINY))
    beyond = run_checkpoint(tmp_path, {"stage_index": 2, "step": 2}, {"chain_sum": {}}, None)
    with pytest.raises(checkpoint.ResumeError, match="written after 3 stages, but the recipe 'tiny' has 2"):
        checkpoint.resumable_state(beyond, load_recipe(TINY))


@pytest.mark.parametrize("resume", [["--resume"], ["--resume", "auto"]])
def test_cli_refuses_a_resume_before_anything_starts_or_is_written(tmp_path, resume):
    run_dir = tmp_path / "run"
    written = run_checkpoint(run_dir, {"stage_index": 1, "step": 5}, {"chain_sum": {}},
                             dump_recipe(load_recipe(TINY)))
    (run_dir / "metrics.jsonl").write_text('{"stage": "rl", "step": 4}\n')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(TINY), "--run-dir", str(run_dir),
                           *resume, "--set", "stages.rl.name=grpo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"zaya-rl: cannot resume: {written}: written after stages ['warmup', 'rl']" in proc.stderr
    assert "Ray dashboard" not in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_supervise_does_not_start_again_a_driver_that_was_refused(tmp_path):
    """A driver that exits 2 (here: a checkpoint of another recipe) would be refused again:
    `zaya-rl supervise` ends with its exit code, and says so in supervise.jsonl."""
    run_dir = tmp_path / "run"
    run_checkpoint(run_dir, {"stage_index": 1, "step": 5}, {"chain_sum": {}}, dump_recipe(load_recipe(TINY)))
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "supervise", str(TINY), "--run-dir", str(run_dir),
                           "--set", "stages.rl.name=grpo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "zaya-rl: cannot resume:" in proc.stderr and "starting it again" not in proc.stderr
    [end] = [json.loads(line) for line in (run_dir / "supervise.jsonl").read_text().splitlines()]
    assert (end["exit"], end["restarting"]) == (2, False)
