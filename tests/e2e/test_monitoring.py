"""Watching a run live: during an RL stage on a Ray head node, the dashboard's REST API shows
the job and its actors by role, and the node's metrics endpoint serves the run's gauges with
their tags (the curriculum's, per-expert load, progress), covering every metric the shipped
Grafana dashboard queries."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import chaos

HERE = Path(__file__).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def samples(metrics_url: str) -> list:
    """(name, labels, value) of every ray_zaya_* sample the node exports now."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("ray_zaya_")]


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(resources.files("zaya_rl").joinpath("dashboards/grafana.json").read_text())
    return {name for p in dashboard["panels"] for t in p.get("targets", [])
            for name in re.findall(r"\b(ray_[a-zA-Z0-9_]+)", t["expr"])}


def test_dashboard_api_and_metrics_endpoint_during_a_run(tmp_path, tiny_checkpoint):
    # Free ports for everything Ray would otherwise put on a fixed default (6379, 8265, 52365,
    # 10001): other Ray instances on this machine hold those, and a clash kills the head.
    gcs, dashboard, metrics, agent, client = free_ports(5)
    recipe = yaml.safe_load((HERE / "mini.yaml").read_text())
    rl = next(stage for stage in recipe["stages"] if stage["name"] == "rl")
    rl["steps"] = 8  # time to look while it runs
    rl["data"] = {"sources": [{"kind": "gym", "name": "sums", "generator": "chain_sum"},
                              {"kind": "gym", "name": "long_sums", "generator": "chain_sum",
                               "levels": [{"min_terms": 4, "max_terms": 4, "min_digits": 2, "max_digits": 2},
                                          {"min_terms": 5, "max_terms": 5, "min_digits": 3, "max_digits": 3}]}]}
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(recipe))
    # One trusted machine: no token between the dashboard and the test's HTTP calls. Gauges are
    # exported every 2 s instead of 10, so the test sees a step's values soon after it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "2000"}
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="zm-")  # Ray's socket paths must stay under 107 bytes
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api, metrics_url = f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{metrics}/metrics"
    run_dir = tmp_path / "run"
    log = open(tmp_path / "run.log", "w")
    run = None
    try:
        deadline = time.time() + 180
        while True:  # the head's dashboard answers some seconds after it starts
            try:
                get_json(f"{api}/api/version")
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
                time.sleep(1)
        run = subprocess.Popen(
            [sys.executable, "-m", "zaya_rl.cli", "run", str(tmp_path / "mini.yaml"), "--run-dir", str(run_dir),
             "--stage", "rl", "--from", str(tiny_checkpoint)],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while max(chaos.steps_of(run_dir, "rl", "reward"), default=-1) < 1:  # two RL steps logged
            assert head.poll() is None and run.poll() is None, "the Ray head or the run ended"
            assert time.time() < deadline, "no RL step in 600 s"
            time.sleep(0.5)
        # The driver says where to look.
        printed = (tmp_path / "run.log").read_text()
        assert f"Ray dashboard at {api}," in printed and f":{metrics}/metrics" in printed

        # Jobs view: the driver, running `zaya-rl run`.
        jobs = [j for j in get_json(f"{api}/api/jobs/") if j["status"] == "RUNNING"]
        [job] = [j for j in jobs if "zaya_rl.cli run" in j["entrypoint"]]
        assert job["type"] == "DRIVER"
        # Actors view: the job's actors by role and index, each with its class.
        listed = get_json(f"{api}/api/v0/actors?limit=1000")["data"]["result"]["result"]
        alive = {a["name"]: a["class_name"] for a in listed if a["state"] == "ALIVE" and a["job_id"] == job["job_id"]}
        assert alive == {"rollout-0": "RolloutWorker", "learner-0": "LearnerWorker", "verifier-0": "Verifier"}

        # The metrics endpoint: gauges appear one export (about 2 s) after the driver sets them.
        expected = dashboard_metrics()
        deadline = time.time() + 120
        while missing := expected - {name for name, _, _ in samples(metrics_url)}:
            assert time.time() < deadline and run.poll() is None, missing
            time.sleep(1)
        found = samples(metrics_url)
        rl_points = [(name, labels, value) for name, labels, value in found if labels.get("stage") == "rl"]
        # The verifier pool's own metrics (tagged by kind) stay apart from the step records.
        assert not [name for name, _, _ in rl_points if name.startswith("ray_zaya_verifier_")]
        progress = [value for name, _, value in rl_points if name == "ray_zaya_stage_progress"]
        assert progress and all(0 < p <= 1 for p in progress)
        load = {(labels["layer"], labels["expert"]): value for name, labels, value in rl_points
                if name == "ray_zaya_expert_load"}
        assert set(load) == {(str(layer), str(e)) for layer in range(2) for e in range(4)}  # mini: 2 layers, 4 experts
        assert all(0 <= v <= 1 for v in load.values())
        # The curriculum's gauges: one series per source, each a value the run logged for it.
        logged = [r["sources"] for r in chaos.records(run_dir) if r["stage"] == "rl" and "reward" in r]
        for field in ("level", "pass_rate", "samples", "reward"):
            series = {labels["source"]: value for name, labels, value in rl_points if name == f"ray_zaya_source_{field}"}
            assert set(series) == {"sums", "long_sums"}
            assert all(any(abs(value - step[source][field]) < 1e-6 for step in logged)
                       for source, value in series.items()), (field, series)
    finally:
        if run is not None:  # the driver has shown what it had to; its actors die with the head
            run.kill()
            run.wait(timeout=60)
        log.close()
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
