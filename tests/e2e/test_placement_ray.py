"""Placement through a real Ray that declares 4 GPUs (no device behind them): bundles reserved,
each worker in its slot, and placements the cluster cannot hold refused before anything starts."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import remove_placement_group

from workers.verifier import VerifierPool
from zaya_rl import placement
from zaya_rl.recipe import ResourcesConfig

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.ray


@pytest.fixture
def four_gpus(ray_local):
    """The CPU session declares 4 GPUs; a real machine must have them."""
    if ray.cluster_resources().get("GPU", 0) != 4:
        pytest.skip("placement tests schedule onto exactly 4 GPUs (declared on CPU machines)")


@ray.remote(num_cpus=0)
class Probe:
    def gpu_ids(self) -> list[int]:
        return sorted(int(i) for i in ray.get_gpu_ids())


def place(res: ResourcesConfig):
    group, layout = placement.reserve(res, timeout_s=20), placement.plan(res)
    learners = [Probe.options(**placement.actor_options(s, group)).remote() for s in layout.learners]
    engines = [Probe.options(**placement.actor_options(s, group)).remote() for s in layout.engines]
    ids = ray.get([p.gpu_ids.remote() for p in learners]), ray.get([p.gpu_ids.remote() for p in engines])
    for probe in learners + engines:
        ray.kill(probe)
    remove_placement_group(group)
    return ids


def test_colocated_engines_share_their_learner_rank_card(four_gpus):
    learners, engines = place(ResourcesConfig(num_rollout_workers=2, num_learner_workers=2, rollout_gpus=1,
                                              learner_gpus=1))
    assert [len(ids) for ids in learners + engines] == [1, 1, 1, 1]
    assert learners == engines and learners[0] != learners[1]


def test_split_places_a_tensor_parallel_engine_on_cards_of_its_own(four_gpus):
    learners, engines = place(ResourcesConfig(num_learner_workers=2, rollout_gpus=2, tensor_parallel_size=2,
                                              learner_gpus=1, placement="split"))
    assert [len(ids) for ids in learners] == [1, 1] and len(engines[0]) == 2
    assert len(set(sum(learners + engines, []))) == 4  # four different cards


def test_more_gpus_than_the_cluster_has_is_refused_naming_the_fields(four_gpus):
    res = ResourcesConfig(num_rollout_workers=5, num_learner_workers=5, rollout_gpus=1, learner_gpus=1)
    with pytest.raises(placement.PlacementError) as err:
        placement.reserve(res)
    assert "resources.num_learner_workers (5)" in str(err.value) and "need 5 GPUs" in str(err.value)
    assert "Ray reports 4 in the cluster" in str(err.value)


def test_bundles_ray_cannot_place_now_are_refused_after_the_timeout(four_gpus):
    held = placement.reserve(ResourcesConfig(rollout_gpus=1, learner_gpus=1, num_rollout_workers=3,
                                             num_learner_workers=3))
    try:
        with pytest.raises(placement.PlacementError, match="could not place the bundles .* available now: 1"):
            placement.reserve(ResourcesConfig(rollout_gpus=1, learner_gpus=1, placement="split"), timeout_s=2)
    finally:
        remove_placement_group(held)


def test_verifiers_take_cpus_and_no_gpus(four_gpus):
    before = ray.available_resources().get("CPU", 0.0)
    pool = VerifierPool(2, num_cpus=0.5, name_prefix="placement-verifier")
    try:
        assert [v.correct for v in pool.score(["\\boxed{4}", "\\boxed{5}"], ["4", "4"])] == [True, False]
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(before - 1.0)
        assert ray.available_resources().get("GPU", 0.0) == 4.0
    finally:
        pool.shutdown()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_recipe_on_a_cluster_without_gpus_stops_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_dir = tmp_path / "run"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(ROOT / "recipes" / "gpu.yaml"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the cluster cannot hold this recipe's resources" in proc.stderr
    assert "resources.num_learner_workers (1) cards shared by engines and learners need 1 GPUs" in proc.stderr
    assert "Ray reports 0 in the cluster" in proc.stderr
    assert not (run_dir / "initial").exists()  # the model was never built
    assert time.time() - start < 120
