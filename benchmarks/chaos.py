"""Fault injection for the fault-tolerance tests and benchmark: start a run in its own
process group, follow its metrics, send one of its actors a signal in the middle of a call
(SIGKILL: it dies; SIGSTOP: it hangs), and start and lose Ray nodes on this machine.

Actors are found by the process title Ray gives a worker while it runs a method
("ray::LearnerWorker.rl_step"), so a signal lands mid-call, never between calls.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def start_run(recipe: Path, run_dir: Path, *extra: str, command: str = "run",
              ray_address: str | None = None) -> subprocess.Popen:
    """`zaya-rl COMMAND` (run, supervise) in its own session, on a local Ray or on the cluster at
    `ray_address`: killing the group takes the driver and the Ray instance it started. Output
    goes to RUN_DIR.log beside the run directory."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env.update(RAY_ADDRESS=ray_address, RAY_AUTH_MODE="disabled")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "zaya_rl.cli", command, str(recipe), "--run-dir", str(run_dir),
                             *extra], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_of(run_dir: Path, stage: str, key: str) -> list[int]:
    """Steps of `stage` logged with `key` (e.g. "reward" for RL steps, "loss" for SFT steps)."""
    return [r["step"] for r in records(run_dir) if r["stage"] == stage and key in r]


def wait_for_step(run_dir: Path, stage: str, key: str, step: int, proc: subprocess.Popen,
                  timeout: float = 900) -> float:
    """Block until `stage` has logged `step`; returns the time it was seen."""
    deadline = time.time() + timeout
    while max(steps_of(run_dir, stage, key), default=-1) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {stage} step {step}")
        if time.time() > deadline:
            raise TimeoutError(f"{stage} step {step} not reached in {timeout} s")
        time.sleep(0.05)
    return time.time()


def title_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def signal_mid_call(actor_class: str, method: str, sig: int, root: int, timeout: float = 300) -> int:
    """Send `sig` to the process of an `actor_class` actor below process `root` (the run's driver
    or Ray node: never another user's actor) while it runs `method`; returns its pid."""
    deadline = time.time() + timeout
    pids = [pid for pid in descendants(root) if title_of(pid).startswith(f"ray::{actor_class}")]
    if not pids:
        raise LookupError(f"no {actor_class} actor process below process {root}")
    while time.time() < deadline:
        for pid in pids:
            if title_of(pid) == f"ray::{actor_class}.{method}":
                os.kill(pid, sig)
                return pid
        time.sleep(0.001)
    raise TimeoutError(f"{actor_class} never ran {method} in {timeout} s")


def process_state(pid: int) -> str | None:
    """The state letter of a live process (R, S, T for stopped, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def driver_pids(run_dir: Path) -> list[int]:
    """Processes of `zaya-rl run ... --run-dir RUN_DIR` (drivers, not their supervisor)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "zaya_rl.cli" in argv and "run" in argv and str(run_dir) in argv:
            pids.append(int(entry))
    return pids


# ---- Ray nodes on this machine -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env() -> dict[str, str]:
    """One trusted machine: no token authentication between the nodes, the CLI and drivers."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return env


def start_node(num_cpus: int, head_address: str | None = None, labels: dict[str, str] | None = None,
               dashboard_port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`ray start --block`: the head (no `head_address`; with a dashboard when `dashboard_port`
    is given, for `ray job submit`) or a node that joins it, with these Ray node `labels`
    (resources.prefer_nodes of a recipe puts workers there). Returns the process (its session
    holds the node's processes) and the head's GCS address. Every port is a free one, so that
    Ray instances of other users of this machine are not disturbed, and the socket paths stay
    under 107 bytes in a short temporary directory."""
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}"]
    if head_address is None:
        head_address = f"127.0.0.1:{free_port()}"
        role = ["--head", f"--port={head_address.split(':')[1]}", f"--ray-client-server-port={free_port()}"]
        role += ([f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1"] if dashboard_port
                 else ["--include-dashboard=false"])
    else:
        role = [f"--address={head_address}"]
    if labels:
        role.append("--labels=" + ",".join(f"{key}={value}" for key, value in labels.items()))
    proc = subprocess.Popen([RAY, "start", "--block", f"--num-cpus={num_cpus}", *role, *ports,
                             f"--temp-dir={tempfile.mkdtemp(prefix='zr-')}", "--disable-usage-stats"],
                            env=node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, head_address


def submit_job(dashboard_port: int, working_dir: Path, entrypoint: list[str], log_path: Path,
               timeout: float = 180) -> subprocess.Popen:
    """`ray job submit` to the head, once the head took the job: the process follows the job and
    exits with 0 when it succeeded. The head's dashboard and its job agent answer some seconds
    after the head starts ("No available agent to submit job"): until then it is submitted again."""
    deadline = time.time() + timeout
    while True:
        with open(log_path, "w") as log:
            job = subprocess.Popen([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
                                    "--working-dir", str(working_dir), "--", *entrypoint],
                                   env=node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while job.poll() is None and "submitted successfully" not in log_path.read_text():
            time.sleep(1)
        if "submitted successfully" in log_path.read_text():
            return job
        if time.time() > deadline:
            raise RuntimeError(f"the head did not take the job in {timeout} s:\n{log_path.read_text()[-2000:]}")
        time.sleep(3)


def wait_for_nodes(head_address: str, count: int, timeout: float = 180) -> None:
    """Block until the cluster has `count` live nodes (asked from a short-lived driver)."""
    code = ("import ray, time\n"
            f"ray.init(address='{head_address}', log_to_driver=False)\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", code], env=node_env(), timeout=timeout, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def lose_node(node: subprocess.Popen) -> None:
    """The node is gone at once, as when its machine fails: SIGKILL to its raylet, agents and
    workers (its session, and any process below it that left the session)."""
    below = descendants(node.pid)
    os.killpg(node.pid, signal.SIGKILL)
    for pid in below:
        if process_state(pid) is not None:
            os.kill(pid, signal.SIGKILL)
    node.wait(timeout=60)


def stop_node(node: subprocess.Popen) -> None:
    """`ray start --block` stops its node on SIGTERM; what is left after a minute is killed."""
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait(timeout=60)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
