from zaya_rl.tasks import TaskStream, held_out, render, worked_solution


def test_worked_solution_is_left_to_right():
    assert worked_solution("12 + 3 - 40") == "12+3=15\n15-40=-25\n\\boxed{-25}"
    assert render("12 + 3 - 40")[0] == "12+3-40=?\n"


def test_solutions_end_in_the_gold_answer():
    for task in TaskStream("chain_sum", 0).take(2, 50):
        assert task.solution.endswith("\\boxed{" + task.answer + "}")


def test_held_out_is_fixed_and_disjoint_from_training():
    evals = held_out("chain_sum", [1, 2], 1000)
    assert len(evals) == 1000 and evals == held_out("chain_sum", [1, 2], 1000)
    assert {t.level for t in evals} == {1, 2}
    prompts = frozenset(t.prompt for t in evals)
    stream = TaskStream("chain_sum", 0, exclude=prompts)
    train = stream.take(1, 3000) + stream.take(2, 1000)
    assert not {t.prompt for t in train} & prompts
    assert not {t.uid for t in train} & {t.uid for t in evals}


def test_stream_resumes_from_its_position():
    a = TaskStream("chain_sum", 3)
    first = a.take(1, 10)
    b = TaskStream("chain_sum", 3, position=a.state()["position"])
    assert b.take(1, 5) == a.take(1, 5)
    assert first != TaskStream("chain_sum", 4).take(1, 10)
