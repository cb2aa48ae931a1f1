"""Run checkpoints: atomic, verified, pruned; the learner's optimizer state round-trips."""

from __future__ import annotations

import json

import torch

from zaya_rl import checkpoint


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
