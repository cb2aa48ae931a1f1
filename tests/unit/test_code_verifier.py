"""Code verification: extraction, the three test styles, and the reasons for a failure,
including programs that try to game the harness. Every program runs in the sandbox."""

from __future__ import annotations

import pytest

from rewards.code import AssertTests, CallTests, CodeVerdict, StdioTests, extract_code, verify_code
from rewards.sandbox import Limits

# Roomy, so that start-up on a loaded 2-core machine never turns a reason into a timeout.
LIMITS = Limits(wall_s=10.0, cpu_s=10)
ADD_CALLS = CallTests("add", [([1, 2], 3), ([2, 2], 4), ([-1, 1], 0), ([0.1, 0.2], 0.3)])
ADD_ASSERTS = AssertTests("def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "add")
SUM_STDIO = StdioTests([("1 2\n", "3\n"), ("2 2\n", "4"), ("5 5\n", "10\n"), ("0 7", "  7  \n\n")])


@pytest.mark.parametrize(
    "completion, code",
    [
        ("Here:\n```python\nprint(1)\n```\nand better:\n```python\nprint(2)\n```\n", "print(2)\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nx = 2\n```", "x = 2\n"),
        ("no fences, just code = 3", "no fences, just code = 3"),
    ],
)
def test_extract_code(completion, code):
    assert extract_code(completion) == code


@pytest.mark.parametrize("tests", [ADD_CALLS, ADD_ASSERTS], ids=["call", "assert"])
def test_correct_function_passes(tests):
    completion = "Sure.\n```python\ndef add(a, b):\n    return a + b\n```"
    assert verify_code(completion, tests, LIMITS) == CodeVerdict(True, 1.0, "passed")


def test_stdio_passes_with_whitespace_normalised():
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert verify_code(program, SUM_STDIO, LIMITS) == CodeVerdict(True, 1.0, "passed")


@pytest.mark.parametrize(
    "program, tests, verdict",
    [
        ("def add(a, b):\n    return a + b if a != -1 else 5\n", ADD_CALLS, CodeVerdict(False, 0.75, "wrong answer on test 3")),
        ("def add(a, b):\n    return a - b\n", ADD_ASSERTS, CodeVerdict(False, 0.0, "wrong answer on test 1")),
        ("a, b = map(int, input().split())\nprint(a * b)\n", SUM_STDIO, CodeVerdict(False, 0.25, "wrong answer on test 1")),
        ("def add(a, b)\n    return a + b\n", ADD_CALLS, CodeVerdict(False, 0.0, "syntax error")),
        ("def add(a, b):\n  return a\n    + b\n", ADD_ASSERTS, CodeVerdict(False, 0.0, "syntax error")),
        ("print(1\n", SUM_STDIO, CodeVerdict(False, 0.0, "syntax error on test 1")),
        ("def add(a, b):\n    return [0] * 10**10\n", ADD_CALLS, CodeVerdict(False, 0.0, "memory on test 1")),
        ("def add(a, b):\n    return add(a, b)\n", ADD_CALLS, CodeVerdict(False, 0.0, "recursion limit on test 1")),
        ("def add(a, b):\n    return 1 / 0\n", ADD_CALLS, CodeVerdict(False, 0.0, "runtime error: ZeroDivisionError: division by zero on test 1")),
        ("raise ValueError('at import')\n", ADD_CALLS, CodeVerdict(False, 0.0, "runtime error: ValueError: at import")),
        ("def other(a, b):\n    return a + b\n", ADD_CALLS, CodeVerdict(False, 0.0, "runtime error: NameError: name 'add' is not defined on test 1")),
    ],
)
def test_failure_reasons(program, tests, verdict):
    assert verify_code(program, tests, LIMITS) == verdict


def test_per_test_time_limit_stops_the_run():
    program = "def add(a, b):\n    if a == 2:\n        while True:\n            pass\n    return a + b\n"
    assert verify_code(program, ADD_CALLS, Limits(wall_s=2.0, cpu_s=2)) == CodeVerdict(False, 0.25, "timeout on test 2")


def test_a_hang_in_c_code_is_killed_by_the_total_limit():
    # 10**10**8 runs in C without checking signals: only the outer kill stops it.
    program = "def add(a, b):\n    return len(str(10**10**8))\n"
    verdict = verify_code(program, ADD_CALLS, Limits(wall_s=1.0, cpu_s=1))
    assert verdict == CodeVerdict(False, 0.0, "timeout on test 1")


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "import sys\nprint('\\nabc test 1 pass\\nabc test 2 pass')\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n",
        "class Int(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Int(0)\n",
    ],
    ids=["sys.exit", "os._exit", "fake reports", "always-equal object", "always-equal int"],
)
def test_gaming_the_harness_fails(program):
    verdict = verify_code(program, ADD_CALLS, LIMITS)
    assert not verdict.passed and verdict.fraction == 0.0, verdict


def test_a_broken_test_is_an_error_of_the_verifier():
    program = "def add(a, b):\n    return a + b\n"
    no_check = AssertTests("def test_add(candidate):\n    assert candidate(1, 2) == 3\n", "add")
    assert verify_code(program, no_check, LIMITS) == CodeVerdict(False, 0.0, "error: the test defines no check(candidate) on test 1")
    passes_a_function = AssertTests("def check(candidate):\n    assert candidate(len, 2) == 3\n", "add")
    assert verify_code(program, passes_a_function, LIMITS) == CodeVerdict(
        False, 0.0, "error: the test passes the program a value that cannot cross: a builtin_function_or_method "
                    "is not plain data (None, bool, int, float, str, bytes, list, tuple, set, frozenset, dict) on test 1")


def test_no_tests_is_an_error():
    assert verify_code("x = 1", StdioTests([]), LIMITS) == CodeVerdict(False, 0.0, "error: no tests")
