"""reasoning-gym items scored by their generator's own scorer (rewards.gym.verify_gym), on real
items: words, lists, partial credit, and the reference a Task carries through checkpoints."""

from __future__ import annotations

import json

import pytest

from rewards.gym import verify_gym
from rewards.math import Verdict
from zaya_rl.recipe import GymSource
from zaya_rl.tasks import Task, build_source


def _tasks(generator: str, count: int = 5) -> list[Task]:
    return build_source(GymSource(kind="gym", name=generator, generator=generator), seed=0).take(0, count)


@pytest.mark.parametrize("generator", ["spell_backward", "letter_jumble", "word_sorting", "number_sorting"])
def test_gold_scores_1_wrong_less_no_answer_0(generator):
    for task in _tasks(generator):
        assert task.gym is not None and task.gym.generator == generator
        right = verify_gym(f"Thinking...\n\\boxed{{{task.answer}}}", task.gym)
        assert right == Verdict(True, "equal", 1.0) and right.reward == 1.0
        wrong = verify_gym("\\boxed{zebra}", task.gym)
        assert not wrong.correct and wrong.reward < 1.0
        for missing in (task.answer, "\\boxed{}"):  # unboxed gold, empty box
            assert verify_gym(missing, task.gym) == Verdict(False, "no answer found")
            assert verify_gym(missing, task.gym).reward == 0.0


def test_scores_are_the_generators_partial_credit_and_forms():
    task = next(t for t in _tasks("word_sorting", 20) if len(t.answer.split(", ")) >= 4)
    words = task.answer.split(", ")
    swapped = ", ".join(words[:-2] + [words[-1], words[-2]])  # the last two in the wrong order
    verdict = verify_gym(f"\\boxed{{{swapped}}}", task.gym)
    assert verdict.reason == "partial" and verdict.reward == pytest.approx((len(words) - 2) / len(words))
    assert verify_gym(f"\\boxed{{{' ,'.join(words)}}}", task.gym).reward == 1.0  # its own list parsing
    [jumble] = _tasks("letter_jumble", 1)
    assert verify_gym(f"\\boxed{{{jumble.answer.upper()}}}", jumble.gym).correct  # case-insensitive


def test_numeric_gym_answers_still_score():
    for task in _tasks("basic_arithmetic"):
        assert verify_gym(f"\\boxed{{{task.answer}}}", task.gym).reward == 1.0
        assert verify_gym(f"\\boxed{{{int(task.answer) + 1}}}", task.gym).reward < 1.0


def test_gym_reference_survives_checkpoints_and_chain_sum_has_none():
    [task] = _tasks("word_sorting", 1)
    restored = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert restored == task and verify_gym(f"\\boxed{{{task.answer}}}", restored.gym).correct
    [chain] = build_source(GymSource(kind="gym", name="sums", generator="chain_sum"), seed=0).take(0, 1)
    assert chain.gym is None  # the math verifier scores chain_sum
    older = {k: v for k, v in chain.to_dict().items() if k != "gym"}  # a checkpoint from before
    assert Task.from_dict(older) == chain
