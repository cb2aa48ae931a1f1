"""Placement plans (pure) and the recipe's refusals of placements that cannot work."""

import pytest

from zaya_rl.placement import Slot, cpu_oversubscription, plan
from zaya_rl.recipe import RecipeError, ResourcesConfig, load_recipe

ROOT = __import__("pathlib").Path(__file__).parents[2]


def test_cpu_recipes_reserve_nothing():
    layout = plan(ResourcesConfig(num_rollout_workers=2, num_learner_workers=3))
    assert layout.bundles == [] and layout.num_gpus == 0
    assert layout.learners == [Slot(None, 0.0)] * 3 and layout.engines == [Slot(None, 0.0)] * 2


def test_colocated_pairs_each_engine_with_a_learner_rank_on_one_card():
    layout = plan(ResourcesConfig(num_rollout_workers=4, num_learner_workers=4, rollout_gpus=1, learner_gpus=1))
    assert layout.bundles == [{"GPU": 1.0}] * 4 and layout.num_gpus == 4
    assert layout.learners == [Slot(i, 0.5) for i in range(4)]
    assert layout.engines == [Slot(i, 0.5) for i in range(4)]


def test_split_gives_every_worker_its_own_bundle():
    layout = plan(ResourcesConfig(num_rollout_workers=2, num_learner_workers=2, rollout_gpus=2,
                                  tensor_parallel_size=2, learner_gpus=1, placement="split"))
    assert layout.bundles == [{"GPU": 1.0}] * 2 + [{"GPU": 2.0}] * 2 and layout.num_gpus == 6
    assert layout.learners == [Slot(0, 1.0), Slot(1, 1.0)]
    assert layout.engines == [Slot(2, 2.0), Slot(3, 2.0)]


def test_split_fractions_may_share_a_card():
    layout = plan(ResourcesConfig(rollout_gpus=0.5, learner_gpus=0.5, placement="split"))
    assert layout.bundles == [{"GPU": 0.5}, {"GPU": 0.5}] and layout.num_gpus == 1


@pytest.mark.parametrize("override, field, message", [
    ("resources.tensor_parallel_size=2", "resources.tensor_parallel_size", "wider than an engine's rollout_gpus 1"),
    ("resources.num_rollout_workers=2", "resources.num_rollout_workers", "must equal num_learner_workers"),
    ("resources.learner_gpus=0", "resources.rollout_gpus", "both or neither"),
    ("resources.learner_gpus=2", "resources.learner_gpus", "one GPU"),
    ("resources.rollout_gpus=1.5", "resources.rollout_gpus", "whole number"),
    ("resources.rollout_engine=hf", "resources.rollout_engine", "vllm"),
    ("resources.rollout_gpus=0.5", "resources.placement", "shares whole cards"),
    ("stages.rl.algorithm.router_replay=true", "stages.1.algorithm.router_replay", "CPU engines only"),
    ("resources.prefer_nodes={rollout: {pool: a}}", "resources.prefer_nodes.rollout", "placement group"),
    ("resources.prefer_nodes={learner: {pool: a}}", "resources.prefer_nodes.learner.[key]", "'rollout' or 'verifier'"),
])
def test_placements_that_cannot_work_are_refused_naming_the_field(override, field, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "gpu.yaml", [override])
    assert f"{field}:" in str(err.value) and message in str(err.value), str(err.value)


def test_tensor_parallel_engines_take_whole_cards_in_split_placement():
    split = ["resources.placement=split", "resources.rollout_gpus=2"]
    with pytest.raises(RecipeError, match="set tensor_parallel_size to 2"):
        load_recipe(ROOT / "recipes" / "gpu.yaml", split)
    recipe = load_recipe(ROOT / "recipes" / "gpu.yaml", split + ["resources.tensor_parallel_size=2"])
    assert recipe.resources.tensor_parallel_size == 2 and recipe.resources.on_gpu


def test_the_gpu_default_is_colocated_on_one_card():
    res = load_recipe(ROOT / "recipes" / "gpu.yaml").resources
    assert res.placement == "colocated" and plan(res).num_gpus == 1


def test_asynchronous_rl_on_cpu_is_warned_when_its_threads_outnumber_the_cores():
    tiny = ROOT / "recipes" / "tiny.yaml"
    asynchronous = ["stages.rl.algorithm.max_off_policy_steps=1"]
    one_thread = load_recipe(tiny, asynchronous + ["resources.torch_threads=1"])
    two_threads = load_recipe(tiny, asynchronous + ["resources.torch_threads=2"])
    assert cpu_oversubscription(one_thread, cpus=2) is None  # one engine and one learner, a core each
    warning = cpu_oversubscription(two_threads, cpus=2)
    assert "resources.torch_threads 2" in warning and "set resources.torch_threads to 1" in warning
    assert cpu_oversubscription(two_threads, cpus=4) is None
    assert cpu_oversubscription(load_recipe(tiny, ["resources.torch_threads=2"]), cpus=2) is None  # synchronous
    gpu = load_recipe(ROOT / "recipes" / "gpu.yaml", ["resources.placement=split", "resources.rollout_gpus=0.5",
                                                       "resources.learner_gpus=0.5", *asynchronous])
    assert cpu_oversubscription(gpu, cpus=1) is None  # GPU engines and learners compute on their cards
