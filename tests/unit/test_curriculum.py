from zaya_rl.curriculum import AdaptiveCurriculum
from zaya_rl.recipe import CurriculumConfig
from zaya_rl.tasks import TaskStream


def make(**kw):
    cfg = CurriculumConfig(start_level=1, window=4, **kw)
    return AdaptiveCurriculum(cfg, TaskStream("chain_sum", 0), max_level=2)


def test_level_rises_on_high_pass_rate_and_caps():
    c = make()
    tasks = c.next_batch(4)
    assert {t.level for t in tasks} == {1}
    c.observe(tasks, [1.0, 0.75, 1.0, 0.5])  # 0.8125 > 0.7
    assert c.level == 2 and c.recent == type(c.recent)([], maxlen=4)
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


def test_state_restores_level_and_window():
    c = make()
    c.observe(c.next_batch(4), [1.0, 1.0, 1.0, 0.5])
    c.observe(c.next_batch(2), [0.25, 0.5])
    restored = make()
    restored.restore(c.state())
    assert restored.state() == c.state() == {"level": 2, "recent": [0.25, 0.5]}
    for curriculum in (c, restored):  # from here both move alike
        curriculum.observe(curriculum.next_batch(2), [1.0, 1.0])
    assert restored.pass_rate() == c.pass_rate() == 0.6875
    assert restored.level == c.level == 2
