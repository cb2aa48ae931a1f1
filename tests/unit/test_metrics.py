import json
import re
from importlib import resources

from zaya_rl.metrics import MetricsSink, points
from zaya_rl.recipe import MetricsConfig

# An RL step's record as the controller logs it (sources: the curriculum's per-source view).
RL_RECORD = {
    "reward": 0.25, "level": 1, "pass_rate": 0.5, "response_tokens": 17.5, "rollout_tokens_per_second": 900.0,
    "loss": 0.1, "lr": 1e-4, "position": {"step": 3}, "expert_load": [[0.5, 1.5], [1.0, 1.0]],
    "sources": {"chain_sum": {"level": 2, "pass_rate": 0.75, "samples": 64, "reward": 0.7},
                "gsm8k": {"level": 0, "pass_rate": 0.0, "samples": 32, "reward": 0.0}},
}


def test_jsonl_records_every_step(tmp_path):
    sink = MetricsSink(tmp_path, MetricsConfig(), "t", {})
    sink.log("rl", 0, {"reward": 0.5, "expert_load": [[1.0, 1.0]]})
    sink.log("rl", 1, {"reward": 0.75})
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["reward"]) for r in records] == [("rl", 0, 0.5), ("rl", 1, 0.75)]
    assert records[0]["expert_load"] == [[1.0, 1.0]]


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricsSink(tmp_path, MetricsConfig(wandb_project="zaya-test", wandb_mode="offline"), "t", {"a": 1})
    sink.log("warmup", 0, {"loss": 1.25})
    sink.log("rl", 1, {"reward": 0.5, "sources": {"gsm8k": {"level": 3}}, "expert_load": [[0.5, 1.5]]}, steps=4)
    logged = dict(sink.wandb.summary)
    assert {k: logged[k] for k in ("warmup/loss", "rl/reward", "rl/source_level/source=gsm8k",
                                   "rl/expert_load/layer=0/expert=1", "rl/stage_progress")} == {
        "warmup/loss": 1.25, "rl/reward": 0.5, "rl/source_level/source=gsm8k": 3,
        "rl/expert_load/layer=0/expert=1": 1.5, "rl/stage_progress": 0.5}
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_rewind_drops_the_records_after_a_checkpoint(tmp_path):
    sink = MetricsSink(tmp_path, MetricsConfig(), "t", {})
    for step in range(5):
        sink.log("rl", step, {"reward": float(step)})
    sink.rewind(3)
    sink.log("rl", 3, {"reward": 30.0})
    sink.close()
    reopened = MetricsSink(tmp_path, MetricsConfig(), "t", {})
    assert reopened.num_records == 4
    reopened.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_points_tag_sources_experts_and_progress():
    triples = points("rl", 2, RL_RECORD, steps=8)
    by_key = {(name, tuple(sorted(tags.items()))): value for name, tags, value in triples}
    assert len(by_key) == len(triples)  # no point twice
    assert by_key[("zaya_reward", (("stage", "rl"),))] == 0.25
    assert by_key[("zaya_stage_progress", (("stage", "rl"),))] == 3 / 8
    assert by_key[("zaya_source_level", (("source", "chain_sum"), ("stage", "rl")))] == 2.0
    assert by_key[("zaya_source_samples", (("source", "gsm8k"), ("stage", "rl")))] == 32.0
    assert by_key[("zaya_expert_load", (("expert", "1"), ("layer", "0"), ("stage", "rl")))] == 1.5
    assert sum(name == "zaya_expert_load" for name, _, _ in triples) == 4
    assert not any(name.startswith("zaya_position") for name, _, _ in triples)  # nested state: JSONL only
    assert all(name != "zaya_stage_progress" for name, _, _ in points("rl", 2, RL_RECORD))  # no steps given


def test_grafana_dashboard_queries_only_metrics_the_sink_emits():
    dashboard = json.loads(resources.files("zaya_rl").joinpath("dashboards/grafana.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queried = {name for q in queries for name in re.findall(r"\b(ray_[a-zA-Z0-9_]+)", q)}
    sft_record = {"loss": 1.0, "lr": 1e-3, "expert_load": [[1.0, 1.0]], "rollout_tokens_per_second": 50.0}
    emitted = {"ray_" + name for stage, record in (("warmup", sft_record), ("rl", RL_RECORD))
               for name, _, _ in points(stage, 0, record, steps=4)}
    assert len(queried) >= 10 and queried <= emitted, queried - emitted
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]) and all(p["targets"] for p in panels)
