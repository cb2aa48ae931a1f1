"""The recipe: one typed description of a whole run, validated when it is loaded.

Importable without torch or Ray. `load_recipe` turns YAML into a `Recipe` or raises
`RecipeError`, whose message names the file, the field and the line. Nothing is ever
silently changed: a bad value is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(StrictModel):
    """A Qwen3-MoE built from scratch; vLLM, transformers and DeepSpeed all serve it."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(32, ge=4)
    num_experts: int = Field(4, ge=2)
    experts_per_token: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(256, ge=4)
    vocab_size: int = Field(320, ge=260, description="BPE vocabulary trained offline on task text")
    max_position_embeddings: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        if self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must be <= num_experts")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class ModelConfig(StrictModel):
    path: Path | None = Field(None, description="a Hugging Face checkpoint directory; null builds `tiny`")
    tiny: TinyModelConfig = TinyModelConfig()


class TasksConfig(StrictModel):
    """Procedural arithmetic from reasoning-gym; `level` sets the difficulty (see tasks.py)."""

    generator: Literal["chain_sum"] = "chain_sum"
    max_level: int = Field(3, ge=0, description="hardest level any stage or curriculum may use")


class EvalConfig(StrictModel):
    num_problems: int = Field(1000, ge=1)
    levels: list[int] = Field(default_factory=lambda: [1, 2])
    temperature: float = Field(1.0, ge=0.0, description="sampled accuracy is measured at this temperature")
    greedy: bool = True
    max_tokens: int = Field(64, ge=1)


class AlgorithmConfig(StrictModel):
    """How an RL stage turns rewards into an update (METHODS.md §5, zaya_rl/algorithms.py).

    The defaults are ZAYA1's aggregation with GRPO advantages and DAPO's clip bounds.
    """

    advantage: Literal["grpo", "dr_grpo", "rloo", "maxrl"] = "grpo"
    loss: Literal["ppo_clip", "gspo", "cispo", "dppo_tv"] = Field(
        "ppo_clip", description="policy loss: PPO-clip, GSPO sequence ratio, CISPO, DPPO binary-TV")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_mean", "seq_sum_constant"] = Field(
        "seq_sum_mean", description="token losses to one scalar: mean over the batch's tokens; mean over "
        "sequences of each one's token mean; mean over sequences of each one's token sum (ZAYA1); "
        "the same divided by loss_constant (Dr. GRPO)")
    loss_constant: float | None = Field(
        None, gt=0, description="seq_sum_constant's divisor, e.g. the stage's max_tokens; only with it")
    clip_low: float = Field(0.2, ge=0.0, description="ppo_clip, gspo: ratio clipped at 1 - clip_low "
                            "(GSPO's paper: 3e-4)")
    clip_high: float = Field(0.28, ge=0.0, description="ppo_clip, gspo, cispo: ratio clipped at "
                             "1 + clip_high (GSPO's paper: 4e-4)")
    dppo_delta: float = Field(0.1, gt=0.0, le=1.0, description="dppo_tv: mask a token once its probability "
                              "moved more than this from the engine's in the advantage's direction")
    tis_cap: float | None = Field(
        None, ge=1.0, description="cap C of the importance weight against the engine's log-probs: "
        "ppo_clip, gspo and cispo take the learner's pre-update log-probs as old and weight each token "
        "by min(π_old/μ, C); dppo_tv's c in min(π/μ, c), required there; null: no correction")
    kl_coef: float = Field(0.0, ge=0.0, description="weight of KL(π || reference); the reference is the "
                           "policy at the first RL step that uses it; 0 keeps no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman)")
    drop_uniform_groups: bool = Field(True, description="skip groups whose rewards are all equal")
    max_sampling_rounds: int = Field(1, ge=1, description="dynamic sampling: generate up to this many "
                                     "rounds of new prompts to refill the dropped groups (1: no refill)")
    overlong: Literal["none", "filter", "shape"] = Field(
        "none", description="samples cut at max_tokens: kept as they are; left out of the loss; or "
        "penalised linearly over the last overlong_buffer tokens (DAPO)")
    overlong_buffer: int | None = Field(None, ge=1, description="overlong 'shape': the penalty ramps "
                                        "from 0 to -1 over this many tokens before max_tokens; only with it")
    degeneracy_min_compression: float | None = Field(
        None, gt=0.0, lt=1.0, description="reward 0 for output with a chunk whose zlib compression ratio "
        "is below this (ZAYA1: 0.05); null disables")

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if (self.loss_aggregation == "seq_sum_constant") != (self.loss_constant is not None):
            raise ValueError("loss_constant is required with loss_aggregation 'seq_sum_constant' "
                             "and not allowed with any other")
        if (self.overlong == "shape") != (self.overlong_buffer is not None):
            raise ValueError("overlong_buffer is required with overlong 'shape' and not allowed otherwise")
        if self.loss == "dppo_tv" and self.tis_cap is None:
            raise ValueError("loss 'dppo_tv' needs tis_cap: its cap c in min(π/μ, c)")
        if self.overlong == "shape" and self.advantage == "maxrl":
            raise ValueError("advantage 'maxrl' divides by the mean reward and needs rewards in [0, 1]; "
                             "overlong 'shape' makes them negative")
        return self


class CurriculumConfig(StrictModel):
    """Adaptive difficulty (METHODS.md §4): up when a level's pass rate is high, down at 0."""

    start_level: int = Field(1, ge=0)
    adaptive: bool = True
    raise_above: float = Field(0.7, ge=0.0, le=1.0)
    lower_at_or_below: float = Field(0.0, ge=0.0, le=1.0)
    window: int = Field(64, ge=1, description="recent rewards that make a level's pass rate")


class StageBase(StrictModel):
    name: str = Field(min_length=1)
    steps: int = Field(ge=1)
    max_seconds: float | None = Field(None, gt=0, description="stop the stage early after this wall time")
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_at_end: bool = True


class SftStage(StageBase):
    kind: Literal["sft"]
    batch_size: int = Field(64, ge=1)
    levels: list[int] = Field(default_factory=lambda: [0, 1])


class RlStage(StageBase):
    kind: Literal["rl"]
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    temperature: float = Field(1.0, gt=0.0)
    max_tokens: int = Field(64, ge=1)
    minibatches: int = Field(1, ge=1, description="optimizer steps per generated batch (PPO epochs of one "
                             "pass); each later minibatch is slightly off-policy, which the clip handles")
    aggregation_share: float = Field(0.0, ge=0.0, lt=1.0, description="share of each step's prompts that "
                                     "are round-1 aggregation prompts (Markovian RSA) built from the policy's "
                                     "own recent rollouts of the same task")
    aggregation_tails: int = Field(4, ge=1, description="C: candidate tails per aggregation prompt")
    aggregation_tail_tokens: int = Field(32, ge=1, description="τ: tokens carried from each candidate")
    algorithm: AlgorithmConfig = AlgorithmConfig()
    curriculum: CurriculumConfig = CurriculumConfig()

    @model_validator(mode="after")
    def _check(self) -> RlStage:
        if self.aggregation_share > 0 and self.aggregation_tails > self.group_size:
            raise ValueError(f"aggregation_tails ({self.aggregation_tails}) must be <= group_size ({self.group_size})")
        buffer = self.algorithm.overlong_buffer
        if buffer is not None and buffer > self.max_tokens:
            raise ValueError(f"algorithm.overlong_buffer ({buffer}) must be <= max_tokens ({self.max_tokens})")
        return self


Stage = Annotated[SftStage | RlStage, Field(discriminator="kind")]


class ResourcesConfig(StrictModel):
    num_rollout_workers: int = Field(1, ge=1)
    num_learner_workers: int = Field(1, ge=1)
    num_verifiers: int = Field(2, ge=1)
    rollout_engine: Literal["vllm", "hf"] = "vllm"
    torch_threads: int = Field(2, ge=1, description="intra-op threads of each worker process")


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2] = 2
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class CheckpointConfig(StrictModel):
    """Run checkpoints (model, optimizer, curriculum, data position, step counters)."""

    every_steps: int = Field(50, ge=1, description="write one every this many steps of any stage, "
                             "and one at each stage's end")
    keep_last: int = Field(2, ge=1, description="older complete checkpoints are deleted")
    max_recoveries: int = Field(2, ge=0, description="times a run restores its last checkpoint by itself "
                                "after an actor that Ray cannot replace (a learner) died")


class MetricsConfig(StrictModel):
    wandb_project: str | None = None
    wandb_mode: Literal["online", "offline"] = "offline"


class Recipe(StrictModel):
    name: str = Field(min_length=1)
    seed: int = 0
    run_dir: Path = Path("runs/default")
    model: ModelConfig = ModelConfig()
    tasks: TasksConfig = TasksConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.model.path is not None and not self.model.path.is_dir():
            raise ValueError(f"model.path {str(self.model.path)!r} is not a directory")
        for stage in self.stages:
            levels = stage.levels if isinstance(stage, SftStage) else [stage.curriculum.start_level]
            if max(levels, default=0) > self.tasks.max_level:
                raise ValueError(f"stage {stage.name!r} uses a level above tasks.max_level")
        if max(self.eval.levels) > self.tasks.max_level:
            raise ValueError("eval.levels has a level above tasks.max_level")
        return self


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file, field and line."""


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    data.update(overrides or {})
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(recipe)"
            line = _line_of(root, e["loc"])
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {field}: {e['msg']}")
        raise RecipeError("\n".join(lines)) from None


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on `loc` (a pydantic error location)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
        if child is None:
            continue  # a discriminator tag such as 'sft', or a field the YAML lacks
        node, line = child, child.start_mark.line + 1
    return line


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
