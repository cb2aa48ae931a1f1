"""The verifier pool on a real local Ray: ordering, and surviving an actor killed mid-batch."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from workers.verifier import VerifierPool

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pool():
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = VerifierPool(num_actors=2, timeout_s=2.0)
    yield pool
    pool.shutdown()
    if started_here:
        ray.shutdown()


def _batch(n: int) -> tuple[list[str], list[str], list[bool]]:
    """n mixed items: integers (some wrong), fractions and expressions."""
    completions, golds, expected = [], [], []
    for i in range(n):
        match i % 4:
            case 0:
                completions.append(f"so \\boxed{{{i}}}"), golds.append(str(i)), expected.append(True)
            case 1:
                completions.append(f"so \\boxed{{{i}}}"), golds.append(str(i + 1)), expected.append(False)
            case 2:
                completions.append(f"<answer>\\frac{{{i}}}{{2}}</answer>"), golds.append(f"{i / 2}"), expected.append(True)
            case 3:
                completions.append(f"Answer: x^2 + {i}x"), golds.append(f"x({i} + x)"), expected.append(True)
    return completions, golds, expected


def test_pool_scores_200_items_in_order(pool):
    completions, golds, expected = _batch(200)
    verdicts = pool.score(completions, golds)
    assert [v.correct for v in verdicts] == expected
    assert pool.stats()["num_verified"] >= 200
    assert pool.score([], []) == []
    assert [v.correct for v in pool.score(["\\boxed{3}"], ["3"])] == [True]  # fewer items than actors


def test_pool_survives_actor_killed_mid_batch(pool):
    completions, golds, expected = _batch(20)
    # An answer that runs into the 2 s limit keeps the first actor busy while it is killed.
    completions[1], golds[1], expected[1] = "\\boxed{9^{9^{9^{9}}}}", "5", False
    before = pool.stats()
    result = {}
    thread = threading.Thread(target=lambda: result.update(verdicts=pool.score(completions, golds)))
    thread.start()
    time.sleep(0.5)
    ray.kill(pool.actors[0], no_restart=False)
    thread.join(timeout=120)
    assert not thread.is_alive()

    verdicts = result["verdicts"]
    assert len(verdicts) == 20
    for verdict, want in zip(verdicts, expected):
        assert verdict.correct == want or verdict.reason.startswith("error"), verdict
    assert verdicts[1].reason in ("timeout", "error: verifier actor died")
    after = pool.stats()
    assert after["num_verified"] == before["num_verified"] + 20
    assert after["num_timeouts"] + after["num_failures"] > before["num_timeouts"] + before["num_failures"]

    completions, golds, expected = _batch(40)
    assert [v.correct for v in pool.score(completions, golds)] == expected
