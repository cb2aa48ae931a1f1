"""Math answer verification: extract the final answer and compare it with the gold one.

Owns `extract_answer` and `verify` (pure functions that run in the calling process) and
`MathVerifier`, which runs `verify` in one killable child process under a wall-clock limit
per item (and, for items whose gold is a `rewards.gym.GymRef`, reasoning-gym's own scorer
`rewards.gym.verify_gym`: library code fed model output gets the same limit).

Extraction is configurable per task: `formats` lists the places to look for the answer,
in order ("boxed": the last brace-matched `\\boxed{}`, "answer_tag": the last
`<answer>...</answer>`, "answer_line": the last `Answer:` line).

Equivalence: when gold and prediction are both plain numbers (separators `1,000`,
`1{,}000`, `1\\,000` and `1 000`; decimals; scientific notation `1.5e3` and
`1.5 \\times 10^{3}`), integers compare exactly and other numbers within a relative
tolerance of 1e-6 (NUMBER_RELATIVE_TOLERANCE). Everything else goes to math-verify
(gold first): LaTeX expressions, equations such as `x = 2` against `2`, intervals, sets,
tuples, matrices, percentages (`50\\%` equals `50`) and units text (`5\\text{ cm}`).

Why the child process: math-verify's own time limits use `signal.alarm`, which fails off
the main thread (and code that swallows that error scores everything 0). With those limits
turned off, a pathological answer such as `9^{9^{9^{9}}}` makes sympy run forever, so the
only reliable limit is killing the process that runs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import math_verify

if TYPE_CHECKING:
    from rewards.gym import GymRef

MAX_ANSWER_CHARS = 10_000
# Bounds the damage of answers that make sympy build giant numbers (e.g. `100000!!`).
CHILD_ADDRESS_SPACE_BYTES = 2 << 30
STARTUP_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_BOX_TOKENS = re.compile(r"\\boxed\s*\{|\{|\}")
_ANSWER_LINE = re.compile(r"^[ \t*#]*(?:final[ \t]+)?answer[ \t*]*:[ \t*]*(.*)$", re.IGNORECASE | re.MULTILINE)
# Exponents of at most 4 digits: Decimal arithmetic on 1e999999999 would overflow.
_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:e[+-]?\d{1,4})?", re.IGNORECASE)
_TIMES_TEN = re.compile(r"(.+?)\s*(?:\\times|\\cdot)\s*10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|([+-]?\d))")
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\,|\\ | )(?=\d{3}(?!\d))")
NUMBER_RELATIVE_TOLERANCE = Decimal("1e-6")
FORMATS = ("boxed", "answer_tag", "answer_line")


START_FAILED = "error: verifier process failed to start"


@dataclass(frozen=True)
class Verdict:
    """The result of checking one answer; `reason` says why, for logs and metrics. `credit`:
    a reasoning-gym scorer's partial credit in [0, 1]; None where an answer is right or wrong."""

    correct: bool
    reason: str
    credit: float | None = None

    @property
    def reward(self) -> float:
        return float(self.correct) if self.credit is None else self.credit


def extract_answer(text: str, formats: tuple[str, ...] = FORMATS) -> str | None:
    """The final answer in `text`, or None when there is none.

    Tries `formats` in order: "boxed" (content of the last brace-matched `\\boxed{...}`),
    "answer_tag" (of the last `<answer>...</answer>`), "answer_line" (the rest of the last
    `Answer:` line).
    """
    for fmt in formats:
        match fmt:
            case "boxed":
                answer = _last_boxed(text)
            case "answer_tag":
                answer = _last_answer_tag(text)
            case "answer_line":
                answer = _last_answer_line(text)
            case _:
                raise ValueError(f"unknown answer format {fmt!r}; expected one of {FORMATS}")
        if answer is not None:
            return answer.strip()
    return None


def _last_answer_tag(text: str) -> str | None:
    close = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, close) if close != -1 else -1
    return None if start == -1 else text[start + len("<answer>") : close]


def _last_answer_line(text: str) -> str | None:
    last_line = None
    for match in _ANSWER_LINE.finditer(text):
        last_line = match.group(1)
    return None if last_line is None else last_line.strip().rstrip(".").strip("$")


def _last_boxed(text: str) -> str | None:
    # One pass with a stack, so unclosed boxes cost linear time; the closed box that ends
    # last is the outermost of the last answer.
    stack: list[int | None] = []  # content start for a box, None for a plain brace
    best: tuple[int, int] | None = None
    for match in _BOX_TOKENS.finditer(text):
        token = match.group()
        if token == "}":
            if stack:
                start = stack.pop()
                if start is not None:
                    best = (start, match.start())
        elif token == "{":
            stack.append(None)
        else:
            stack.append(match.end())
    return None if best is None else text[best[0] : best[1]]


def _as_number(s: str) -> Decimal | None:
    s = s.replace("{,}", ",").replace("\\!", "").replace("$", "").strip()
    s = _DIGIT_GROUP_SPACE.sub(",", s)
    times_ten = _TIMES_TEN.fullmatch(s)
    if times_ten:
        s = f"{times_ten.group(1)}e{times_ten.group(2) or times_ten.group(3)}"
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def _numbers_equal(gold: Decimal, pred: Decimal) -> bool:
    if gold == pred:
        return True
    if gold == gold.to_integral_value() and pred == pred.to_integral_value():
        return False  # integers: exact
    return abs(gold - pred) <= NUMBER_RELATIVE_TOLERANCE * max(abs(gold), abs(pred))


def verify(completion: str, gold: str, formats: tuple[str, ...] = FORMATS) -> Verdict:
    """Whether the final answer in `completion` equals `gold`. Never raises.

    No time limit of its own: run it through `MathVerifier` when the input is untrusted.
    """
    try:
        pred = extract_answer(completion, formats)
        if not pred:  # None, or an empty box
            return Verdict(False, "no answer found")
        if len(pred) > MAX_ANSWER_CHARS:
            return Verdict(False, "answer too long")
        pred_num, gold_num = _as_number(pred), _as_number(gold)
        if pred_num is not None and gold_num is not None:
            equal = _numbers_equal(gold_num, pred_num)
            return Verdict(equal, "equal" if equal else "not equal")
        # LaTeX is only found inside math delimiters, hence the \boxed wrapping. The time
        # limits are off (None) because they use signal.alarm; the caller kills instead.
        gold_parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=None)
        if not gold_parsed:
            return Verdict(False, "error: gold answer does not parse")
        pred_parsed = math_verify.parse("\\boxed{" + pred + "}", parsing_timeout=None)
        # Not symmetric: gold first.
        equal = math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None)
        return Verdict(equal, "equal" if equal else "not equal")
    except Exception as e:  # noqa: BLE001 -- a bad answer must score 0, not stop training
        return Verdict(False, f"error: {type(e).__name__}: {str(e)[:200]}")


def _die_with_owner(keep_fd: int) -> None:
    # A child stuck in C-level big-integer maths holds the GIL, so no thread can watch for
    # the owner's death. Instead: our parent is the forkserver, which exits once every copy
    # of its inherited "alive" pipe is closed, so close ours (all fds but the pipe to the
    # owner and stdio), and have the kernel SIGKILL us when the forkserver exits.
    if sys.platform != "linux":
        return
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd != keep_fd:
            with contextlib.suppress(OSError):
                os.close(fd)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_main(conn) -> None:
    """Child loop: receive a batch of (completion, gold) and the formats, answer item by item;
    a gold that is a GymRef goes to its generator's scorer."""
    from rewards.gym import GymRef, verify_gym  # here: rewards.gym imports this module

    _die_with_owner(conn.fileno())
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE_BYTES, CHILD_ADDRESS_SPACE_BYTES))
    # math-verify warns that its time limits are off; here that is the design.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The first symbolic comparison imports and compiles lazily (~0.5 s); pay it before
    # "ready" so it never counts against an item's time limit.
    verify("\\boxed{x^2 + x}", "x(x + 1)")
    conn.send("ready")
    while True:
        try:
            batch, formats = conn.recv()
        except EOFError:  # parent is gone
            return
        for completion, gold in batch:
            judge = verify_gym if isinstance(gold, GymRef) else verify
            conn.send(judge(completion, gold, formats))


class MathVerifier:
    """Runs `verify` in one child process, with a wall-clock limit per item.

    A child that overruns the limit is killed (SIGKILL) and replaced; its item scores
    Verdict(False, "timeout"). Not thread-safe: one `score` call at a time.
    """

    def __init__(self) -> None:
        # forkserver with the modules preloaded: a replacement child is a fork of a
        # process that already imported sympy (1-2 s to import) and reasoning-gym (2-5 s),
        # not a fresh interpreter.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([__name__, "rewards.gym"])
        self._proc = None
        self._conn = None

    def _start(self) -> bool:
        """Start a child and wait until it is ready, so start-up never eats an item's time."""
        parent_conn, child_conn = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child_conn,), daemon=True)
        self._conn = parent_conn
        try:
            self._proc.start()
            child_conn.close()  # so the parent sees EOF when the child dies
            if parent_conn.poll(STARTUP_TIMEOUT_S) and parent_conn.recv() == "ready":
                return True
        except Exception:  # noqa: BLE001 -- reported as verdicts by score()
            pass
        self._kill()
        return False

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.pid is not None:  # None: start() itself failed
                self._proc.kill()
                self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def score(self, items: list[tuple[str, str | GymRef]], timeout_s: float = 5.0,
              formats: tuple[str, ...] = FORMATS) -> list[Verdict]:
        """One Verdict per (completion, gold), in order; a gold is an answer string or a
        reasoning-gym item (GymRef). Never hangs, never raises (except ValueError for an
        unknown format)."""
        extract_answer("", formats)  # a bad format is the caller's error: raise it here
        verdicts: list[Verdict] = []
        while len(verdicts) < len(items):
            if self._proc is None and not self._start():
                failed = Verdict(False, START_FAILED)
                return verdicts + [failed] * (len(items) - len(verdicts))
            pending = items[len(verdicts) :]
            try:
                self._conn.send((pending, formats))
            except (OSError, ValueError):  # child already dead: the pipe is broken
                self._kill()
                verdicts.append(Verdict(False, "error: verifier process died"))
                continue
            for _ in pending:
                verdict = self._receive(timeout_s)
                verdicts.append(verdict)
                if self._proc is None:  # killed: resend the rest to a fresh child
                    break
        return verdicts

    def _receive(self, timeout_s: float) -> Verdict:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                return Verdict(False, "timeout")
            try:
                if self._conn.poll(remaining):
                    return self._conn.recv()
            except (EOFError, OSError):
                self._kill()
                return Verdict(False, "error: verifier process died")

    def close(self) -> None:
        """Kill the child process."""
        self._kill()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
