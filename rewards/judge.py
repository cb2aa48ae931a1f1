"""The two ends of a harnessed code test (rewards/code.py), which share no memory.

- `serve(program, requests_fd, answers_fd)` runs in the sandbox: it loads the untrusted
  program and answers the calls to its functions that it reads from the pipe.
- `main()` is the judge, a trusted process (`python -I rewards/judge.py`): it runs the
  tests, `check(candidate)` or (args, expected) cases, and reaches the program only by
  sending it calls. It reports each test's outcome on its own stdout, which the program
  has no way to reach.

Values cross as plain data only: JSON, with tags for what JSON lacks (tuples, sets,
frozensets, bytes, dicts with keys other than strings). The judge builds every value it
receives out of builtin types, so no object of the program's (an `__eq__` that answers
True, an int subclass, a generator, a function) ever reaches the tests, and a return value
that is not plain data fails its test. All the program decides is what its functions
return or raise. What it may do to the code around it (patch builtins, walk frames or the
gc, rewrite sys.modules, print fake results, exit early, kill itself) happens in a process
that decides nothing; the judge also makes itself non-dumpable, so that a process of the
same uid cannot trace it or read its memory.

Messages are lines of JSON. Program to judge: first {"loaded": true} or {"load_error":
[type, message]}, then one answer per call, {"id": n, "value": V} or {"id": n, "error":
[type, message]}. Judge to program: {"id": n, "function": name, "args": [V, ...],
"kwargs": {name: V}}. An answer that is not well formed, is not plain data, answers
another call or is longer than the configured limit fails its test, and no call follows.

The judge reports lines of JSON on its stdout: {"event": "load", "outcome": "loaded" |
"error" | "timeout" | "ended" | "invalid", "detail": ...}, then per test {"event":
"test", "number": i, "outcome": "pass" | "wrong" | "error" | "timeout" | "ended" |
"invalid" | "output_limit" | "test_error", "detail": ...}. "ended": the program's end of
the pipe closed (it exited or crashed); "test_error": the test itself is broken.

This file imports only the standard library: the sandbox runs its source (only `serve`).
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import json
import math
import os
import signal
import sys

FLOAT_TOLERANCE = 1e-6  # (args, expected) cases: floats equal within this, relative or absolute
_PR_SET_DUMPABLE = 4
# Types that cross as plain JSON; the others that cross are tagged.
_JSON_SCALARS = (bool, int, float, str)
_TAGGED = {tuple: "tuple", set: "set", frozenset: "frozenset"}
_PLAIN = "None, bool, int, float, str, bytes, list, tuple, set, frozenset, dict"


# ---- plain data on the wire ---------------------------------------------------------------


def to_wire(value):
    """`value` as JSON-ready data; TypeError for anything but plain data of builtin types
    (exact types: an int subclass is not plain data)."""
    kind = type(value)
    if value is None or kind in _JSON_SCALARS:
        return value
    if kind is list:
        return [to_wire(v) for v in value]
    if kind in _TAGGED:
        return {_TAGGED[kind]: [to_wire(v) for v in value]}
    if kind is dict:
        return {"dict": [[to_wire(k), to_wire(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    raise TypeError(f"a {kind.__name__} is not plain data ({_PLAIN})")


def from_wire(data):
    """The value that `to_wire` encoded, built from builtin types only; ValueError for data
    that no `to_wire` gives, TypeError for an unhashable set element or dict key."""
    kind = type(data)
    if data is None or kind in _JSON_SCALARS:
        return data
    if kind is list:
        return [from_wire(v) for v in data]
    if kind is dict and len(data) == 1:
        [(tag, items)] = data.items()
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if type(items) is list:
            if tag == "tuple":
                return tuple(from_wire(v) for v in items)
            if tag == "set":
                return {from_wire(v) for v in items}
            if tag == "frozenset":
                return frozenset(from_wire(v) for v in items)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in items):
                return {from_wire(k): from_wire(v) for k, v in items}
    raise ValueError("not plain data on the wire")


def same(got, want) -> bool:
    """Equal as plain data: lists and tuples alike, floats within FLOAT_TOLERANCE, every other
    type only equal to its own (True is not 1)."""
    if type(got) is float or type(want) is float:
        numbers = (int, float)
        return (type(got) in numbers and type(want) in numbers
                and math.isclose(got, want, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE))
    if type(got) in (list, tuple) and type(want) in (list, tuple):
        return len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))
    if type(got) is dict and type(want) is dict:
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in got)
    return type(got) is type(want) and got == want


def describe(error: BaseException) -> list[str]:
    """[type name, message], the message cut to 300 characters; for a ProgramError, those of
    the program's exception."""
    if type(error) is ProgramError:
        return [error.name, error.message]
    try:
        message = str(error)
    except BaseException:  # noqa: BLE001 -- a program's exception may refuse to print
        message = ""
    return [type(error).__name__, message.replace("\n", " ")[:300]]


# ---- the program's end, in the sandbox ------------------------------------------------------


def serve(program: str, requests_fd: int, answers_fd: int) -> None:
    """Load `program` as module `solution`, then answer calls until the judge hangs up."""
    requests = os.fdopen(requests_fd, "rb")
    answers = os.fdopen(answers_fd, "wb")

    def send(message: dict) -> None:
        answers.write(json.dumps(message).encode() + b"\n")
        answers.flush()

    namespace = {"__name__": "solution"}
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 -- SystemExit and KeyboardInterrupt included
        send({"load_error": describe(e)})
        return
    send({"loaded": True})
    for line in requests:
        request = json.loads(line)
        try:
            function = namespace.get(request["function"])
            if not callable(function):
                raise NameError(f"name {request['function']!r} is not defined")
            kwargs = {k: from_wire(v) for k, v in request["kwargs"].items()}
            value = function(*from_wire(request["args"]), **kwargs)
            answer = json.dumps({"id": request["id"], "value": to_wire(value)})
        except BaseException as e:  # noqa: BLE001 -- whatever the program raised is its answer
            answer = json.dumps({"id": request["id"], "error": describe(e)})
        answers.write(answer.encode() + b"\n")
        answers.flush()


# ---- the judge, a trusted process ------------------------------------------------------------


class ProgramEnded(BaseException):
    """The program's end of the pipe closed. A BaseException, like the other two below:
    a test's `except Exception` must not carry on past them."""


class InvalidAnswer(BaseException):
    """The program sent something that is no answer to the call made."""


class AnswerTooLarge(BaseException):
    """An answer longer than the judge accepts."""


class LoadError(Exception):
    """The program raised while loading (a syntax error included)."""


class ProgramError(Exception):
    """An exception of the program's own, or a builtin one that is no Exception (SystemExit,
    KeyboardInterrupt) or cannot be made again here; described by the program's names."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


class BrokenTest(Exception):
    """The test asks for something the judge cannot do (a value that cannot cross)."""


class _Timeout(BaseException):
    pass


class Program:
    """The judge's side of the pipe to the sandboxed program: one call at a time."""

    def __init__(self, requests_fd: int, answers_fd: int, max_answer_bytes: int) -> None:
        self.requests = os.fdopen(requests_fd, "wb")
        self.answers = os.fdopen(answers_fd, "rb")
        self.max_answer_bytes = max_answer_bytes
        self.num_calls = 0

    def wait_loaded(self) -> None:
        """Returns once the program is loaded; LoadError if it failed to load."""
        message = self._receive()
        if message == {"loaded": True}:
            return
        error = message.get("load_error") if type(message) is dict else None
        if type(error) is list and len(error) == 2 and all(type(e) is str for e in error):
            raise LoadError(": ".join(error))
        raise InvalidAnswer("neither loaded nor a load error")

    def call(self, function: str, args: tuple, kwargs: dict):
        """What the program's `function` returns for these arguments, as builtin plain data;
        what it raised, as a builtin exception of the same name where there is one."""
        self.num_calls += 1
        try:
            request = {"id": self.num_calls, "function": function, "args": to_wire(list(args)),
                       "kwargs": {k: to_wire(v) for k, v in kwargs.items()}}
        except TypeError as e:
            raise BrokenTest(f"the test passes the program a value that cannot cross: {e}") from None
        try:
            self.requests.write(json.dumps(request).encode() + b"\n")
            self.requests.flush()
        except BrokenPipeError:
            raise ProgramEnded from None
        answer = self._receive()
        if type(answer) is not dict or answer.get("id") != self.num_calls:
            raise InvalidAnswer(f"not an answer to call {self.num_calls}")
        if "value" in answer:
            try:
                return from_wire(answer["value"])
            except Exception as e:  # noqa: BLE001 -- RecursionError and MemoryError included
                raise InvalidAnswer(f"the value is not plain data ({type(e).__name__})") from None
        error = answer.get("error")
        if type(error) is list and len(error) == 2 and all(type(e) is str for e in error):
            raise _program_exception(*error)
        raise InvalidAnswer("neither a value nor an error")

    def _receive(self):
        line = self.answers.readline(self.max_answer_bytes + 1)
        if len(line) > self.max_answer_bytes:
            raise AnswerTooLarge
        if not line.endswith(b"\n"):  # EOF, maybe in the middle of a line
            raise ProgramEnded
        try:
            return json.loads(line)
        except Exception as e:  # noqa: BLE001 -- RecursionError included
            raise InvalidAnswer(f"not JSON ({type(e).__name__})") from None


def _program_exception(name: str, message: str) -> Exception:
    """The builtin exception `name` (so a test may catch the ValueError it expects), or a
    ProgramError for any other name. Only builtin classes are made: nothing of the
    program's runs here."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 -- e.g. UnicodeDecodeError wants five arguments
            error = None
        if type(error) is cls:
            error.raised_by_program = True
            return error
    error = ProgramError(name, message)
    error.raised_by_program = True
    return error


@contextlib.contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise _Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


_NO_EXPECTATION = object()  # assert-style tests decide for themselves


def _run_test(call, want, seconds: float) -> tuple[str, str]:
    """(outcome, detail) of one test."""
    try:
        with _time_limit(seconds):
            got = call()
            passed = want is _NO_EXPECTATION or same(got, want)
    except _Timeout:
        return "timeout", ""
    except ProgramEnded:
        return "ended", ""
    except AnswerTooLarge:
        return "output_limit", ""
    except InvalidAnswer as e:
        return "invalid", str(e)
    except BrokenTest as e:
        return "test_error", str(e)
    except AssertionError as e:
        return "wrong", ": ".join(describe(e))
    except BaseException as e:  # noqa: BLE001 -- the test failed on this exception
        if type(e) is NameError and not getattr(e, "raised_by_program", False):
            return "test_error", f"the test uses a name it does not define: {e}"
        return "error", ": ".join(describe(e))
    return ("pass", "") if passed else ("wrong", "")


def main() -> None:
    # Not dumpable: a process of our uid (the program, where no own uid is given to it)
    # can neither ptrace us nor open our /proc/<pid>/mem.
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    config = json.loads(sys.stdin.read())
    reports = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the tests print goes to stderr, not among the reports

    def report(**event) -> None:
        reports.write(json.dumps(event) + "\n")
        reports.flush()

    program = Program(config["requests_fd"], config["answers_fd"], config["max_answer_bytes"])
    try:
        with _time_limit(config["load_s"]):
            program.wait_loaded()
    except _Timeout:
        return report(event="load", outcome="timeout", detail="")
    except ProgramEnded:
        return report(event="load", outcome="ended", detail="")
    except (InvalidAnswer, AnswerTooLarge) as e:
        return report(event="load", outcome="invalid", detail=str(e) or "answer too large")
    except LoadError as e:
        return report(event="load", outcome="error", detail=str(e))
    report(event="load", outcome="loaded", detail="")

    seconds = config["per_test_s"]
    if config["style"] == "assert":
        entry_point = config["entry_point"]

        def candidate(*args, **kwargs):
            return program.call(entry_point, args, kwargs)

        candidate.__name__ = entry_point
        namespace = {"__name__": "test"}
        try:
            # The task's prompt first: the helpers a test calls (HumanEval's `poly`,
            # `encode_cyclic`) come from the task, not from the program. A prompt that is no
            # program by itself (a bare signature, `def inc(x):`) defines none. The entry
            # point's name is the program's function, as where the test runs after the
            # program (HumanEval/33 calls `sort_third` by name).
            try:
                prompt = compile(config["prompt"], "prompt.py", "exec")
            except SyntaxError:
                prompt = None
            if prompt is not None:
                exec(prompt, namespace)
            namespace[entry_point] = candidate
            exec(compile(config["test"], "test.py", "exec"), namespace)
        except BaseException as e:  # noqa: BLE001 -- the task's code is broken
            return report(event="test", number=1, outcome="test_error", detail=": ".join(describe(e)))
        if not callable(namespace.get("check")):
            return report(event="test", number=1, outcome="test_error", detail="the test defines no check(candidate)")
        tests = [(1, lambda: namespace["check"](candidate), _NO_EXPECTATION)]
    else:
        function = config["function"]
        cases = from_wire(config["cases"])
        tests = [(i, lambda args=args: program.call(function, args, {}), want)
                 for i, (args, want) in enumerate(cases, 1)]
    for number, call, want in tests:
        outcome, detail = _run_test(call, want, seconds)
        report(event="test", number=number, outcome=outcome, detail=detail)
        if outcome in ("timeout", "ended", "invalid", "output_limit"):
            break  # the program is busy, gone or out of step: no further call can be answered


if __name__ == "__main__":
    main()
