"""The verifier pool on a real local Ray: math, reasoning-gym and code items in order, and
surviving an actor killed or stopped mid-batch (restart and retry)."""

from __future__ import annotations

import glob
import os
import signal
import socket
import tempfile
import threading
import time

import pytest
import ray

from benchmarks.chaos import process_state, signal_mid_call
from rewards.code import CallTests, CodeVerdict, StdioTests
from rewards.gym import verify_gym
from rewards.math import verify
from rewards.sandbox import Limits
from workers.verifier import VerifierPool
from zaya_rl.recipe import GymSource, TimeoutsConfig
from zaya_rl.tasks import build_source

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = VerifierPool(num_actors=2, timeout_s=2.0, code_limits=Limits(wall_s=10.0, cpu_s=10))
    yield pool
    pool.shutdown()


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
    assert [v.correct for v in pool.score(["<answer>4</answer> \\boxed{5}"], ["4"], formats=("answer_tag",))] == [True]


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


def test_pool_scores_gym_items_by_their_generator(pool):
    """Words and lists next to a math answer: each gym item gets its generator's score,
    partial credit included, as the same function gives in this process."""
    tasks = [t for g in ("word_sorting", "spell_backward")
             for t in build_source(GymSource(kind="gym", name=g, generator=g), seed=0).take(0, 4)]
    completions, golds = ["so \\boxed{3}"], ["3"]
    for t in tasks:
        words = t.answer.split(", ")
        partial = ", ".join(words[:-2] + [words[-1], words[-2]]) if len(words) >= 3 else "zebra"
        completions += [f"\\boxed{{{t.answer}}}", f"\\boxed{{{partial}}}", "\\boxed{zebra}", t.answer]
        golds += [t.gym] * 4
    verdicts = pool.score(completions, golds)
    assert verdicts == [verify(c, g) if isinstance(g, str) else verify_gym(c, g) for c, g in zip(completions, golds)]
    rewards = [v.reward for v in verdicts]
    assert rewards[0] == 1.0 and rewards[1::4] == [1.0] * len(tasks)  # math answer, gym golds
    assert rewards[4::4] == [0.0] * len(tasks)  # no boxed answer
    assert any(0.0 < r < 1.0 for r in rewards[2::4])  # word_sorting's partial credit


ADD = CallTests("add", [([1, 2], 3), ([5, 5], 10)])
KILL_PARENTS = (
    "import os, signal\n"
    "for pid in (os.getppid(), 1, -1):\n"
    "    try:\n"
    "        os.kill(pid, signal.SIGKILL)\n"
    "    except OSError:\n"
    "        pass\n"
)


def test_pool_scores_code_in_order(pool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        items = [
            ("```python\ndef add(a, b):\n    return a + b\n```", ADD, CodeVerdict(True, 1.0, "passed")),
            ("def add(a, b):\n    return a * b\n", ADD, CodeVerdict(False, 0.0, "wrong answer on test 1")),
            ("print(int(input()) * 2)", StdioTests([("4", "8"), ("5", "10")]), CodeVerdict(True, 1.0, "passed")),
            ("while True:\n    pass\n", StdioTests([("", "")]), CodeVerdict(False, 0.0, "timeout on test 1")),
            (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))", StdioTests([("", "")]),
             CodeVerdict(False, 0.0, "sandbox violation: network on test 1")),
            # Tries to kill the actor (its parent's parent), init and everything it may signal.
            (KILL_PARENTS + "print('alive')", StdioTests([("", "alive")]), CodeVerdict(True, 1.0, "passed")),
            ("def add(a, b):\n    return a + b\n", ADD, CodeVerdict(True, 1.0, "passed")),
        ]
        before = pool.stats()
        verdicts = pool.score_code([c for c, _, _ in items], [t for _, t, _ in items])
    assert verdicts == [v for _, _, v in items]
    after = pool.stats()
    assert after["num_verified"] - before["num_verified"] == len(items)
    assert after["num_timeouts"] - before["num_timeouts"] == 1
    assert after["num_violations"] - before["num_violations"] == 1
    assert after["num_failures"] == before["num_failures"]  # no actor died


def test_pool_retries_code_when_its_actor_dies(pool):
    # The first actor's chunk sleeps 2 s per item; the actor is killed under it, restarts,
    # and the chunk is scored again from the start.
    slow = "import time\ntime.sleep(2)\ndef add(a, b):\n    return a + b\n"
    completions = [slow, slow, "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"]
    before = pool.stats()
    result = {}
    thread = threading.Thread(target=lambda: result.update(verdicts=pool.score_code(completions, [ADD] * 4)))
    thread.start()
    time.sleep(1.0)
    ray.kill(pool.actors[0], no_restart=False)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [v.reason for v in result["verdicts"]] == ["passed", "passed", "passed", "wrong answer on test 1"]
    # The killed actor's sandbox directory was removed by its successor.
    dirs = [os.path.basename(d).split("-")[2] for d in glob.glob(os.path.join(tempfile.gettempdir(), "zaya-sandbox-*"))]
    assert [pid for pid in dirs if not os.path.exists(f"/proc/{pid}")] == []
    assert pool.stats()["num_verified"] == before["num_verified"] + 4


def test_pool_kills_a_hung_actor_and_scores_its_chunk_again(ray_local):
    """An actor stopped mid-chunk (alive, never answering) misses the chunk's deadline: the pool
    kills it, Ray restarts it, and the chunk is scored again."""
    pool = VerifierPool(num_actors=2, timeout_s=2.0, name_prefix="hang",
                        timeouts=TimeoutsConfig(min_seconds=3, score_seconds_per_item=0.5))
    assert ray.get([actor.ping.remote() for actor in pool.actors])  # their processes are up
    completions, golds, expected = _batch(20)
    # An answer that runs into the 2 s limit keeps the first actor in the call long enough to stop it.
    completions[1], golds[1], expected[1] = "\\boxed{9^{9^{9^{9}}}}", "5", False
    result = {}
    thread = threading.Thread(target=lambda: result.update(verdicts=pool.score(completions, golds)))
    thread.start()
    stopped = signal_mid_call("Verifier", "score", signal.SIGSTOP, os.getpid())
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [v.correct for v in result["verdicts"]] == expected
    assert process_state(stopped) is None  # killed, not left stopped
    [event] = pool.take_events()
    assert (event["fault"], event["action"], event["call"]) == ("hung", "restarted, scored again", "Verifier.score")
    assert event["actors"] in (["hang-0"], ["hang-1"])  # the one stopped first
    assert pool.stats()["num_hangs"] == 1 and pool.stats()["num_failures"] == 0
    assert pool.take_events() == []
    pool.shutdown()
