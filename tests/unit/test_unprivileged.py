"""The code sandbox as an unprivileged uid (nobody, 65534), as on a shared GPU cluster
where a run is not root: the sandbox enters a user namespace and gets its mount, PID and
network namespaces there, isolation() says so, and the attack suite
(tests/unit/test_reward_hacking.py) still fails every attack.

These tests run as root (as sessions and CI do) and drop to nobody with setpriv. pyenv
installs Python under /root (mode 700), which nobody cannot enter; a user of a shared
cluster would own their Python, so each test first makes the Python installation
reachable, in a private mount namespace that only it sees: a tmpfs over each directory
others cannot traverse, with the installation bound back.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _run_as_nobody(argv: list[str], stage: Path, timeout_s: float) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip(f"the tests already run unprivileged (uid {os.geteuid()}): every test is a non-root run")
    missing = [tool for tool in ("unshare", "setpriv", "mount") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot drop to an unprivileged uid without {', '.join(missing)}")
    pythons = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})
    blocked = sorted({a for p in pythons + [str(REPO)] for a in _ancestors(p) if not os.stat(a).st_mode & 0o001})
    covered = [p for p in pythons if any(p.startswith(b + "/") for b in blocked)]
    script = ["set -e"]
    for i, path in enumerate(covered):  # keep a handle on each before the tmpfs hides it
        script += [f"mkdir -p {stage}/{i}", f"mount --bind {shlex.quote(path)} {stage}/{i}"]
    script += [f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(b)}" for b in blocked]
    for i, path in enumerate(covered):
        script += [f"mkdir -p {shlex.quote(path)}", f"mount --move {stage}/{i} {shlex.quote(path)}"]
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp", f"PYTHONPATH={REPO}",
           "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8"]
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    script.append("exec " + shlex.join(drop + env + argv))
    setup = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                           cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if setup.returncode != 0 and "mount" in setup.stderr and "Operation not permitted" in setup.stderr:
        pytest.skip(f"cannot make Python reachable for an unprivileged uid here: {setup.stderr.strip()[-300:]}")
    return setup


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


PROBE = """
import json, os
from rewards.sandbox import Limits, isolation, run_python
limits = Limits(wall_s=20.0, cpu_s=20)
fork_bomb = run_python("import os\\nfor _ in range(1000):\\n    os.fork()\\n", limits=limits)
network = run_python("import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\\n", limits=limits)
view = run_python("import os\\nprint(os.getuid(), sorted(p for p in os.listdir('/proc') if p.isdigit()),"
                  " open('/proc/self/status').read().split('CapEff:')[1].split()[0])\\n", limits=limits)
# Every process of the bomb writes its traceback to the one stderr, so lines interleave: report the errors raised.
errors = sorted({line for line in fork_bomb.stderr.splitlines() if "Error:" in line})
print(json.dumps({"uid": os.getuid(), "isolation": isolation(), "fork_bomb": errors,
                  "network": network.stderr.strip().splitlines()[-1], "view": view.stdout.split()}))
"""


def test_the_sandbox_enters_a_user_namespace(tmp_path):
    run = _run_as_nobody([sys.executable, "-c", PROBE], tmp_path, timeout_s=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["uid"] == NOBODY
    assert seen["isolation"] == {
        "summary": "user namespace (not root): mount, PID and network namespaces; the program runs as our uid, "
                   "without capabilities, with a process limit",
        "namespaces": "user",
        "refused": "",
        "network": "network namespace",
        "pid_namespace": True,
        "private_tmp": True,
        "own_uid": False,
        "process_limit": True,
        "error": "",
    }
    assert seen["fork_bomb"] == ["BlockingIOError: [Errno 11] Resource temporarily unavailable"]
    assert seen["network"] == "OSError: [Errno 101] Network is unreachable"
    # Our uid, no capability, and of all processes only init (1) and itself (2) in sight.
    assert seen["view"] == [str(NOBODY), "['1',", "'2']", "0000000000000000"]


def test_the_attack_suite_as_an_unprivileged_uid(tmp_path):
    suite = "tests/unit/test_reward_hacking.py"
    run = _run_as_nobody([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite], tmp_path,
                         timeout_s=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
