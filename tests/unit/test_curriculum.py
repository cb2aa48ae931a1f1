import json
from collections import Counter

from zaya_rl.curriculum import AdaptiveCurriculum
from zaya_rl.recipe import CurriculumConfig
from zaya_rl.tasks import RowTasks, Task, TaskStream


def make(**kw):
    cfg = CurriculumConfig(**{"start_level": 1, "window": 4, **kw})
    stream = TaskStream("chain_sum", 0, levels=TaskStream("chain_sum", 0).levels[:3])
    return AdaptiveCurriculum(cfg, {"chain_sum": stream}, {"chain_sum": 1.0}, seed=0)


def rows(name, levels=1, per_level=5):
    return RowTasks(name, [Task(f"{name}/{lv}/{i}", f"{name} {lv} {i}?", str(i), "", lv, source=name)
                           for lv in range(levels) for i in range(per_level)])


def mixture(weights, levels=3, **kw):
    cfg = CurriculumConfig(**{"start_level": 1, "window": 1, **kw})
    return AdaptiveCurriculum(cfg, {n: rows(n, levels) for n in weights}, weights, seed=0)


def test_level_rises_on_high_pass_rate_and_caps():
    c = make()
    tasks = c.next_batch(4)
    assert {t.level for t in tasks} == {1}
    c.observe(tasks, [1.0, 0.75, 1.0, 0.5])  # 0.8125 > 0.7
    assert c.level == 2 and c.pass_rate() == 0.0
    c.observe(c.next_batch(4), [1.0] * 4)
    assert c.level == 2


def test_level_falls_at_zero_and_waits_for_a_full_window():
    c = make()
    c.observe(c.next_batch(3), [0.0] * 3)
    assert c.level == 1
    c.observe(c.next_batch(1), [0.0])
    assert c.level == 0


def test_fixed_when_not_adaptive():
    c = make(adaptive=False)
    c.observe(c.next_batch(4), [1.0] * 4)
    assert c.level == 1


def test_mixture_follows_the_weights():
    c = mixture({"a": 3.0, "b": 1.0})
    counts = Counter(t.source for _ in range(10) for t in c.next_batch(8))
    assert counts == {"a": 60, "b": 20}
    assert c.metrics()["a"]["samples"] == 60 and c.metrics()["b"]["samples"] == 20


def test_least_sampled_source_comes_next():
    c = mixture({"a": 1.0, "b": 1.0, "c": 1.0})
    c.stats["a"].samples, c.stats["b"].samples = 10, 4  # as after a restore mid-stage
    batch = c.next_batch(9)
    # c catches up with b first, then both with a; only then do all three take turns.
    assert [t.source for t in batch[:4]] == ["c"] * 4
    assert Counter(t.source for t in batch[4:]) == {"b": 2, "c": 3}


def test_each_source_moves_on_its_own_group():
    c = mixture({"easy": 1.0, "hard": 1.0})
    batch = c.next_batch(2)
    c.observe(batch, [1.0 if t.source == "easy" else 0.0 for t in batch])
    assert {n: m["level"] for n, m in c.metrics().items()} == {"easy": 2, "hard": 0}
    assert c.metrics()["easy"]["reward"] == 1.0 and c.metrics()["hard"]["reward"] == 0.0
    assert {t.level for t in c.next_batch(4) if t.source == "easy"} == {2}


def test_sft_levels_are_capped_per_source():
    c = AdaptiveCurriculum(CurriculumConfig(adaptive=False), {"one": rows("one", 1), "three": rows("three", 3)},
                           {"one": 1.0, "three": 1.0}, seed=0)
    batch = c.next_batch(4, levels=[2])
    assert sorted((t.source, t.level) for t in batch) == [("one", 0), ("one", 0), ("three", 2), ("three", 2)]


def test_pool_is_served_in_turn_and_an_empty_pool_serves_nothing():
    c = mixture({"a": 1.0, "b": 1.0}, adaptive=False)
    pool = rows("a").take(0, 2)
    c.set_pool("a", pool)
    c.set_pool("b", [])
    assert c.next_batch(3) == [pool[0], pool[1], pool[0]]


def test_state_round_trip_through_json():
    c = mixture({"a": 2.0, "b": 1.0}, window=3)
    c.set_pool("b", rows("b").take(0, 3))
    for rates in ([1.0, 0.5, 0.25], [0.0, 1.0, 0.5]):
        c.observe(c.next_batch(3), rates)
    restored = mixture({"a": 2.0, "b": 1.0}, window=3)
    restored.restore(json.loads(json.dumps(c.state())))
    for name, source in restored.sources.items():  # data positions: checkpointed by the controller
        source.restore(json.loads(json.dumps(c.sources[name].state())))
    assert restored.state() == c.state()
    assert restored.state()["pools"]["b"] and restored.pools == c.pools
    batches = {}
    for curriculum in (c, restored):  # from here both serve and move alike, random tie-breaks included
        for _ in range(3):
            batches.setdefault(id(curriculum), []).append(batch := curriculum.next_batch(5))
            curriculum.observe(batch, [1.0] * 5)
    assert batches[id(restored)] == batches[id(c)]
    assert restored.state() == c.state()
    assert restored.metrics() == c.metrics()


def test_one_pass_counts_every_row_or_the_filtered_pool():
    cur = mixture({"a": 1.0, "b": 1.0})  # 3 levels x 5 rows each
    assert cur.num_prompts() == 30
    cur.set_pool("b", cur.sources["b"].take(0, 2))
    assert cur.num_prompts() == 15 + 2
