"""Code verification: run a completion's program against tests in the sandbox.

Owns `extract_code` and `verify_code(completion, tests, limits) -> CodeVerdict`, a pure
function of its inputs (it runs subprocesses, but keeps no state). Three test styles:

- `AssertTests`: HumanEval style; the test code defines `check(candidate)`, which is
  called with the program's `entry_point`. One test unit. `prompt`, when given, is the
  task's own code (HumanEval's prompt), run before the test: the helpers that some tests
  call (`poly`, `encode_cyclic`) then come from the task and not from the program.
- `CallTests`: a function name and `(args, expected)` cases; each case is one test, under
  its own time limit. Return values compare as plain data (floats within 1e-6, lists and
  tuples alike).
- `StdioTests`: `(stdin, expected stdout)` cases; each case is one run of the program, and
  the output is compared line by line with surrounding whitespace and blank lines ignored.

Assert and call tests: the program and the tests share no memory. The program runs in the
sandbox, where rewards/judge.py's `serve` loads it and answers calls over a pipe; the
tests run in the judge, a trusted process of their own, where `candidate` sends each call
down that pipe. Arguments and return values cross as plain data (JSON: None, bool, int,
float, str, bytes, list, tuple, set, frozenset, dict), built again from builtin types on
arrival, so an object whose `__eq__` answers True, a generator or a function returned by
the program fails its test. The program never sees the test code, and nothing it does in
its own process (patch builtins, walk frames, print fake results, exit early) reaches the
judge, whose report goes to the verifier on a pipe the program does not hold.

Time: `limits.wall_s` (and `cpu_s`) is per test, and once more for loading the program.
The judge times each call (a hang in C code included); the first timeout, crash, or
answer out of protocol ends the item (the rest count as failed), and the sandbox is
stopped as soon as the judge is done. A stdin/stdout test is one run, killed at wall_s,
and the first timeout, crash or violation ends the item too. An answer is at most
`limits.output_bytes` long. The test code is trusted: it runs unsandboxed in the judge.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rewards import judge
from rewards.sandbox import CHANNEL_FDS, Limits, RunResult, run_python, start_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# Start-up of the interpreters a run needs; added to the time that loading may take.
_STARTUP_S = 5.0
_JUDGE_SOURCE = Path(judge.__file__).read_text()


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
    prompt: str = ""  # the task's code, run before `test`: the helpers the test may call


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
    try:
        config = _judge_config(tests, limits)
    except TypeError as e:
        return _verdict(0, num_tests, f"error: the test cases are not plain data: {e}")
    # Each test, and loading, within wall_s: the judge times them; this is the backstop.
    total = replace(limits, wall_s=limits.wall_s * (num_tests + 1) + _STARTUP_S, cpu_s=limits.cpu_s * (num_tests + 1))
    requests_read, requests_write = os.pipe()
    answers_read, answers_write = os.pipe()
    try:
        sandbox = start_python(_serve_source(program), limits=total, channel=(requests_read, answers_write))
    except BaseException:
        os.close(requests_write)
        os.close(answers_read)
        raise
    finally:  # the program's ends: from here on only the program holds them
        os.close(requests_read)
        os.close(answers_write)
    events, judge_failure = [], "error: the judge did not run"
    try:
        events, judge_failure = _run_judge(config, requests_write, answers_read, total.wall_s + _STARTUP_S)
    finally:
        # Done with the program. Where it ended by itself, its exit status tells how.
        ended = bool(events) and events[-1]["outcome"] == "ended"
        run = sandbox.wait(grace_s=1.0 if ended else 0.0)
    return _harnessed_verdict(events, judge_failure, run, num_tests)


def _judge_config(tests: AssertTests | CallTests, limits: Limits) -> dict:
    """What the judge reads on its stdin; TypeError for cases that are not plain data."""
    config = {"per_test_s": limits.wall_s, "load_s": limits.wall_s + _STARTUP_S,
              "max_answer_bytes": limits.output_bytes, "requests_fd": 0, "answers_fd": 0}
    if isinstance(tests, AssertTests):
        return config | {"style": "assert", "prompt": tests.prompt, "test": tests.test, "entry_point": tests.entry_point}
    return config | {"style": "call", "function": tests.fn_name, "cases": judge.to_wire([list(c) for c in tests.cases])}


def _serve_source(program: str) -> str:
    """The sandbox's source: judge.py loaded as a module (its main guard stays off), then
    `serve`, which loads the program and answers the judge on the channel's fds."""
    return (
        "_judge = {'__name__': 'judge'}\n"
        f"exec(compile({_JUDGE_SOURCE!r}, 'judge.py', 'exec'), _judge)\n"
        f"_judge['serve']({program!r}, {CHANNEL_FDS[0]}, {CHANNEL_FDS[1]})\n"
    )


def _run_judge(config: dict, requests_fd: int, answers_fd: int, deadline_s: float) -> tuple[list[dict], str]:
    """The judge's reports, and why it stopped short ("" when it did not). Closes the two
    fds once the judge holds them, so that only the judge keeps the program's pipe open."""
    config = config | {"requests_fd": requests_fd, "answers_fd": answers_fd}
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", judge.__file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True, pass_fds=(requests_fd, answers_fd),
        )
    finally:
        os.close(requests_fd)
        os.close(answers_fd)
    failure = ""
    try:
        out, err = process.communicate(json.dumps(config).encode(), timeout=deadline_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        failure = "timeout"
    # The judge is trusted: every line it wrote whole is a report.
    events = [json.loads(line) for line in out.decode().splitlines() if line.endswith("}")]
    if process.returncode and not failure:
        failure = f"error: the judge failed: {err.decode(errors='replace').strip()[-300:]}"
    return events, failure


def _harnessed_verdict(events: list[dict], judge_failure: str, run: RunResult, num_tests: int) -> CodeVerdict:
    load = next((e for e in events if e["event"] == "load"), None)
    if load is None:
        return _verdict(0, num_tests, judge_failure or "error: the judge reported nothing")
    if load["outcome"] != "loaded":
        return _verdict(0, num_tests, _failure(load, run, "program exited before the tests ran"))
    results = [e for e in events if e["event"] == "test"]
    num_passed = sum(e["outcome"] == "pass" for e in results)
    failure = next((e for e in results if e["outcome"] != "pass"), None)
    if failure is not None:
        return _verdict(num_passed, num_tests, f"{_failure(failure, run, 'program exited')} on test {failure['number']}")
    if len(results) < num_tests:  # the judge was cut off mid-test
        return _verdict(num_passed, num_tests, f"{judge_failure or 'error: the judge stopped'} on test {len(results) + 1}")
    return _verdict(num_passed, num_tests, "")


def _failure(event: dict, run: RunResult, exited: str) -> str:
    """Why a load or a test of the judge's reports failed; `exited`: for a program that
    ended by itself without an error."""
    match event["outcome"]:
        case "wrong":
            return "wrong answer"
        case "error" if event["detail"].startswith("SystemExit"):
            return exited
        case "error":
            return _exception_reason(event["detail"])
        case "timeout":
            return "timeout"
        case "output_limit":
            return "output limit exceeded"
        case "invalid":
            return f"invalid answer: {event['detail']}"
        case "test_error":
            return f"error: {event['detail']}"
        case "ended":
            return _run_failure(run) if run.returncode or run.timed_out or run.error else exited
    raise ValueError(f"unknown outcome in the judge's report: {event}")


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
    return f"runtime error: {error[:200]}"
