"""The driver: places the worker groups, runs a recipe's stages, and owns the RL step.

Components (rollout workers, learners, verifiers) never reference the controller; it
calls their typed methods and moves data between them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from workers.learner import LearnerGroup, Sequence
from workers.rollout import Completion, RolloutWorker
from workers.verifier import VerifierPool
from zaya_rl import algorithms
from zaya_rl.curriculum import AdaptiveCurriculum
from zaya_rl.metrics import MetricsSink
from zaya_rl.models import build_checkpoint, load_tokenizer
from zaya_rl.recipe import Recipe, RlStage, SftStage, StageBase, dump_recipe
from zaya_rl.tasks import Task, TaskStream, held_out


@dataclass
class StageTimes:
    """Where a stage's wall time went, and how many tokens the engines generated."""

    seconds: dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class Timer:
    def __init__(self, times: StageTimes, phase: str):
        self.times, self.phase = times, phase

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.times.add(self.phase, time.perf_counter() - self.start)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray instance when none is given."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)


def lr_at(stage: StageBase, step: int) -> float:
    """Linear warm-up, then constant."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    return stage.lr


def accuracy_with_interval(correct: list[bool]) -> dict:
    """Accuracy and its 95% Wilson interval."""
    n, k = len(correct), sum(correct)
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": p, "ci95": [centre - half, centre + half], "n": n}


class Controller:
    def __init__(self, recipe: Recipe, run_dir: Path | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
        init_ray()
        self.model_path = self._prepare_model()
        self.tokenizer = load_tokenizer(self.model_path)
        self.eval_tasks = held_out(recipe.tasks.generator, recipe.eval.levels, recipe.eval.num_problems)
        self.stream = TaskStream(recipe.tasks.generator, recipe.seed,
                                 exclude=frozenset(t.prompt for t in self.eval_tasks))
        res = recipe.resources
        # Ray sets OMP_NUM_THREADS=1 in its workers; vLLM sizes its CPU thread pool from it.
        threads = {"env_vars": {"OMP_NUM_THREADS": str(res.torch_threads)}}
        self.rollouts = [
            RolloutWorker.options(name=f"rollout-{i}", runtime_env=threads).remote(
                res.rollout_engine, str(self.model_path), seed=recipe.seed + i,
                max_model_len=recipe.model.tiny.max_position_embeddings, torch_threads=res.torch_threads)
            for i in range(res.num_rollout_workers)
        ]
        self.learners = LearnerGroup(res.num_learner_workers, str(self.model_path), recipe.deepspeed,
                                     torch_threads=res.torch_threads, seed=recipe.seed)
        self.verifiers = VerifierPool(res.num_verifiers)
        self.metrics = MetricsSink(self.run_dir, recipe.metrics, recipe.name, recipe.model_dump(mode="json"))
        self.weights_version = 0
        self.summary: dict = {"recipe": recipe.name, "seed": recipe.seed, "stages": {}}

    def _prepare_model(self) -> Path:
        if self.recipe.model.path is not None:
            return self.recipe.model.path
        corpus_stream = TaskStream(self.recipe.tasks.generator, self.recipe.seed)
        corpus = [t.prompt + t.solution for level in range(self.recipe.tasks.max_level + 1)
                  for t in corpus_stream.take(level, 500)]
        return build_checkpoint(self.recipe.model.tiny, corpus, self.run_dir / "initial", self.recipe.seed)

    # ---- the stages -------------------------------------------------------------------

    def run(self) -> dict:
        start = time.perf_counter()
        for stage in self.recipe.stages:
            self.run_stage(stage)
        final = self.run_dir / "final"
        self.learners.save(str(final))
        self.summary["final_checkpoint"] = str(final)
        self.summary["wall_seconds"] = time.perf_counter() - start
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        self.metrics.close()
        return self.summary

    def run_stage(self, stage: SftStage | RlStage) -> None:
        from rich.progress import Progress

        times = StageTimes()
        curriculum = None
        if isinstance(stage, RlStage):
            curriculum = AdaptiveCurriculum(stage.curriculum, self.stream, self.recipe.tasks.max_level)
        start = time.perf_counter()
        with Progress(transient=False) as progress:
            bar = progress.add_task(f"{stage.kind} {stage.name}", total=stage.steps)
            for step in range(stage.steps):
                if stage.max_seconds and time.perf_counter() - start > stage.max_seconds:
                    break
                if isinstance(stage, SftStage):
                    stats = self.sft_step(stage, step, times)
                else:
                    stats = self.rl_step(stage, step, curriculum, times)
                self.metrics.log(stage.name, step, stats)
                progress.update(bar, advance=1, description=f"{stage.kind} {stage.name} {_brief(stats)}")
        wall = time.perf_counter() - start
        result = {"kind": stage.kind, "steps": step + 1, "train_seconds": wall, "phase_seconds": times.seconds}
        if times.generated_tokens:
            result["train_generated_tokens_per_second"] = times.generated_tokens / times.seconds["generate"]
        if curriculum is not None:
            result["final_level"] = curriculum.level
        if stage.eval_at_end:
            self.sync_weights()
            result.update(self.evaluate())
        result["wall_seconds"] = time.perf_counter() - start
        result["checkpoint"] = str(self.run_dir / "stages" / stage.name)
        self.learners.save(result["checkpoint"])
        self.summary["stages"][stage.name] = result
        self.metrics.log(stage.name, step + 1, {k: v for k, v in result.items() if isinstance(v, float)})

    def sft_step(self, stage: SftStage, step: int, times: StageTimes) -> dict:
        level_tasks = [self.stream.take(stage.levels[i % len(stage.levels)], 1)[0]
                       for i in range(stage.batch_size)]
        batch = [Sequence(self._ids(t.prompt), self._ids(t.solution) + [self.tokenizer.eos_token_id])
                 for t in level_tasks]
        with Timer(times, "train"):
            stats = self.learners.sft_step(batch, lr=lr_at(stage, step))
        return {"loss": stats["loss"], "lr": lr_at(stage, step)}

    def rl_step(self, stage: RlStage, step: int, curriculum: AdaptiveCurriculum, times: StageTimes) -> dict:
        """One RL step: generate -> verify -> advantages -> update -> weight sync."""
        tasks = curriculum.next_batch(stage.prompts_per_step)
        with Timer(times, "generate"):
            groups = self.generate([t.prompt for t in tasks], stage.group_size, stage.temperature,
                                   stage.max_tokens)
        flat = [c for group in groups for c in group]
        times.generated_tokens += sum(len(c.token_ids) for c in flat)
        with Timer(times, "verify"):
            verdicts = self.verifiers.score([c.text for c in flat],
                                            [t.answer for t in tasks for _ in range(stage.group_size)])
        rewards = torch.tensor([float(v.correct) for v in verdicts]).view(len(tasks), stage.group_size)
        curriculum.observe(tasks, rewards.mean(dim=1).tolist())

        advantages = algorithms.group_advantages(rewards, stage.algorithm.advantage)
        keep = ~algorithms.uniform_groups(rewards) if stage.algorithm.drop_uniform_groups else torch.ones(len(tasks), dtype=torch.bool)
        batch = [
            Sequence(c.prompt_ids, c.token_ids, advantage=float(advantages[g, i]), old_logprobs=c.logprobs)
            for g, group in enumerate(groups) if keep[g] for i, c in enumerate(group)
        ]
        batch = batch[: len(batch) - len(batch) % self.learners.num_workers]
        stats: dict = {}
        if batch:
            with Timer(times, "train"):
                stats = self.learners.rl_step(batch, lr=lr_at(stage, step), clip_low=stage.algorithm.clip_low,
                                              clip_high=stage.algorithm.clip_high, temperature=stage.temperature)
            with Timer(times, "sync"):
                self.sync_weights()
        return {
            "reward": rewards.mean().item(), "level": curriculum.level, "pass_rate": curriculum.pass_rate(),
            "kept_groups": int(keep.sum()), "response_tokens": sum(len(c.token_ids) for c in flat) / len(flat),
            "lr": lr_at(stage, step), **{k: v for k, v in stats.items() if isinstance(v, float | int)},
        }

    # ---- shared pieces ---------------------------------------------------------------

    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int,
                 seed: int | None = None) -> list[list[Completion]]:
        """Fan prompts out over the rollout workers in contiguous chunks; gather in order."""
        workers = self.rollouts
        size = -(-len(prompts) // len(workers))
        refs = [w.generate.remote(prompts[i * size:(i + 1) * size], n, temperature, max_tokens, seed)
                for i, w in enumerate(workers) if prompts[i * size:(i + 1) * size]]
        return [group for chunk in ray.get(refs) for group in chunk]

    def sync_weights(self) -> None:
        self.weights_version += 1
        state = self.learners.state_dict_ref()
        ray.get([w.load_weights.remote(state, self.weights_version) for w in self.rollouts])

    def evaluate(self) -> dict:
        """Held-out accuracy, sampled at the recipe's temperature and greedy."""
        cfg, tasks = self.recipe.eval, self.eval_tasks
        out = {}
        modes = [("sampled", cfg.temperature)] + ([("greedy", 0.0)] if cfg.greedy else [])
        for mode, temperature in modes:
            start = time.perf_counter()
            groups = self.generate([t.prompt for t in tasks], 1, temperature, cfg.max_tokens,
                                   seed=self.recipe.seed)
            seconds = time.perf_counter() - start
            texts = [g[0].text for g in groups]
            verdicts = self.verifiers.score(texts, [t.answer for t in tasks])
            acc = accuracy_with_interval([v.correct for v in verdicts])
            tokens = sum(len(g[0].token_ids) for g in groups)
            out[f"eval_{mode}"] = {**acc, "generated_tokens_per_second": tokens / seconds,
                                   "by_level": _by_level(tasks, verdicts)}
        out["eval_accuracy"] = out["eval_sampled"]["accuracy"]
        out["generated_tokens_per_second"] = out["eval_sampled"]["generated_tokens_per_second"]
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def shutdown(self) -> None:
        self.verifiers.shutdown()
        self.learners.shutdown()
        for w in self.rollouts:
            ray.kill(w)


def _by_level(tasks: list[Task], verdicts) -> dict[str, float]:
    levels: dict[int, list[bool]] = {}
    for t, v in zip(tasks, verdicts):
        levels.setdefault(t.level, []).append(v.correct)
    return {str(k): sum(v) / len(v) for k, v in sorted(levels.items())}


def _brief(stats: dict) -> str:
    keys = ("loss", "reward", "level")
    return " ".join(f"{k}={stats[k]:.3g}" for k in keys if isinstance(stats.get(k), int | float))
