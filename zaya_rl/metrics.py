"""One sink for a run's metrics: a JSONL file in the run directory, Ray metrics (gauges on
each node's metrics endpoint, for the Ray dashboard and Prometheus), and wandb when set.

A step's record holds scalars and two tagged kinds of values: `sources`
({source: {"level": .., "pass_rate": .., ...}}) and `expert_load` (per layer, per expert).
`points` turns a record into (metric, tags, value) triples; Ray exports each metric with a
`ray_` prefix (`ray_zaya_reward{stage="rl"}`), which is what dashboards/grafana.json queries.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from zaya_rl.recipe import MetricsConfig


class MetricsSink:
    def __init__(self, run_dir: Path, cfg: MetricsConfig, run_name: str, config: dict):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        with self.path.open() as existing:
            self.num_records = sum(1 for _ in existing)
        self.gauges: dict[str, object] = {}
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, mode=cfg.wandb_mode,
                                    dir=str(run_dir), config=config)

    def log(self, stage: str, step: int, values: dict, steps: int | None = None) -> None:
        """Record `values` of `stage`'s `step`; with `steps` (the stage's length), also the
        stage's progress."""
        record = {"time": time.time(), "stage": stage, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.num_records += 1
        triples = points(stage, step, values, steps)
        self._ray_gauges(triples)
        if self.wandb is not None:
            self.wandb.log({wandb_key(name, tags): value for name, tags, value in triples})

    def rewind(self, num_records: int) -> None:
        """Keep only the first `num_records` records: a resumed run logs its steps once."""
        self.file.close()
        kept = self.path.read_text().splitlines(keepends=True)[:num_records]
        self.path.write_text("".join(kept))
        self.file = self.path.open("a")
        self.num_records = len(kept)

    def _ray_gauges(self, triples: list[tuple[str, dict[str, str], float]]) -> None:
        import ray

        if not ray.is_initialized():
            return
        from ray.util.metrics import Gauge

        for name, tags, value in triples:
            if name.startswith("zaya_verifier_"):
                continue  # VerifierPool exports these itself (tagged by kind); one name, one metric
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"zaya-rl {name.removeprefix('zaya_')}",
                                          tag_keys=tuple(tags))
            self.gauges[name].set(value, tags=tags)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def points(stage: str, step: int, values: dict, steps: int | None = None) -> list[tuple[str, dict[str, str], float]]:
    """A record's numbers as (metric name, tags, value): each scalar tagged by stage, each
    source's numbers by stage and source, expert load by stage, layer and expert, and with
    `steps` the stage's progress. Anything else (nested state, text) stays in the JSONL file."""
    out = []
    if steps is not None:
        out += [("zaya_stage_step", {"stage": stage}, float(step + 1)),
                ("zaya_stage_steps", {"stage": stage}, float(steps)),
                ("zaya_stage_progress", {"stage": stage}, (step + 1) / steps)]
    for key, value in values.items():
        if key == "sources":
            out += [(_name(f"source_{field}"), {"stage": stage, "source": source}, float(v))
                    for source, fields in value.items() for field, v in fields.items() if isinstance(v, int | float)]
        elif key == "expert_load":
            out += [("zaya_expert_load", {"stage": stage, "layer": str(layer), "expert": str(expert)}, float(v))
                    for layer, row in enumerate(value) for expert, v in enumerate(row)]
        elif isinstance(value, int | float):
            out.append((_name(key), {"stage": stage}, float(value)))
    return out


def wandb_key(name: str, tags: dict[str, str]) -> str:
    """The wandb name of a point: rl/reward, rl/source_level/source=gsm8k,
    rl/expert_load/layer=0/expert=3 (wandb groups charts by the part before the first /)."""
    rest = "".join(f"/{k}={v}" for k, v in tags.items() if k != "stage")
    return f"{tags['stage']}/{name.removeprefix('zaya_')}{rest}"


def _name(key: str) -> str:
    return "zaya_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
