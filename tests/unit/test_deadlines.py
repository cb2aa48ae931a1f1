"""Deadlines from the recipe's `timeouts` block, and `wait`, ray.get with a deadline, on a real
local Ray."""

import time
from pathlib import Path

import pytest
import ray

from zaya_rl.deadlines import CHECKPOINT_COPIES, Deadlines, Hung, wait
from zaya_rl.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_deadlines_grow_with_the_size_of_each_call():
    timeouts = load_recipe(ROOT / "recipes/tiny.yaml", [
        "timeouts.min_seconds=10", "timeouts.generate_tokens_per_second=50", "timeouts.train_tokens_per_second=200",
        "timeouts.transfer_bytes_per_second=1e6", "timeouts.score_seconds_per_item=2"]).timeouts
    deadlines = Deadlines(timeouts, weight_bytes=3_000_000)
    assert deadlines.generate(sequences=32, max_tokens=64) == 10 + 32 * 64 / 50
    assert deadlines.generate(sequences=64, max_tokens=64) > deadlines.generate(sequences=32, max_tokens=64)
    assert deadlines.train(tokens=4000) == 10 + 4000 / 200
    assert deadlines.sync() == 10 + 3
    assert deadlines.checkpoint() == 10 + CHECKPOINT_COPIES * 3
    assert deadlines.score(items=8) == 10 + 16
    assert (deadlines.small, deadlines.start) == (10, timeouts.start_seconds)


@pytest.mark.parametrize("item, message", [
    ("timeouts.min_seconds=0", "timeouts.min_seconds: Input should be greater than 0"),
    ("timeouts.train_seconds=5", "timeouts.train_seconds: Extra inputs are not permitted"),
    ("timeouts.score_seconds_per_item=soon", "timeouts.score_seconds_per_item: Input should be a valid number"),
])
def test_a_bad_deadline_is_named(item, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/tiny.yaml", [item])
    assert message in str(err.value)


@ray.remote(num_cpus=0)
class Sleeper:
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@pytest.mark.ray
def test_wait_names_the_actors_that_did_not_answer(ray_local):
    quick, slow = Sleeper.remote(), Sleeper.remote()
    assert wait([quick.sleep.remote(0.1), slow.sleep.remote(0.2)], 30, "sleep", [quick, slow]) == [0.1, 0.2]
    assert wait([], 0, "nothing", []) == []
    with pytest.raises(Hung) as hung:
        wait([quick.sleep.remote(0.1), slow.sleep.remote(60)], 3, "sleep", [quick, slow])
    assert hung.value.actors == [slow] and hung.value.call == "sleep"
    assert "sleep did not answer within its deadline of 3 s" in str(hung.value)
    for actor in (quick, slow):
        ray.kill(actor)
