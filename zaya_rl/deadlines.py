"""Deadlines of the remote calls the driver waits on, from the recipe's `timeouts` block.

`wait` is `ray.get` with a deadline: a call still running at its deadline is taken for a hung
actor, and `Hung` names the call, the deadline and the actors that did not answer. Whoever made
the call kills those actors, after which they are recovered as dead ones are
(docs/operations.md, "Failures and recovery"). `Deadlines` sizes each kind of call.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from zaya_rl.recipe import TimeoutsConfig

# A run checkpoint holds the model and the optimizer's master weights and two moments.
CHECKPOINT_COPIES = 4


class Hung(RuntimeError):
    """Remote calls past their deadline; `actors` are the actor handles that did not answer."""

    def __init__(self, call: str, seconds: float, actors: list):
        super().__init__(f"{call} did not answer within its deadline of {seconds:.0f} s "
                         f"({len(actors)} actor(s); see `timeouts` in docs/recipes.md)")
        self.call, self.seconds, self.actors = call, seconds, actors


def wait(refs: list, seconds: float, call: str, actors: list) -> list:
    """`ray.get(refs)` once all are ready, or `Hung` when some are not after `seconds`;
    refs[i] is a call on actors[i]. An actor's death raises Ray's error as ray.get does."""
    wait_ready(refs, seconds, call, actors)
    return ray.get(refs)


def wait_ready(refs: list, seconds: float, call: str, actors: list) -> None:
    """Return once all `refs` are ready, without fetching them here; `Hung` as `wait`."""
    if not refs:
        return
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=max(seconds, 0.0), fetch_local=False)
    if pending:
        raise Hung(call, seconds, [actor for actor, ref in zip(actors, refs) if ref in pending])


@dataclass(frozen=True)
class Deadlines:
    """Seconds each kind of call may take, from `timeouts` and the bytes of the model's weight
    files (workers.learner.weight_bytes)."""

    timeouts: TimeoutsConfig
    weight_bytes: int = 0  # sizes the deadlines of weight syncs and checkpoints

    @property
    def start(self) -> float:
        return self.timeouts.start_seconds

    @property
    def small(self) -> float:
        """A call that does little work: a version check, an address, an engine's sleep."""
        return self.timeouts.min_seconds

    def generate(self, sequences: int, max_tokens: int) -> float:
        return self.timeouts.min_seconds + sequences * max_tokens / self.timeouts.generate_tokens_per_second

    def train(self, tokens: int) -> float:
        return self.timeouts.min_seconds + tokens / self.timeouts.train_tokens_per_second

    def sync(self) -> float:
        return self.timeouts.min_seconds + self.weight_bytes / self.timeouts.transfer_bytes_per_second

    def checkpoint(self) -> float:
        copies = CHECKPOINT_COPIES * self.weight_bytes
        return self.timeouts.min_seconds + copies / self.timeouts.transfer_bytes_per_second

    def score(self, items: int) -> float:
        return self.timeouts.min_seconds + items * self.timeouts.score_seconds_per_item
