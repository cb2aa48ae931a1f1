"""The Python tool environment on the real sandbox and verifiers, and multi-turn episodes on a
real vLLM engine: each turn continues the episode's token ids, never a re-tokenized history."""

from __future__ import annotations

import time

import pytest

from rewards.sandbox import run_python
from zaya_rl.environments import (CODE_CLOSE, CODE_OPEN, TOOL_PIECES, AnswerScorer, PythonToolEnv, Step,
                                  observation_text, run_episodes, tool_call, tool_demonstration)
from zaya_rl.recipe import PythonToolConfig
from zaya_rl.tasks import CodeSource, GymSource, TaskStream, build_source

CONFIG = PythonToolConfig(kind="python_tool", max_turns=3, timeout_s=2.0, max_output_chars=40, instruction="")


@pytest.fixture(scope="module")
def scorer():
    scorer = AnswerScorer()
    yield scorer
    scorer.close()


def call(program: str) -> str:
    return f"{CODE_OPEN}{program}{CODE_CLOSE}"


def test_a_tool_call_is_a_turn_that_ends_with_a_closed_python_block():
    assert tool_call(call("print(1)")) == "print(1)"
    assert tool_call("first\n" + call("x = 1") + call("print(x + 1)")) == "print(x + 1)"  # the last block
    assert tool_call(call("print(1)") + "\\boxed{1}") is None  # something after it: an answer
    assert tool_call(f"{CODE_OPEN}print(1)") is None  # not closed
    assert tool_call("\\boxed{3}") is None


def test_an_observation_keeps_the_end_of_a_long_output():
    assert observation_text("3\n", 40) == "<output>\n3\n</output>\n"
    long = observation_text("x" * 100 + "Error: the end", 20)
    assert long.endswith("xxxxxxError: the end\n</output>\n") and "..." in long


def test_python_tool_episode_runs_the_program_and_scores_the_answer(scorer):
    [task] = TaskStream("chain_sum", 0).take(2, 1)
    env = PythonToolEnv(CONFIG, scorer)
    assert env.reset(task) == task.prompt
    expression = task.prompt.removesuffix("=?\n")
    step = env.step(call(f"print({expression})"))
    assert step == Step(f"<output>\n{task.answer}\n</output>\n", 0.0, False)
    assert env.step(f"\\boxed{{{task.answer}}}") == Step("", 1.0, True)
    env.reset(task)
    env.step(call("print(1 / 0)"))
    assert env.step("\\boxed{0}").reward == (1.0 if task.answer == "0" else 0.0)


def test_errors_and_timeouts_come_back_as_observations_and_never_hang(scorer):
    [task] = TaskStream("chain_sum", 0).take(1, 1)
    env = PythonToolEnv(CONFIG.model_copy(update={"max_output_chars": 200}), scorer)
    env.reset(task)
    error = env.step(call("print(undefined_name)"))
    assert not error.done and "NameError" in error.observation
    start = time.monotonic()
    stuck = env.step(call("while True:\n    pass"))
    assert time.monotonic() - start < 30  # killed at timeout_s, well before the sandbox's backstop
    assert not stuck.done and "timeout" in stuck.observation


def test_the_last_turn_is_the_final_answer_even_when_it_calls_the_tool(scorer):
    [task] = TaskStream("chain_sum", 0).take(1, 1)
    env = PythonToolEnv(CONFIG.model_copy(update={"max_turns": 2}), scorer)
    env.reset(task)
    assert not env.step(call("print(1)")).done
    # The answer is every policy turn joined: a box written before the last call still counts.
    last = env.step(f"\\boxed{{{task.answer}}}\n" + call("print(2)"))
    assert last == Step("", 1.0, True)


def test_reasoning_gym_and_humaneval_tasks_are_scored_by_their_verifiers(scorer):
    settings = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ["+", "-", "*"]}
    gym = build_source(GymSource(kind="gym", name="arith", generator="basic_arithmetic", settings=settings), 0)
    [task] = gym.take(0, 1)
    env = PythonToolEnv(CONFIG, scorer)
    assert env.reset(task).startswith("Calculate")
    env.step(call(f"print({task.prompt.split('Calculate ')[1].split('.')[0]})"))
    assert env.step(f"\\boxed{{{task.answer}}}").reward == 1.0
    env.reset(task)
    assert env.step(f"\\boxed{{{int(task.answer) + 1}}}").reward == 0.0

    humaneval = build_source(CodeSource(kind="code", name="he", dataset="humaneval"), 0)
    [problem] = humaneval.take(0, 1)
    env = PythonToolEnv(CONFIG, scorer)
    env.reset(problem)
    # The policy runs its function in the tool, then stops: the last block of its turns is judged.
    step = env.step(problem.solution.removesuffix("\n```") + CODE_CLOSE)
    assert not step.done and step.observation == "<output>\n</output>\n"
    assert env.step("Done.").reward == 1.0
    env.reset(problem)
    assert env.step(call("def has_close_elements(numbers, threshold):\n    return False")).done is False
    assert env.step("Done.").reward == 0.0


def test_demonstrations_show_what_the_sandbox_prints():
    config = CONFIG.model_copy(update={"instruction": "Use Python.\n"})
    for level in range(4):
        for task in TaskStream("chain_sum", 3).take(level, 2):
            prompt, turns = tool_demonstration(task, config)
            assert prompt == "Use Python.\n" + task.prompt
            assert [own for _, own in turns] == [True, False, True]
            (program_turn, _), (output, _), (answer, _) = turns
            result = run_python(tool_call(program_turn))
            assert output == observation_text(result.stdout, config.max_output_chars)
            assert answer == f"\\boxed{{{task.answer}}}"
    with pytest.raises(ValueError, match="chain_sum prompts"):
        tool_demonstration(task.__class__(uid="x", prompt="Calculate 1 + 2.\n", answer="3", solution="", level=0),
                           config)


class CountingEnv:
    """An environment that answers every turn with the same observation until the third."""

    turn_end = ("7",)

    def reset(self, task):
        self.turns = 0
        return task.prompt

    def step(self, action):
        self.turns += 1
        return Step("", 0.5, True) if self.turns == 3 else Step("<output>\n1\n</output>\n", 0.25, False)


def test_episodes_continue_the_sampled_token_ids(tool_checkpoint, ray_local):
    from workers.rollout import VllmEngine
    from zaya_rl.models import load_tokenizer

    # The engine runs in an actor: vLLM in this process would tear down torch.distributed's
    # process group, which the in-process DeepSpeed learners of later tests had set up.
    engine = ray_local.remote(num_cpus=0)(VllmEngine).remote(str(tool_checkpoint), seed=0, max_model_len=256,
                                                             torch_threads=2)
    tokenizer = load_tokenizer(tool_checkpoint)
    assert all(len(tokenizer(piece, add_special_tokens=False)["input_ids"]) == 1 for piece in TOOL_PIECES)
    engine_prompts: list[list[list[int]]] = []

    def generate(prompts, limits, temperature, stop):
        engine_prompts.append([list(p) for p in prompts])
        return ray_local.get(engine.continue_ids.remote(prompts, limits, temperature, stop))

    tasks = TaskStream("chain_sum", 0).take(1, 6)
    envs = [CountingEnv() for _ in tasks]
    episodes = run_episodes(envs, tasks, generate, tokenizer, 1.0, max_turn_tokens=12, max_episode_tokens=40,
                            context=256)
    observed = tokenizer("<output>\n1\n</output>\n", add_special_tokens=False)["input_ids"]
    retokenized = 0
    for index, episode in enumerate(episodes):
        assert episode.prompt_ids == tokenizer(tasks[index].prompt)["input_ids"]
        assert len(episode.token_ids) == len(episode.loss_mask) == len(episode.logprobs) <= 40
        # Each turn's prompt was the episode so far, exactly: the ids sampled before and the
        # observations' ids; the turn's own ids follow it in the episode.
        turns = _runs(episode.loss_mask, 1)
        assert len(turns) == len(episode.actions)
        for turn, (begin, _) in enumerate(turns):
            live = [i for i, e in enumerate(episodes) if len(e.actions) > turn]
            assert engine_prompts[turn][live.index(index)] == episode.prompt_ids + episode.token_ids[:begin]
        # Observation tokens are masked, with 0.0 in place of an engine log-prob; policy tokens carry the engine's.
        for start, end in _runs(episode.loss_mask, 0):
            assert episode.token_ids[start:end] == observed and episode.logprobs[start:end] == [0.0] * len(observed)
        assert all(lp < 0 for lp, m in zip(episode.logprobs, episode.loss_mask) if m)
        assert episode.reward == 0.25 * (len(episode.actions) - 1) + (0.5 if len(episode.actions) == 3 else 0.0)
        policy_ids = [t for t, m in zip(episode.token_ids, episode.loss_mask) if m]
        retokenized += tokenizer("".join(episode.actions), add_special_tokens=False)["input_ids"] != policy_ids
    assert max(len(e.actions) for e in episodes) == 3
    # The random model's samples do not come back from their own text as the same ids: continuing
    # by text would have fed the engine other tokens than the ones sampled.
    assert retokenized > 0
    ray_local.kill(engine)


def _runs(mask: list[int], value: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(mask + [1 - value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            runs.append((start, i))
            start = None
    return runs
