"""reasoning-gym answers, scored by the generator's own `score_answer`: it knows its answer's
form (a word, a list, a grid) and may give partial credit in [0, 1].

Owns `GymRef` (which item of which generator: enough to make the item again, so a task
carries four small fields instead of the item), `gym_dataset` (the cached datasets that
zaya_rl.tasks draws its problems from) and `verify_gym`, a pure function like
`rewards.math.verify`. `MathVerifier` runs it in its killable child process, under the same
wall-clock limit per item as math answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import reasoning_gym

from rewards.math import FORMATS, MAX_ANSWER_CHARS, Verdict, extract_answer

BLOCK = 4096  # problems per reasoning-gym dataset instance


@dataclass(frozen=True)
class GymRef:
    """Item `index` of the reasoning-gym dataset (`generator`, `settings_json`, `seed`)."""

    generator: str
    settings_json: str  # the generator's keyword arguments, JSON with sorted keys
    seed: int
    index: int


@lru_cache(maxsize=64)
def gym_dataset(generator: str, settings_json: str, seed: int):
    """reasoning-gym makes item i from Random(seed + i) when it is asked for, so items are made
    one at a time: a block of a hard puzzle costs only what is drawn from it."""
    return reasoning_gym.create_dataset(generator, **json.loads(settings_json), seed=seed, size=BLOCK)


@lru_cache(maxsize=4096)  # a group's samples share their item
def _entry(ref: GymRef) -> dict:
    return gym_dataset(ref.generator, ref.settings_json, ref.seed)[ref.index]


def verify_gym(completion: str, ref: GymRef, formats: tuple[str, ...] = FORMATS) -> Verdict:
    """The generator's score of the final answer in `completion`, as `credit`; `correct` when
    it is 1. Never raises; no time limit of its own (run it through `MathVerifier`)."""
    try:
        answer = extract_answer(completion, formats)
        if not answer:
            return Verdict(False, "no answer found")
        if len(answer) > MAX_ANSWER_CHARS:
            return Verdict(False, "answer too long")
        dataset = gym_dataset(ref.generator, ref.settings_json, ref.seed)
        score = float(dataset.score_answer(answer, _entry(ref)))
        return Verdict(score == 1.0, "equal" if score == 1.0 else "partial" if score > 0 else "not equal", score)
    except Exception as e:  # noqa: BLE001 -- a bad answer must score 0, not stop training
        return Verdict(False, f"error: {type(e).__name__}: {str(e)[:200]}")
