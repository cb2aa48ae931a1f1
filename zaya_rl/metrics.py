"""One sink for a run's metrics: a JSONL file in the run directory, Ray metrics (gauges on
each node's metrics endpoint, for the Ray dashboard and Prometheus), and wandb when set.
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

    def log(self, stage: str, step: int, values: dict) -> None:
        record = {"time": time.time(), "stage": stage, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.num_records += 1
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        self._ray_gauges(stage, scalars)
        if self.wandb is not None:
            self.wandb.log({f"{stage}/{k}": v for k, v in scalars.items()})

    def rewind(self, num_records: int) -> None:
        """Keep only the first `num_records` records: a resumed run logs its steps once."""
        self.file.close()
        kept = self.path.read_text().splitlines(keepends=True)[:num_records]
        self.path.write_text("".join(kept))
        self.file = self.path.open("a")
        self.num_records = len(kept)

    def _ray_gauges(self, stage: str, scalars: dict[str, float]) -> None:
        import ray

        if not ray.is_initialized():
            return
        from ray.util.metrics import Gauge

        for key, value in scalars.items():
            name = "zaya_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"zaya-rl {key}", tag_keys=("stage",))
            self.gauges[name].set(value, tags={"stage": stage})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
