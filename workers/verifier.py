"""The verifier actor pool: math answers, reasoning-gym answers and code scored by Ray actors.

`VerifierActor` is a thin Ray shell: math and reasoning-gym answers go to its
`rewards.math.MathVerifier` (a child process killed at a wall-clock limit per item), code to
`rewards.code.verify_code` (each program in its own sandbox, with limits per test).
`VerifierPool` splits a batch across the actors, retries a chunk once on the restarted actor
when its actor dies, and counts what happened (as plain numbers and as Ray metrics: items,
verifications per second, timeouts, sandbox violations, failures; tagged by kind, math
(answers, reasoning-gym's included) or code). Importing this module does not start Ray.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray
from ray.util import metrics

from rewards.code import CodeTests, CodeVerdict, verify_code
from rewards.math import FORMATS, MathVerifier, Verdict, extract_answer
from rewards.sandbox import Limits, isolation, remove_stale_dirs

if TYPE_CHECKING:
    from rewards.gym import GymRef

RESTART_WAIT_S = 60.0


class Verifier:
    def __init__(self) -> None:
        self._verifier = MathVerifier()
        remove_stale_dirs()  # left by this actor's previous life, if it was killed mid-run

    def score(self, items: list[tuple[str, str | GymRef]], timeout_s: float,
              formats: tuple[str, ...] = FORMATS) -> list[Verdict]:
        return self._verifier.score(items, timeout_s, formats)

    def score_code(self, items: list[tuple[str, CodeTests]], limits: Limits) -> list[CodeVerdict]:
        return [verify_code(completion, tests, limits) for completion, tests in items]

    def ping(self) -> bool:
        return True

    def isolation(self) -> dict:
        """What the code sandbox gets on this actor's node (rewards/sandbox.py)."""
        return isolation()


# max_task_retries=0: the pool decides about retries, so a chunk that kills its actor is not
# replayed forever. The pool sets each actor's num_cpus.
VerifierActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(Verifier)


class VerifierPool:
    """Scores (completion, gold) pairs, a gold being a math answer or a reasoning-gym item,
    and code (completion, tests) on `num_actors` verifier actors, in order."""

    def __init__(
        self,
        num_actors: int,
        timeout_s: float = 5.0,
        name_prefix: str = "verifier",
        code_limits: Limits = Limits(wall_s=5.0, cpu_s=5),
        num_cpus: float = 0.0,
    ) -> None:
        """`num_cpus`: what Ray reserves for each actor (a run's recipe: resources.verifier_cpus)."""
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.timeout_s = timeout_s
        self.code_limits = code_limits
        self.actors = [VerifierActor.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus).remote()
                       for i in range(num_actors)]
        self.num_verified = 0
        self.num_timeouts = 0
        self.num_failures = 0
        self.num_violations = 0
        self.seconds = 0.0
        self._metrics: dict | None = None

    def score(self, completions: list[str], golds: list[str | GymRef],
              formats: tuple[str, ...] = FORMATS) -> list[Verdict]:
        """One Verdict per completion, in order; actor deaths become failure verdicts. A gold is
        an answer string (math verifier) or a GymRef (its generator's scorer; `Verdict.reward`
        holds the partial credit). `formats`: where to look for the answer (see
        rewards.math.extract_answer)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        extract_answer("", formats)  # an unknown format is the caller's error: raise it here
        died = Verdict(False, "error: verifier actor died")
        items = list(zip(completions, golds))
        return self._fan_out("math", items, lambda actor, chunk: actor.score.remote(chunk, self.timeout_s, formats), died)

    def score_code(self, completions: list[str], tests: list[CodeTests], limits: Limits | None = None) -> list[CodeVerdict]:
        """One CodeVerdict per completion, in order. `limits` (default `code_limits`) is per
        test: `wall_s` of one test or one stdin case."""
        if len(completions) != len(tests):
            raise ValueError(f"{len(completions)} completions but {len(tests)} tests")
        limits = limits or self.code_limits
        died = CodeVerdict(False, 0.0, "error: verifier actor died")
        items = list(zip(completions, tests))
        return self._fan_out("code", items, lambda actor, chunk: actor.score_code.remote(chunk, limits), died)

    def _fan_out(self, kind: str, items: list, submit, died) -> list:
        """Contiguous chunks, one per actor; a chunk whose actor died is retried once on the
        restarted actor, then scored `died`."""
        start = time.perf_counter()
        size = max(1, -(-len(items) // len(self.actors)))  # ceil
        jobs = [(actor, items[lo : lo + size]) for actor, lo in zip(self.actors, range(0, len(items), size))]
        refs = [submit(actor, chunk) for actor, chunk in jobs]
        verdicts = []
        for (actor, chunk), ref in zip(jobs, refs):
            result = self._get(ref)
            if result is None and self._wait_alive(actor):
                result = self._get(submit(actor, chunk))
            verdicts += result if result is not None else [died] * len(chunk)
        self._record(kind, verdicts, time.perf_counter() - start)
        return verdicts

    @staticmethod
    def _get(ref) -> list | None:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            return None

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

    def _record(self, kind: str, verdicts: list, seconds: float) -> None:
        counts = {
            "items": len(verdicts),
            # "timeout" for math, "timeout on test 3" for code
            "timeouts": sum(v.reason.startswith("timeout") for v in verdicts),
            "failures": sum(v.reason.startswith("error") for v in verdicts),
            "violations": sum(v.reason.startswith("sandbox violation") for v in verdicts),
            "seconds": seconds,
        }
        self.num_verified += counts["items"]
        self.num_timeouts += counts["timeouts"]
        self.num_failures += counts["failures"]
        self.num_violations += counts["violations"]
        self.seconds += seconds
        if self._metrics is None:  # lazily: a metric needs a running Ray
            tags = ("kind",)
            self._metrics = {
                "items": metrics.Counter("zaya_verifier_items", "Answers scored by the verifier pool.", tags),
                "timeouts": metrics.Counter("zaya_verifier_timeouts", "Answers that hit the time limit.", tags),
                "failures": metrics.Counter("zaya_verifier_failures", "Answers lost to a verifier error.", tags),
                "violations": metrics.Counter(
                    "zaya_verifier_sandbox_violations", "Programs stopped by the sandbox (network, processes, ...).", tags
                ),
                "seconds": metrics.Counter("zaya_verifier_seconds", "Wall time spent scoring batches.", tags),
                "rate": metrics.Gauge("zaya_verifier_items_per_second", "Verifications per second, last batch.", tags),
            }
        for key, value in counts.items():
            if value > 0:  # Counter.inc rejects 0
                self._metrics[key].inc(value, tags={"kind": kind})
        if verdicts and seconds > 0:
            self._metrics["rate"].set(len(verdicts) / seconds, tags={"kind": kind})

    def stats(self) -> dict:
        """Totals since the pool was made, math and code together."""
        return {
            "num_verified": self.num_verified,
            "num_timeouts": self.num_timeouts,
            "num_failures": self.num_failures,
            "num_violations": self.num_violations,
            "seconds": self.seconds,
            "items_per_second": self.num_verified / self.seconds if self.seconds else 0.0,
        }

    def isolation(self) -> dict:
        """The code sandbox's isolation, as the first actor's node gives it."""
        return ray.get(self.actors[0].isolation.remote())

    def shutdown(self) -> None:
        """Kill the actors (for good: no restart)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
