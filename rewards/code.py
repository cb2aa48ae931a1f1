"""Code verification: run a completion's program against tests in the sandbox.

Owns `extract_code` and `verify_code(completion, tests, limits) -> CodeVerdict`, a pure
function of its inputs (it runs subprocesses, but keeps no state). Three test styles:

- `AssertTests`: HumanEval style; the test code defines `check(candidate)`, which is
  called with the program's `entry_point`. One test unit.
- `CallTests`: a function name and `(args, expected)` cases; each case is one test, under
  its own time limit.
- `StdioTests`: `(stdin, expected stdout)` cases; each case is one run of the program, and
  the output is compared line by line with surrounding whitespace and blank lines ignored.

Assert and call tests run in one sandboxed process through a harness that reports each
result on stdout after a random nonce, which it reads from stdin before the program runs:
a program that exits early (`sys.exit(0)`, `os._exit(0)`) or prints fake results scores 0.
Return values compare as plain data (None, bool, int, float, str, list/tuple, dict; floats
within 1e-6), so an object that claims to equal everything does not pass.

Time: `limits.wall_s` (and `cpu_s`) is per test. Harnessed tests get a SIGALRM per test and
the whole run is killed at n * wall_s plus start-up, which stops code stuck in C; a
stdin/stdout test is one run, killed at wall_s, and the first timeout, crash or violation
ends the item (the rest count as failed). A harnessed program can read its own tests (they
are in its source): the harness defends against lazy reward hacks, not a determined one.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from rewards.sandbox import Limits, RunResult, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# Startup of the two interpreters a run needs; added to the time a harness run may take.
_STARTUP_S = 5.0


@dataclass(frozen=True)
class CodeVerdict:
    """`passed`: every test passed; `fraction`: of tests passed; `reason` says why not."""

    passed: bool
    fraction: float
    reason: str


@dataclass(frozen=True)
class AssertTests:
    test: str  # defines check(candidate)
    entry_point: str


@dataclass(frozen=True)
class CallTests:
    fn_name: str
    cases: list[tuple[list, Any]]  # (positional args, expected return value)


@dataclass(frozen=True)
class StdioTests:
    cases: list[tuple[str, str]]  # (stdin, expected stdout)


CodeTests = AssertTests | CallTests | StdioTests


def extract_code(completion: str) -> str:
    """The last ```python (or bare ```) fenced block, else the whole text."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def verify_code(completion: str, tests: CodeTests, limits: Limits = Limits(wall_s=5.0, cpu_s=5)) -> CodeVerdict:
    """Run the program in `completion` against `tests`. `limits.wall_s` is per test."""
    program = extract_code(completion)
    match tests:
        case StdioTests():
            return _check_stdio(program, tests, limits)
        case AssertTests() | CallTests():
            return _check_harnessed(program, tests, limits)
    raise TypeError(f"unknown test style: {type(tests).__name__}")


def _check_stdio(program: str, tests: StdioTests, limits: Limits) -> CodeVerdict:
    num_passed, first_failure = 0, ""
    for i, (stdin, expected) in enumerate(tests.cases, 1):
        run = run_python(program, stdin=stdin, limits=limits)
        if run.returncode == 0 and not run.timed_out and _lines(run.stdout) == _lines(expected):
            num_passed += 1
        elif not first_failure:
            failure = _run_failure(run) if run.returncode or run.timed_out else "wrong answer"
            first_failure = f"{failure} on test {i}"
            if failure != "wrong answer":
                break  # timeouts, crashes and violations repeat: do not pay for them n times
    return _verdict(num_passed, len(tests.cases), first_failure)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _check_harnessed(program: str, tests: AssertTests | CallTests, limits: Limits) -> CodeVerdict:
    num_tests = len(tests.cases) if isinstance(tests, CallTests) else 1
    nonce = secrets.token_hex(16)
    total = replace(limits, wall_s=limits.wall_s * num_tests + _STARTUP_S, cpu_s=limits.cpu_s * num_tests + 1)
    run = run_python(_harness(program, tests, limits.wall_s), stdin=nonce + "\n", limits=total)
    events = [line.split(" ", 2)[1:] for line in run.stdout.splitlines() if line.startswith(nonce + " ")]
    results = [detail for kind, detail in events if kind == "test"]  # "3 pass" / "3 AssertionError: ..."
    num_passed = sum(r.endswith(" pass") for r in results)
    if ["loaded", ""] not in events:
        syntax = next((d for k, d in events if k == "syntax"), None)
        return _verdict(0, num_tests, "syntax error" if syntax is not None else _load_failure(run, events))
    failure = next((r for r in results if not r.endswith(" pass")), None)
    if failure is not None:
        number, error = failure.split(" ", 1)
        reason = "wrong answer" if error.startswith("AssertionError") or error == "wrong" else _exception_reason(error)
        return _verdict(num_passed, num_tests, f"{reason} on test {number}")
    if len(results) < num_tests:  # the harness was cut off mid-test
        return _verdict(num_passed, num_tests, f"{_run_failure(run)} on test {len(results) + 1}")
    return _verdict(num_passed, num_tests, "")


def _load_failure(run: RunResult, events: list[list[str]]) -> str:
    error = next((d for k, d in events if k == "load"), None)
    if error is not None:
        return _exception_reason(error)
    return _run_failure(run) if run.returncode or run.timed_out else "program exited before the tests ran"


def _verdict(num_passed: int, num_tests: int, failure: str) -> CodeVerdict:
    fraction = num_passed / num_tests if num_tests else 0.0
    if not num_tests:
        failure = "error: no tests"
    return CodeVerdict(not failure, fraction, failure or "passed")


def _run_failure(run: RunResult) -> str:
    """Why a run failed, from how it ended and the last line of its stderr."""
    if run.error:
        return run.error
    if run.timed_out or run.returncode in (-24, -9):  # SIGXCPU, or SIGKILL at the CPU hard limit
        return "timeout"
    if run.output_truncated:
        return "output limit exceeded"
    last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
    if run.returncode < 0:
        return f"crashed (signal {-run.returncode})"
    return _exception_reason(last) if last else f"exit code {run.returncode}"


def _exception_reason(error: str) -> str:
    """Reason for an 'ExceptionType: message' line."""
    name = error.split(":", 1)[0].strip()
    if name in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax error"
    if name == "MemoryError":
        return "memory"
    if name == "RecursionError":
        return "recursion limit"
    if "File too large" in error:  # RLIMIT_FSIZE (Python ignores SIGXFSZ, so write fails)
        return "file size limit"
    if "Network is unreachable" in error or "sandbox: network disabled" in error:
        return "sandbox violation: network"
    if name == "BlockingIOError" and "Resource temporarily unavailable" in error:
        return "sandbox violation: process limit"
    if name == "PermissionError":
        return "sandbox violation: permission denied"
    if name == "_HarnessTimeout":
        return "timeout"
    if name == "SystemExit":
        return "program exited before the tests ran"
    return f"runtime error: {error[:200]}"


def _harness(program: str, tests: AssertTests | CallTests, per_test_s: float) -> str:
    """The source of one sandboxed run: load the program, then report each test."""
    if isinstance(tests, AssertTests):
        run_tests = (
            f"exec(compile({tests.test!r}, 'test.py', 'exec'), _ns)\n"
            f"_run(1, lambda: _ns['check'](_ns[{tests.entry_point!r}]))\n"
        )
    else:
        run_tests = (
            f"for _i, (_args, _want) in enumerate({tests.cases!r}, 1):\n"
            f"    _run(_i, lambda: _ns[{tests.fn_name!r}](*_args), _want)\n"
        )
    return _HARNESS.format(program=repr(program), per_test_s=per_test_s, float_tol=1e-6) + run_tests


# The harness keeps the real stdout before the program can replace it; its reports start
# with a newline so that a program's unfinished line cannot swallow them. Values compare
# only as plain data (None, bool, int, float, str, list/tuple, dict), so an object whose
# __eq__ always answers True does not pass.
_HARNESS = """\
import math as _math, signal as _signal, sys as _sys
_nonce = _sys.stdin.readline().strip()
_out = _sys.stdout
def _report(kind, detail=''):
    _out.write('\\n' + _nonce + ' ' + kind + ' ' + detail + '\\n')
    _out.flush()
class _HarnessTimeout(BaseException):
    pass
def _alarm(signum, frame):
    raise _HarnessTimeout('per-test time limit')
def _plain(x):
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) in (list, tuple):
        return [_plain(v) for v in x]
    if type(x) is dict and all(k is None or type(k) in (bool, int, float, str) for k in x):
        return {{k: _plain(v) for k, v in x.items()}}
    raise TypeError('not plain data: ' + type(x).__name__)
def _same(a, b):
    if type(a) is float or type(b) is float:
        return type(a) in (int, float) and type(b) in (int, float) and _math.isclose(a, b, rel_tol={float_tol}, abs_tol={float_tol})
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict and type(b) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
def _describe(e):
    return (type(e).__name__ + ': ' + str(e)).replace('\\n', ' ')[:300]
def _run(i, call, *want):
    _signal.signal(_signal.SIGALRM, _alarm)
    _signal.setitimer(_signal.ITIMER_REAL, {per_test_s})
    try:
        got = call()
        ok = not want or _same(_plain(got), _plain(want[0]))
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _report('test', str(i) + (' pass' if ok else ' wrong'))
    except BaseException as e:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _report('test', str(i) + ' ' + _describe(e))
        if isinstance(e, _HarnessTimeout):
            raise SystemExit(0)  # the next tests would likely hang too: not worth the time
try:
    _code = compile({program}, 'solution.py', 'exec')
except (SyntaxError, ValueError) as e:
    _report('syntax', _describe(e))
    raise SystemExit(0)
_ns = {{'__name__': 'solution'}}
try:
    exec(_code, _ns)
except BaseException as e:
    _report('load', _describe(e))
    raise SystemExit(0)
_report('loaded')
"""
