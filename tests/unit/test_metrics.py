import json

from zaya_rl.metrics import MetricsSink
from zaya_rl.recipe import MetricsConfig


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
