"""Environments for multi-turn rollouts, and the loop that runs many episodes on one engine.

An environment is `reset(task) -> observation` and `step(action) -> Step(observation, reward,
done)`, in text. `run_episodes` plays one episode per environment at once: each turn is one
batched engine call over every live episode, whose prompt is the token ids of its episode so
far (the policy's sampled ids and the observations' ids, appended as they come: the history is
never decoded and encoded again, which could give other ids than the ones sampled). The result
is one `Completion` per episode whose `loss_mask` is 1 on the policy's tokens and 0 on the
observations', and whose `logprobs` hold the engine's log-prob of each policy token (0 on
observations, which the mask leaves out of the loss and of the log-prob check).

`PythonToolEnv` is the Python tool: a turn that ends with a ```python block has the program
run in the code sandbox (rewards/sandbox.py: no network, limits, killed at its wall limit, so a
program never hangs a run), and what it prints is the next observation; the first turn without
a tool call (or the last turn allowed) is the final answer, which the task's verifier scores.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from rewards.code import verify_code
from rewards.math import MathVerifier
from rewards.sandbox import Limits, RunResult, run_python
from zaya_rl.recipe import PythonToolConfig
from zaya_rl.tasks import Task

# The tool's markup. A policy turn that calls the tool ends with CODE_CLOSE, where the engine
# stops it (TOOL_TURN_END); the tiny tokenizer holds each of TOOL_PIECES as one token.
CODE_OPEN, CODE_CLOSE = "```python\n", "\n```\n"
OUTPUT_OPEN, OUTPUT_CLOSE = "<output>\n", "</output>\n"
TOOL_PIECES = (CODE_OPEN, CODE_CLOSE, OUTPUT_OPEN, OUTPUT_CLOSE, "print(")
# Threads that step environments at once; each tool call is a sandbox process of its own.
STEP_THREADS = 8
MATH_TIMEOUT_S = 5.0
CODE_LIMITS = Limits(wall_s=5.0, cpu_s=5)  # per test, as the verifier pool's code limits


@dataclass(frozen=True)
class Step:
    observation: str  # appended to the episode when it goes on; "" when done
    reward: float
    done: bool


class Environment(Protocol):
    """One episode at a time: `reset` with a task, then `step` with each policy turn's text."""

    turn_end: tuple[str, ...]  # strings that end a policy turn besides EOS: the engine stops there

    def reset(self, task: Task) -> str: ...

    def step(self, action: str) -> Step: ...


def tool_call(action: str) -> str | None:
    """The program of a turn that ends with a closed ```python block (its last block), else None."""
    start = action.rfind(CODE_OPEN)
    if start < 0:
        return None
    match = re.fullmatch(r"(.*?)\n```\s*", action[start + len(CODE_OPEN):], re.DOTALL)
    if match is None or "```" in match.group(1):
        return None
    return match.group(1)


def observation_text(output: str, max_chars: int) -> str:
    """A tool output as the policy sees it: its last `max_chars` characters between the tags."""
    if len(output) > max_chars:
        output = "..." + output[-max_chars:]
    if output and not output.endswith("\n"):
        output += "\n"
    return OUTPUT_OPEN + output + OUTPUT_CLOSE


def program_output(result: RunResult) -> str:
    """What a sandboxed run tells the policy: stdout, then stderr, then why it stopped if not by itself."""
    output = result.stdout + result.stderr
    if result.timed_out:
        output += f"timeout: the program was stopped after {result.seconds:.1f} s\n"
    if result.error:
        output += f"the sandbox failed: {result.error}\n"
    return output


class AnswerScorer:
    """Scores final answers as the verifier pool does (code: its tests pass; reasoning-gym
    items: the generator's partial credit; others: the math verifier), in this process. Safe
    to call from the threads that step environments: math goes through one killable child
    process, one answer at a time; code runs in a sandbox of its own."""

    def __init__(self) -> None:
        self.math = MathVerifier()
        self.lock = threading.Lock()

    def __call__(self, task: Task, answer: str) -> float:
        if task.tests is not None:
            return float(verify_code(answer, task.tests, CODE_LIMITS).passed)
        with self.lock:
            return self.math.score([(answer, task.gym or task.answer)], MATH_TIMEOUT_S)[0].reward

    def close(self) -> None:
        self.math.close()


class PythonToolEnv:
    """The Python tool (`PythonToolConfig`). The final answer is every policy turn's text
    joined (tool outputs are not the policy's: they cannot answer for it), scored by `score`."""

    turn_end = (CODE_CLOSE,)

    def __init__(self, config: PythonToolConfig, score: Callable[[Task, str], float]):
        self.config, self.score = config, score
        seconds = config.timeout_s
        self.limits = Limits(wall_s=seconds, cpu_s=max(1, math.ceil(seconds)), output_bytes=64 * config.max_output_chars)

    def reset(self, task: Task) -> str:
        self.task, self.actions = task, []
        return self.config.instruction + task.prompt

    def step(self, action: str) -> Step:
        self.actions.append(action)
        program = tool_call(action)
        if program is not None and len(self.actions) < self.config.max_turns:
            output = program_output(run_python(program, limits=self.limits))
            return Step(observation_text(output, self.config.max_output_chars), 0.0, False)
        return Step("", self.score(self.task, "".join(self.actions)), True)


def tool_demonstration(task: Task, config: PythonToolConfig) -> tuple[str, list[tuple[str, bool]]]:
    """A worked chain_sum solution that calls the tool: the first observation, then the turns
    as (text, the policy's own): print the sum, its output, the boxed answer. The output is the
    answer, which is what Python prints for the sum (tests run these programs in the sandbox)."""
    match = re.fullmatch(r"([0-9+-]+)=\?\n", task.prompt)
    if match is None:
        raise ValueError(f"task {task.uid}: tool demonstrations are written for chain_sum prompts "
                         f"('12+3-4=?'), got {task.prompt!r}")
    call = f"{CODE_OPEN}print({match.group(1)}){CODE_CLOSE}"
    output = observation_text(f"{task.answer}\n", config.max_output_chars)
    return config.instruction + task.prompt, [(call, True), (output, False), (f"\\boxed{{{task.answer}}}", True)]


@dataclass
class Turn:
    """One engine continuation: the sampled ids, their log-probs, and whether it ended at EOS."""

    token_ids: list[int]
    logprobs: list[float]
    eos: bool


@dataclass
class Episode:
    prompt_ids: list[int]
    token_ids: list[int]  # after the prompt: policy turns and observations, in order
    loss_mask: list[int]  # 1 on the policy's tokens
    logprobs: list[float]  # the engine's, per token; 0.0 on observation tokens
    actions: list[str]
    reward: float = 0.0
    eos: bool = False  # the last turn ended at EOS


# generate(prompts as token ids, max new tokens of each, temperature, strings that end a turn)
Generate = Callable[[list[list[int]], list[int], float, tuple[str, ...]], list[Turn]]


def run_episodes(envs: list[Environment], tasks: list[Task], generate: Generate, tokenizer,
                 temperature: float, max_turn_tokens: int, max_episode_tokens: int, context: int,
                 prompt_text: Callable[[str], str] = lambda text: text) -> list[Episode]:
    """One episode of each environment with its task, all turns of all episodes batched per
    turn (the environments are of one kind: the first one's `turn_end` serves all). A turn
    stops at EOS, at one of the environment's `turn_end` strings, at
    `max_turn_tokens`, or where the episode reaches `max_episode_tokens` (policy and
    observations together) or the engine's `context`; an episode that cannot fit another
    policy token after an observation ends there, with the rewards it has. `prompt_text` puts
    the first observation into the model's prompt format (a chat template)."""
    episodes = [Episode(tokenizer(prompt_text(env.reset(task)))["input_ids"], [], [], [], [])
                for env, task in zip(envs, tasks)]
    live = list(range(len(envs)))
    with ThreadPoolExecutor(STEP_THREADS) as pool:
        while live:
            budgets = [min(max_turn_tokens, max_episode_tokens - len(episodes[i].token_ids),
                           context - len(episodes[i].prompt_ids) - len(episodes[i].token_ids)) for i in live]
            turns = generate([episodes[i].prompt_ids + episodes[i].token_ids for i in live], budgets,
                             temperature, envs[0].turn_end)
            actions = tokenizer.batch_decode([t.token_ids for t in turns], skip_special_tokens=True)
            steps = list(pool.map(lambda i, action: envs[i].step(action), live, actions))
            still_live = []
            for i, turn, action, step in zip(live, turns, actions, steps):
                episode = episodes[i]
                episode.token_ids += turn.token_ids
                episode.loss_mask += [1] * len(turn.token_ids)
                episode.logprobs += turn.logprobs
                episode.actions.append(action)
                episode.reward += step.reward
                episode.eos = turn.eos
                if step.done:
                    continue
                observed = tokenizer(step.observation, add_special_tokens=False)["input_ids"]
                length = len(episode.token_ids) + len(observed)
                if length >= max_episode_tokens or len(episode.prompt_ids) + length >= context:
                    continue  # no room for the policy to answer: the episode ends here
                episode.token_ids += observed
                episode.loss_mask += [0] * len(observed)
                episode.logprobs += [0.0] * len(observed)
                still_live.append(i)
            live = still_live
    return episodes
