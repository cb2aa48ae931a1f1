"""Task sources: procedurally generated arithmetic from reasoning-gym, offline.

A `Task` carries its prompt, its gold answer, a worked solution (the target of the SFT
warmup) and its difficulty level. Training and held-out problems come from disjoint seed
ranges, and a training stream also skips any problem whose prompt is in the held-out set:
easy levels have few distinct problems, so disjoint seeds alone would still repeat some.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import reasoning_gym

# Difficulty levels of reasoning-gym's chain_sum: (min_terms, max_terms, min_digits, max_digits).
CHAIN_SUM_LEVELS: tuple[tuple[int, int, int, int], ...] = (
    (2, 2, 1, 1),
    (2, 3, 1, 2),
    (3, 3, 2, 2),
    (3, 4, 2, 2),
    (4, 5, 2, 3),
)
BLOCK = 4096  # problems generated per reasoning-gym dataset instance
# reasoning-gym seeds item i of a dataset with Random(seed + i), so dataset seeds are spaced
# BLOCK apart. Held-out data lives in region 0, training run `seed` in region seed + 1.
REGION = 10**12
LEVEL_SPAN = 10**10


def _dataset_seed(region: int, level: int, block: int) -> int:
    return region * REGION + level * LEVEL_SPAN + block * BLOCK


@dataclass(frozen=True)
class Task:
    uid: str
    prompt: str
    answer: str
    solution: str
    level: int


def render(expression: str) -> tuple[str, list[tuple[str, int]]]:
    """The prompt for an expression such as '12 + 3 - 4', and its left-to-right steps."""
    tokens = expression.split()
    value = int(tokens[0])
    steps = []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = value + int(operand) if op == "+" else value - int(operand)
        steps.append((f"{op}{operand}", value))
    return "".join(tokens) + "=?\n", steps


def worked_solution(expression: str) -> str:
    """Left-to-right partial sums, then the boxed answer: '12+3=15\\n15-4=11\\n\\boxed{11}'."""
    tokens = expression.split()
    _, steps = render(expression)
    lines, current = [], tokens[0]
    for term, value in steps:
        lines.append(f"{current}{term}={value}")
        current = str(value)
    return "\n".join(lines) + f"\n\\boxed{{{current}}}"


@lru_cache(maxsize=64)
def _block(generator: str, level: int, seed: int) -> tuple[Task, ...]:
    if generator != "chain_sum":
        raise ValueError(f"unknown task generator {generator!r}")
    if not 0 <= level < len(CHAIN_SUM_LEVELS):
        raise ValueError(f"chain_sum has levels 0..{len(CHAIN_SUM_LEVELS) - 1}, got {level}")
    min_terms, max_terms, min_digits, max_digits = CHAIN_SUM_LEVELS[level]
    data = reasoning_gym.create_dataset(
        "chain_sum", min_terms=min_terms, max_terms=max_terms, min_digits=min_digits,
        max_digits=max_digits, seed=seed, size=BLOCK,
    )
    tasks = []
    for index, item in enumerate(data):
        expression = item["metadata"]["expression"]
        prompt, _ = render(expression)
        tasks.append(Task(
            uid=f"{generator}/{level}/{seed}/{index}", prompt=prompt, answer=item["answer"],
            solution=worked_solution(expression), level=level,
        ))
    return tuple(tasks)


class TaskStream:
    """An endless, resumable stream of training tasks of one generator, by level.

    The position (number of tasks drawn per level) is the stream's whole state, so a
    checkpoint that stores it resumes on exactly the next task.
    """

    def __init__(self, generator: str, seed: int, exclude: frozenset[str] = frozenset(),
                 position: dict[int, int] | None = None):
        if seed < 0:
            raise ValueError("the training seed must be >= 0 (negative seeds would reach held-out data)")
        self.generator = generator
        self.seed = seed
        self.exclude = exclude
        self.position: dict[int, int] = dict(position or {})

    def take(self, level: int, count: int) -> list[Task]:
        out: list[Task] = []
        while len(out) < count:
            n = self.position.get(level, 0)
            block, index = divmod(n, BLOCK)
            task = _block(self.generator, level, _dataset_seed(self.seed + 1, level, block))[index]
            self.position[level] = n + 1
            if task.prompt not in self.exclude:
                out.append(task)
        return out

    def state(self) -> dict:
        return {"generator": self.generator, "seed": self.seed, "position": dict(self.position)}


def held_out(generator: str, levels: list[int], num_problems: int) -> list[Task]:
    """A fixed evaluation set, the same for every run: levels interleaved, round robin."""
    per_level = -(-num_problems // len(levels))
    blocks = [_held_out_level(generator, level, per_level) for level in levels]
    mixed = [t for group in zip(*blocks) for t in group]
    return mixed[:num_problems]


def _held_out_level(generator: str, level: int, count: int) -> list[Task]:
    tasks: list[Task] = []
    block = 0
    while len(tasks) < count:
        tasks.extend(_block(generator, level, _dataset_seed(0, level, block)))
        block += 1
    return tasks[:count]
