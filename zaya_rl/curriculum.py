"""Which tasks an RL stage serves next: adaptive difficulty over a task stream's levels.

METHODS.md §4: the level goes up one when the pass rate at the current level is above a
threshold, and down one when it is at (or below) a floor. The pass rate is taken over the
last `window` rewards at the current level, so one lucky group does not move it.
"""

from __future__ import annotations

from collections import deque

from zaya_rl.recipe import CurriculumConfig
from zaya_rl.tasks import Task, TaskStream


class AdaptiveCurriculum:
    def __init__(self, cfg: CurriculumConfig, stream: TaskStream, max_level: int):
        self.cfg = cfg
        self.stream = stream
        self.max_level = max_level
        self.level = cfg.start_level
        self.recent: deque[float] = deque(maxlen=cfg.window)

    def next_batch(self, num_prompts: int) -> list[Task]:
        return self.stream.take(self.level, num_prompts)

    def observe(self, tasks: list[Task], group_pass_rates: list[float]) -> None:
        """Record each prompt's pass rate over its group; maybe change level."""
        self.recent.extend(r for t, r in zip(tasks, group_pass_rates) if t.level == self.level)
        if not self.cfg.adaptive or len(self.recent) < self.cfg.window:
            return
        pass_rate = sum(self.recent) / len(self.recent)
        if pass_rate > self.cfg.raise_above and self.level < self.max_level:
            self._move(+1)
        elif pass_rate <= self.cfg.lower_at_or_below and self.level > 0:
            self._move(-1)

    def pass_rate(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def _move(self, delta: int) -> None:
        self.level += delta
        self.recent.clear()

    def state(self) -> dict:
        """Level and recent pass rates; the task stream's position is checkpointed by its owner."""
        return {"level": self.level, "recent": list(self.recent)}

    def restore(self, state: dict) -> None:
        self.level = state["level"]
        self.recent = deque(state["recent"], maxlen=self.cfg.window)
