"""Which tasks a stage serves next: a mixture of sources, each (in rl stages) at its own adaptive level.

The rule of the ZAYA1-8B Technical Report's curriculum (docs/methods.md, "Curriculum"): a
source's level goes up one when its pass rate at the current level is above a threshold, and
down one when it is at (or below) a floor. The pass rate is taken over the last `window` group
pass rates at that level, checked once a step, so with a long window one lucky group does not
move it (window 1 is ZAYA1's rule: the step's last group decides).

Each prompt's source is the one furthest below its weighted share of the prompts served so
far (ties broken at random), so the mixture follows the weights and, with equal weights,
the least-sampled source comes next. A source may instead serve a fixed pool of prompts
(what a stage's pass-rate filter kept), at the level they were measured.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from zaya_rl.recipe import CurriculumConfig
from zaya_rl.tasks import Task


class TaskSource(Protocol):
    name: str
    num_levels: int

    def take(self, level: int, count: int) -> list[Task]: ...


@dataclass
class SourceStats:
    level: int
    recent: deque[float]
    samples: int = 0  # prompts served
    reward: float = 0.0  # mean pass rate of its groups in the latest step that served it


class AdaptiveCurriculum:
    def __init__(self, cfg: CurriculumConfig, sources: dict[str, TaskSource], weights: dict[str, float],
                 seed: int):
        self.cfg = cfg
        self.sources = sources
        self.weights = weights
        start = cfg.start_level if isinstance(cfg.start_level, int) else 0
        self.stats = {name: SourceStats(min(start, src.num_levels - 1), deque(maxlen=cfg.window))
                      for name, src in sources.items()}
        self.pools: dict[str, list[Task]] = {}
        self.pool_position: dict[str, int] = {}
        self.rng = random.Random(seed)
        self.prepared = False  # the stage's probe or filter has run

    @property
    def level(self) -> int:
        """The first source's level (the only one in a one-source stage)."""
        return next(iter(self.stats.values())).level

    def pass_rate(self, name: str | None = None) -> float:
        recent = self.stats[name or next(iter(self.stats))].recent
        return sum(recent) / len(recent) if recent else 0.0

    def pick_sources(self, count: int) -> list[str]:
        names = [n for n in self.sources if self.pools.get(n, True)]  # an empty pool serves nothing
        if not names:
            raise RuntimeError("no source has prompts to serve (the pass-rate filter kept none)")
        served = {n: self.stats[n].samples for n in names}
        total_weight = sum(self.weights[n] for n in names)
        out = []
        for _ in range(count):
            total = sum(served.values()) + 1
            deficit = {n: self.weights[n] / total_weight * total - served[n] for n in names}
            best = max(deficit.values())
            name = self.rng.choice([n for n in names if deficit[n] > best - 1e-9])
            served[name] += 1
            out.append(name)
        return out

    def next_batch(self, num_prompts: int, levels: list[int] | None = None) -> list[Task]:
        """Prompts at each source's level; with `levels` (sft), item i at levels[i % len(levels)],
        capped at its source's top level."""
        names = self.pick_sources(num_prompts)
        if levels is not None:
            return [self._take(name, 1, min(levels[i % len(levels)], self.sources[name].num_levels - 1))[0]
                    for i, name in enumerate(names)]
        drawn = {name: iter(self._take(name, names.count(name))) for name in dict.fromkeys(names)}
        return [next(drawn[name]) for name in names]

    def _take(self, name: str, count: int, level: int | None = None) -> list[Task]:
        self.stats[name].samples += count
        if name not in self.pools:
            return self.sources[name].take(self.stats[name].level if level is None else level, count)
        pool, start = self.pools[name], self.pool_position.get(name, 0)
        self.pool_position[name] = start + count
        return [pool[(start + i) % len(pool)] for i in range(count)]

    def observe(self, tasks: list[Task], group_pass_rates: list[float]) -> None:
        """Record each prompt's pass rate over its group; maybe change its source's level."""
        by_source: dict[str, list[tuple[int, float]]] = {}
        for task, rate in zip(tasks, group_pass_rates):
            by_source.setdefault(task.source, []).append((task.level, rate))
        for name, results in by_source.items():
            stats = self.stats[name]
            stats.reward = sum(r for _, r in results) / len(results)
            stats.recent.extend(r for level, r in results if level == stats.level)
            if not self.cfg.adaptive or name in self.pools or len(stats.recent) < self.cfg.window:
                continue
            rate = sum(stats.recent) / len(stats.recent)
            if rate > self.cfg.raise_above and stats.level < self.sources[name].num_levels - 1:
                self.set_level(name, stats.level + 1)
            elif rate <= self.cfg.lower_at_or_below and stats.level > 0:
                self.set_level(name, stats.level - 1)

    def set_level(self, name: str, level: int) -> None:
        self.stats[name].level = level
        self.stats[name].recent.clear()

    def num_prompts(self) -> int:
        """Prompts in one pass over the stage's data: each source's pool where the pass-rate
        filter made one, else all its rows (the recipe allows epochs only over finite sources)."""
        return sum(len(self.pools[name]) if name in self.pools else self.sources[name].num_rows
                   for name in self.sources)

    def set_pool(self, name: str, tasks: list[Task]) -> None:
        self.pools[name] = tasks
        self.pool_position[name] = 0

    def metrics(self) -> dict[str, dict]:
        return {name: {"level": s.level, "pass_rate": self.pass_rate(name), "samples": s.samples,
                       "reward": s.reward} for name, s in self.stats.items()}

    def state(self) -> dict:
        """Levels, pass-rate windows, counts, pools and the random state (JSON-able); the
        sources' data positions are checkpointed by their owner, as sources outlive a stage."""
        return {
            "sources": {name: {"level": s.level, "recent": list(s.recent), "samples": s.samples,
                               "reward": s.reward} for name, s in self.stats.items()},
            "pools": {name: [t.to_dict() for t in pool] for name, pool in self.pools.items()},
            "pool_position": dict(self.pool_position),
            "random": list(self.rng.getstate()),
            "prepared": self.prepared,
        }

    def restore(self, state: dict) -> None:
        for name, s in state["sources"].items():
            self.stats[name] = SourceStats(s["level"], deque(s["recent"], maxlen=self.cfg.window),
                                           s["samples"], s["reward"])
        self.pools = {name: [Task.from_dict(t) for t in pool] for name, pool in state["pools"].items()}
        self.pool_position = dict(state["pool_position"])
        version, internal, gauss = state["random"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.prepared = state["prepared"]
