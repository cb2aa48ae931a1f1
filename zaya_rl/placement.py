"""Where the workers run. `plan` is pure: the GPU bundles a recipe needs and, for every learner
rank and rollout engine, its bundle and its share of the bundle's GPUs. `reserve` asks Ray for
the bundles (one placement group) and refuses, before any worker starts, a plan the cluster
cannot hold, naming the recipe fields and what Ray reports.

Colocated: one single-GPU bundle per learner rank; engine i shares bundle i with rank i, half
a GPU each as Ray counts it (the memory split is the engine's gpu_memory_utilization). Split:
every rank and every engine its own bundle of its own GPUs; two fractions below 1 may share
a card. Without GPUs there is no placement group and every actor runs on the CPU: rollout
engines and verifiers spread over the nodes or go to the nodes their role prefers
(`cpu_placement`, resources.prefer_nodes), learner ranks start on the driver's node
(`on_driver_node`).
"""

from __future__ import annotations

from dataclasses import dataclass

from zaya_rl.recipe import Recipe, ResourcesConfig, RlStage


class PlacementError(RuntimeError):
    """The cluster cannot hold the recipe's `resources`."""


@dataclass(frozen=True)
class Slot:
    bundle: int | None  # index into the placement group's bundles; None without GPUs
    num_gpus: float


@dataclass(frozen=True)
class Plan:
    bundles: list[dict[str, float]]
    learners: list[Slot]
    engines: list[Slot]

    @property
    def num_gpus(self) -> float:
        return sum(b["GPU"] for b in self.bundles)


def plan(res: ResourcesConfig) -> Plan:
    learners, engines = res.num_learner_workers, res.num_rollout_workers
    if not res.on_gpu:
        return Plan([], [Slot(None, 0.0)] * learners, [Slot(None, 0.0)] * engines)
    if res.placement == "colocated":
        return Plan([{"GPU": 1.0}] * learners, [Slot(i, 0.5) for i in range(learners)],
                    [Slot(i, 0.5) for i in range(engines)])
    bundles = [{"GPU": res.learner_gpus}] * learners + [{"GPU": res.rollout_gpus}] * engines
    return Plan(bundles, [Slot(i, res.learner_gpus) for i in range(learners)],
                [Slot(learners + i, res.rollout_gpus) for i in range(engines)])


def demand(res: ResourcesConfig) -> str:
    """The recipe fields that add up to the plan's GPUs, for error messages."""
    if res.placement == "colocated":
        return f"resources.num_learner_workers ({res.num_learner_workers}) cards shared by engines and learners"
    return (f"resources.num_learner_workers x learner_gpus ({res.num_learner_workers} x {res.learner_gpus:g}) + "
            f"num_rollout_workers x rollout_gpus ({res.num_rollout_workers} x {res.rollout_gpus:g})")


def reserve(res: ResourcesConfig, timeout_s: float = 60.0):
    """The plan's placement group, ready; None without GPUs. Raises PlacementError when the
    cluster has too few GPUs, no node with a bundle's GPUs, or Ray cannot place the bundles."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    layout = plan(res)
    if not layout.bundles:
        return None
    nodes = {n["NodeManagerAddress"]: n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["Alive"]}
    available = sum(nodes.values())
    if layout.num_gpus > available:
        raise PlacementError(f"{demand(res)} need {layout.num_gpus:g} GPUs; Ray reports {available:g} in the "
                             f"cluster ({_by_node(nodes)})")
    widest = max(b["GPU"] for b in layout.bundles)
    if widest > max(nodes.values()):
        raise PlacementError(f"one worker needs {widest:g} GPUs on one node (resources.rollout_gpus); Ray "
                             f"reports at most {max(nodes.values()):g} per node ({_by_node(nodes)})")
    group = placement_group(layout.bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(f"Ray could not place the bundles {layout.bundles} of {demand(res)} within "
                             f"{timeout_s:g} s; GPUs by node: {_by_node(nodes)}; available now: "
                             f"{ray.available_resources().get('GPU', 0.0):g}") from None
    return group


def actor_options(slot: Slot, group) -> dict:
    """Ray actor options that put a worker in its slot: its GPU share within its bundle."""
    if group is None or slot.bundle is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_gpus": slot.num_gpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=slot.bundle)}


# Stateless workers (CPU engines, verifiers) one per node in turn: a lost node takes few of them.
SPREAD = {"scheduling_strategy": "SPREAD"}


def preferring(labels: dict[str, str]) -> dict:
    """Ray actor options that start a worker (and restart it) on a live node with all of these
    Ray node labels, or on any node when none has them."""
    return {"label_selector": labels, "fallback_strategy": [{"label_selector": {}}]}


def cpu_placement(labels: dict[str, str] | None) -> dict:
    """Where a stateless CPU worker goes: the nodes with `labels` when given, else spread."""
    return preferring(labels) if labels else SPREAD


def on_driver_node() -> dict:
    """Ray actor options that start a worker on the calling driver's node, or on another when
    that node is gone. (A soft NodeAffinitySchedulingStrategy does not hold a worker that asks
    for no CPU: Ray 2.60 places it anywhere.)"""
    import ray

    return preferring({"ray.io/node-id": ray.get_runtime_context().get_node_id()})


def cpu_oversubscription(recipe: Recipe, cpus: float) -> str | None:
    """Why an asynchronous recipe on CPU engines would run slower than its synchronous loop, or
    None. Above bound 0 every engine and learner rank computes at once, each with
    `torch_threads` threads; more threads than cores and they take the cores from each other (on
    2 cores, 2 threads each: 0.23x the synchronous loop; 1 thread each: 1.32x)."""
    res = recipe.resources
    workers = res.num_rollout_workers + res.num_learner_workers
    overlapping = any(isinstance(s, RlStage) and s.algorithm.max_off_policy_steps > 0 for s in recipe.stages)
    if res.on_gpu or not overlapping or workers * res.torch_threads <= cpus:
        return None
    return (f"asynchronous RL runs {workers} workers at once with resources.torch_threads {res.torch_threads} "
            f"each, on {cpus:g} CPUs: they will contend for cores and run slower than the synchronous loop; "
            f"set resources.torch_threads to {max(1, int(cpus) // workers)}")


def _by_node(nodes: dict[str, float]) -> str:
    return ", ".join(f"{address}: {gpus:g} GPU" for address, gpus in nodes.items()) or "no nodes"
