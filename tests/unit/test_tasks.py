import json
import re

import pytest

from rewards.code import verify_code
from zaya_rl.recipe import CodeFields, CodeSource, FileFields, FileSource, GymSource
from zaya_rl.tasks import (Task, TaskStream, build_source, code_tasks, file_tasks, held_out, held_out_for,
                           held_out_tasks, render, worked_solution)


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


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_map_fields_and_levels(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"q": "1+1?", "a": 2, "worked": "\\boxed{2}", "hard": 1},
                                         {"q": "2+2?", "a": "4", "worked": "\\boxed{4}", "hard": 0}])
    cfg = FileSource(kind="file", name="mine", path=str(path),
                     fields=FileFields(prompt="q", answer="a", solution="worked", level="hard"))
    source = build_source(cfg, seed=0)
    assert source.num_levels == 2
    [task] = source.take(1, 1)
    assert (task.prompt, task.answer, task.solution, task.level, task.source) == ("1+1?", "2", "\\boxed{2}", 1, "mine")
    assert [t.prompt for t in source.take(0, 3)] == ["2+2?"] * 3  # a level's rows come round again
    assert source.state() == {"position": {1: 1, 0: 3}}


def test_parquet_rows_and_env_var_path(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["3*3?", "5-1?"], "answer": ["9", "4"]}), tmp_path / "m.parquet")
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    cfg = FileSource(kind="file", name="pq", path="${MY_DATA}/m.parquet", fields=FileFields(prompt="problem"))
    tasks = build_source(cfg, seed=0).take(0, 2)
    assert [(t.prompt, t.answer, t.uid) for t in tasks] == [("3*3?", "9", "pq/row 1"), ("5-1?", "4", "pq/row 2")]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', "q.jsonl:2: row has no field 'answer'"),
    ('{"prompt": "x", "answer": null}', "q.jsonl:2: field 'answer' must be text"),
    ('{"prompt": "x", ', "q.jsonl:2: not valid JSON"),
    ('["x", 1]', "q.jsonl:2: a row is a JSON object"),
])
def test_bad_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        file_tasks(FileSource(kind="file", name="q", path=str(path)))


def test_bad_parquet_row_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"], "level": [0, -1]}), tmp_path / "l.parquet")
    cfg = FileSource(kind="file", name="l", path=str(tmp_path / "l.parquet"), fields=FileFields(level="level"))
    with pytest.raises(ValueError, match=re.escape("l.parquet:row 2: field 'level' must be a level >= 0")):
        file_tasks(cfg)


def test_missing_level_rows_and_missing_file_are_named(tmp_path):
    path = _jsonl(tmp_path / "gap.jsonl", [{"prompt": "a", "answer": "1", "level": 2}])
    with pytest.raises(ValueError, match=r"no rows at levels \[0, 1\]"):
        build_source(FileSource(kind="file", name="gap", path=str(path), fields=FileFields(level="level")), seed=0)
    with pytest.raises(ValueError, match="nope.jsonl: data file not found"):
        file_tasks(FileSource(kind="file", name="x", path=str(tmp_path / "nope.jsonl")))


def test_code_sources_carry_tests_and_pass_their_own_solutions(tmp_path):
    humaneval = code_tasks(CodeSource(kind="code", name="he", dataset="humaneval"))
    assert len(humaneval) == 164 and all(t.tests is not None and t.answer == "" for t in humaneval)
    _jsonl(tmp_path / "c.jsonl", [{"spec": "def inc(x):\n", "check": "def check(f):\n    assert f(1) == 2\n",
                                   "fn": "inc", "ref": "    return x + 1\n"}])
    cfg = CodeSource(kind="code", name="mine", path=str(tmp_path / "c.jsonl"),
                     fields=CodeFields(prompt="spec", test="check", entry_point="fn", solution="ref"))
    [task] = code_tasks(cfg)
    assert task.prompt.endswith("def inc(x):\n") and task.tests.entry_point == "inc"
    for t in (task, humaneval[0]):
        verdict = verify_code(t.solution, t.tests)
        assert verdict.passed, verdict.reason
    assert not verify_code("```python\ndef inc(x):\n    return x\n```", task.tests).passed
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task


def test_gym_source_levels_are_recipe_settings():
    cfg = GymSource(kind="gym", name="arith", generator="basic_arithmetic", settings={"min_terms": 2, "max_terms": 2},
                    levels=[{"min_digits": 1, "max_digits": 1}, {"min_digits": 3, "max_digits": 3}])
    source = build_source(cfg, seed=0)
    easy, hard = source.take(0, 20), source.take(1, 20)
    assert source.num_levels == 2 and {t.source for t in easy + hard} == {"arith"}
    assert max(abs(int(t.answer)) for t in easy) < 100 <= max(abs(int(t.answer)) for t in hard)
    assert all("\\boxed{}" in t.prompt for t in easy)


def test_every_kind_of_source_has_its_own_held_out_set(tmp_path):
    gym = GymSource(kind="gym", name="arith", generator="basic_arithmetic", settings={"min_terms": 2, "max_terms": 2},
                    levels=[{"min_digits": 1, "max_digits": 1}, {"min_digits": 3, "max_digits": 3}])
    # Level 2 is above this source's top level: it means level 1, once.
    evals = held_out_for(gym, [0, 2], 10)
    assert [t.level for t in evals] == [0, 1] * 5 and {t.source for t in evals} == {"arith"}
    assert evals == held_out_for(gym, [0, 2], 10) and all(t.gym is not None for t in evals)
    training = build_source(gym, seed=0, exclude=frozenset(t.prompt for t in evals)).take(1, 200)
    assert not {t.prompt for t in training} & {t.prompt for t in evals}

    rows = [{"prompt": f"q{level}-{i}", "answer": str(i), "level": level} for level in range(2) for i in range(3)]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "test.jsonl", rows[:2] + rows[3:4])  # level 0: two rows, level 1: one
    file_cfg = FileSource(kind="file", name="f", path=str(tmp_path / "train.jsonl"), fields=FileFields(level="level"))
    assert held_out_for(file_cfg, [0, 1], 10) == []  # no held-out file: not evaluated
    with_split = file_cfg.model_copy(update={"held_out": str(tmp_path / "test.jsonl")})
    # Round robin over the levels, each row once, however many problems were asked for.
    assert [t.prompt for t in held_out_for(with_split, [0, 1], 10)] == ["q0-0", "q1-0", "q0-1"]
    assert [t.prompt for t in held_out_for(with_split, [1], 10)] == ["q1-0"]

    humaneval = CodeSource(kind="code", name="he", dataset="humaneval")
    assert len(held_out_for(humaneval, [1], 1000)) == 164  # HumanEval pass@1: all of it
    _jsonl(tmp_path / "c.jsonl", [{"prompt": "def f():\n", "test": "def check(f):\n    assert f() == 1\n",
                                   "entry_point": "f"}])
    code = CodeSource(kind="code", name="mine", path=str(tmp_path / "c.jsonl"))
    assert held_out_for(code, [0], 10) == []
    assert len(held_out_for(code.model_copy(update={"held_out": "humaneval"}), [0], 20)) == 20
    [own] = held_out_for(code.model_copy(update={"held_out": str(tmp_path / "c.jsonl")}), [0], 20)
    assert own.tests.entry_point == "f" and own.source == "mine"

    mixed = held_out_tasks([gym, with_split, code], [0], 4)
    assert [t.source for t in mixed] == ["arith"] * 4 + ["f"] * 2


def test_tokenizer_corpus_takes_every_source_and_keeps_chain_sums_as_they_were(tmp_path):
    from zaya_rl.models import train_tokenizer
    from zaya_rl.tasks import tokenizer_corpus

    rows = [{"q": f"Which organelle makes energy for cell {i}?", "a": "mitochondrion"} for i in range(40)]
    (tmp_path / "bio.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bio = FileSource(kind="file", name="bio", path=str(tmp_path / "bio.jsonl"), fields=FileFields(prompt="q", answer="a"))
    sums = GymSource(kind="gym", name="sums", generator="chain_sum")
    plain = tokenizer_corpus("chain_sum", 1, [sums], seed=0, per_level=50)
    stream = TaskStream("chain_sum", 0)
    assert plain == [t.prompt + t.solution for level in (0, 1) for t in stream.take(level, 50)]
    mixed = tokenizer_corpus("chain_sum", 1, [sums, bio], seed=0, per_level=50)
    # The file's 40 rows once each (a level that runs out is served again), answers as targets.
    assert mixed[:len(plain)] == plain and len(mixed) == len(plain) + 40
    assert mixed[-1] == rows[-1]["q"] + "mitochondrion"
    word = " mitochondrion"
    assert len(train_tokenizer(mixed, vocab_size=400).encode(word)) < len(train_tokenizer(plain, vocab_size=400).encode(word)) / 3
