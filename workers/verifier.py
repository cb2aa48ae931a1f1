"""The verifier actor pool: math answers, reasoning-gym answers and code scored by Ray actors.

`VerifierActor` is a thin Ray shell: math and reasoning-gym answers go to its
`rewards.math.MathVerifier` (a child process killed at a wall-clock limit per item), code to
`rewards.code.verify_code` (each program in its own sandbox, with limits per test).
`VerifierPool` splits a batch across the actors (on the nodes they prefer), waits for each share
until its deadline (the recipe's `timeouts`), retries a chunk once on the restarted actor when
its actor died, its node was lost or it missed the deadline (hung: the pool kills it and Ray
restarts it), keeps each such event for the run's record, and counts what happened (as plain
numbers and as Ray metrics: items, verifications per second, timeouts, sandbox violations,
failures, hangs; tagged by kind, math (answers, reasoning-gym's included) or code). Importing
this module does not start Ray.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray
from ray.util import metrics

from rewards.code import CodeTests, CodeVerdict, verify_code
from rewards.math import FORMATS, MathVerifier, Verdict, extract_answer
from rewards.sandbox import Limits, isolation, remove_stale_dirs
from zaya_rl.deadlines import Deadlines, Hung, wait
from zaya_rl.placement import cpu_placement
from zaya_rl.recipe import TimeoutsConfig

if TYPE_CHECKING:
    from rewards.gym import GymRef


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


# The actor method that scores each kind, as calls and recovery events name it.
METHODS = {"math": "Verifier.score", "code": "Verifier.score_code"}

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
        timeouts: TimeoutsConfig = TimeoutsConfig(),
        node_labels: dict[str, str] | None = None,
    ) -> None:
        """`num_cpus`: what Ray reserves for each actor (a run's recipe: resources.verifier_cpus);
        `timeouts`: the deadlines of a share of a batch and of an actor's restart; `node_labels`:
        the Ray node labels the actors prefer (resources.prefer_nodes.verifier; default: spread
        over the nodes)."""
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.timeout_s = timeout_s
        self.code_limits = code_limits
        self.deadlines = Deadlines(timeouts)
        self.names = [f"{name_prefix}-{i}" for i in range(num_actors)]
        self.actors = [VerifierActor.options(name=name, num_cpus=num_cpus, **cpu_placement(node_labels)).remote()
                       for name in self.names]
        self.num_verified = 0
        self.num_timeouts = 0
        self.num_failures = 0
        self.num_violations = 0
        self.num_hangs = 0
        self.seconds = 0.0
        self.events: list[dict] = []  # faults of actors and what was done, until take_events()
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
        """Contiguous chunks, one per actor, all due by one deadline (they run side by side); a
        chunk whose actor died, was lost with its node or hung is retried once on the restarted
        actor, then scored `died`."""
        start = time.perf_counter()
        size = max(1, -(-len(items) // len(self.actors)))  # ceil
        jobs = [(index, items[lo : lo + size]) for index, lo in enumerate(range(0, len(items), size))]
        refs = [submit(self.actors[index], chunk) for index, chunk in jobs]
        due = time.monotonic() + self.deadlines.score(size)
        verdicts, hangs = [], 0
        for (index, chunk), ref in zip(jobs, refs):
            result, fault = self._get(index, ref, due, kind)
            if fault is not None:
                detected = time.time()
                if self._wait_alive(self.actors[index]):
                    result, again = self._get(index, submit(self.actors[index], chunk),
                                              time.monotonic() + self.deadlines.score(len(chunk)), kind)
                    hangs += again == "hung"
                hangs += fault == "hung"
                deadline = {"deadline_seconds": self.deadlines.score(size)} if fault == "hung" else {}
                self.events.append({"role": "verifier", "fault": fault, "call": METHODS[kind], **deadline,
                                    "actors": [self.names[index]], "detected_at": detected,
                                    "recovery_seconds": time.time() - detected,
                                    "action": "restarted, scored again" if result is not None
                                    else "restarted, scored as failures"})
            verdicts += result if result is not None else [died] * len(chunk)
        self._record(kind, verdicts, time.perf_counter() - start, hangs)
        return verdicts

    def _get(self, index: int, ref, due: float, kind: str) -> tuple[list | None, str | None]:
        """The chunk's verdicts, or None and what happened to its actor: "died", "unavailable"
        (Ray restarts it, or cannot reach its node) or "hung" (past `due`; the actor is killed
        and Ray restarts it)."""
        actor = self.actors[index]
        try:
            return wait([ref], due - time.monotonic(), METHODS[kind], [actor])[0], None
        except ray.exceptions.ActorUnavailableError:
            return None, "unavailable"
        except ray.exceptions.RayActorError:
            return None, "died"
        except Hung:
            ray.kill(actor, no_restart=False)
            return None, "hung"

    def _wait_alive(self, actor) -> bool:
        """Whether the actor answers again (Ray restarts it, on another node if its node is
        lost) before the deadline of a start."""
        deadline = time.monotonic() + self.deadlines.start
        while time.monotonic() < deadline:
            try:
                return wait([actor.ping.remote()], deadline - time.monotonic(), "Verifier.ping", [actor])[0]
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
            except Hung:
                break
        return False

    def take_events(self) -> list[dict]:
        """The actor faults since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    def _record(self, kind: str, verdicts: list, seconds: float, hangs: int) -> None:
        counts = {
            "items": len(verdicts),
            # "timeout" for math, "timeout on test 3" for code
            "timeouts": sum(v.reason.startswith("timeout") for v in verdicts),
            "failures": sum(v.reason.startswith("error") for v in verdicts),
            "violations": sum(v.reason.startswith("sandbox violation") for v in verdicts),
            "hangs": hangs,
            "seconds": seconds,
        }
        self.num_verified += counts["items"]
        self.num_timeouts += counts["timeouts"]
        self.num_failures += counts["failures"]
        self.num_violations += counts["violations"]
        self.num_hangs += hangs
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
                "hangs": metrics.Counter("zaya_verifier_hangs", "Verifier actors killed at their deadline.", tags),
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
            "num_hangs": self.num_hangs,
            "seconds": self.seconds,
            "items_per_second": self.num_verified / self.seconds if self.seconds else 0.0,
        }

    def isolation(self) -> dict:
        """The code sandbox's isolation, as the first actor's node gives it (its first call:
        within the deadline of a start)."""
        return wait([self.actors[0].isolation.remote()], self.deadlines.start, "Verifier.isolation", self.actors[:1])[0]

    def shutdown(self) -> None:
        """Kill the actors (for good: no restart)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
