"""The verifier actor pool: math answers scored by Ray actors, each owning a MathVerifier.

`VerifierActor` is a thin Ray shell around `rewards.math.MathVerifier`; `VerifierPool`
splits a batch across the actors, retries a chunk once when its actor dies, and counts
what happened (as plain numbers and as Ray metrics). Importing this module does not start
Ray.
"""

from __future__ import annotations

import time

import ray
from ray.util import metrics

from rewards.math import MathVerifier, Verdict

RESTART_WAIT_S = 60.0


class _VerifierShell:
    def __init__(self) -> None:
        self._verifier = MathVerifier()

    def score(self, items: list[tuple[str, str]], timeout_s: float) -> list[Verdict]:
        return self._verifier.score(items, timeout_s)

    def ping(self) -> bool:
        return True


# num_cpus=0: the actor mostly waits on its child; max_task_retries=0: the pool decides
# about retries, so a chunk that kills its actor is not replayed forever.
VerifierActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_VerifierShell)


class VerifierPool:
    """Scores (completion, gold) pairs on `num_actors` verifier actors, in order."""

    def __init__(self, num_actors: int, timeout_s: float = 5.0, name_prefix: str = "verifier") -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.timeout_s = timeout_s
        self.actors = [VerifierActor.options(name=f"{name_prefix}-{i}").remote() for i in range(num_actors)]
        self.num_verified = 0
        self.num_timeouts = 0
        self.num_failures = 0
        self.seconds = 0.0
        self._metrics: dict[str, metrics.Counter] | None = None

    def score(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        """One Verdict per completion, in order; actor deaths become failure verdicts."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        start = time.perf_counter()
        items = list(zip(completions, golds))
        size = max(1, -(-len(items) // len(self.actors)))  # ceil: contiguous chunks
        jobs = []
        for actor, lo in zip(self.actors, range(0, len(items), size)):
            chunk = items[lo : lo + size]
            jobs.append((actor, chunk, actor.score.remote(chunk, self.timeout_s)))
        verdicts = [v for actor, chunk, ref in jobs for v in self._gather(actor, chunk, ref)]
        self._record(verdicts, time.perf_counter() - start)
        return verdicts

    def _gather(self, actor, chunk: list[tuple[str, str]], ref) -> list[Verdict]:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            pass
        if self._wait_alive(actor):
            try:
                return ray.get(actor.score.remote(chunk, self.timeout_s))
            except ray.exceptions.RayActorError:
                pass
        return [Verdict(False, "error: verifier actor died")] * len(chunk)

    @staticmethod
    def _wait_alive(actor) -> bool:
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                return ray.get(actor.ping.remote(), timeout=max(deadline - time.monotonic(), 0.1))
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                break
        return False

    def _record(self, verdicts: list[Verdict], seconds: float) -> None:
        timeouts = sum(v.reason == "timeout" for v in verdicts)
        failures = sum(v.reason.startswith("error") for v in verdicts)
        self.num_verified += len(verdicts)
        self.num_timeouts += timeouts
        self.num_failures += failures
        self.seconds += seconds
        if self._metrics is None:  # lazily: a Counter needs a running Ray
            self._metrics = {
                "items": metrics.Counter("zaya_verifier_items", "Answers scored by the verifier pool."),
                "timeouts": metrics.Counter("zaya_verifier_timeouts", "Answers that hit the time limit."),
                "failures": metrics.Counter("zaya_verifier_failures", "Answers lost to a verifier error."),
                "seconds": metrics.Counter("zaya_verifier_seconds", "Wall time spent in VerifierPool.score."),
            }
        for key, value in (("items", len(verdicts)), ("timeouts", timeouts), ("failures", failures), ("seconds", seconds)):
            if value > 0:  # Counter.inc rejects 0
                self._metrics[key].inc(value)

    def stats(self) -> dict:
        """Totals since the pool was made."""
        return {
            "num_verified": self.num_verified,
            "num_timeouts": self.num_timeouts,
            "num_failures": self.num_failures,
            "seconds": self.seconds,
        }

    def shutdown(self) -> None:
        """Kill the actors (for good: no restart)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
