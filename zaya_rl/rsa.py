"""Markovian RSA (docs/methods.md): recursive self-aggregation with bounded prompts.

Owns the algorithm as plain logic over a `generate(prompts, n, temperature)` callable and a tokenizer,
so it runs the same over a `Rollout`, inside a Ray actor, or over a fake in unit tests:

- round 0: N samples of each question, each with decode budget β;
- round t = 1..T: N aggregation prompts per question, each carrying C tails drawn at random
  (without replacement) from the previous round's population; one sample each;
- a tail is the last τ tokens of a candidate (hybrid mode: a finished candidate passes its
  final-answer section instead), so a prompt never exceeds |q| + C·τ + the template's fixed
  overhead, however many rounds run;
- continuation mode (C = 1): Delethink-style chunking, where each unfinished trace goes on
  from the question (the carried head) plus its own last τ tokens.

Every round is one `generate` call for all problems, so the engine batches them all. The
read-outs (mean correctness, majority vote, pass@N) work on extracted answers and verdicts
computed by the caller, because verification of model output belongs in a killable child
process (rewards.math.MathVerifier), not here.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class CompletionLike(Protocol):
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool


class TokenizerLike(Protocol):
    """The batched calls of a Hugging Face tokenizer, and `encode`."""

    def __call__(self, texts: list[str], add_special_tokens: bool = ...) -> Mapping[str, list[list[int]]]: ...
    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = ...) -> list[str]: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# Samples n completions of each prompt at the given temperature, with max_tokens = β.
GenerateFn = Callable[[list[str], int, float], list[list[CompletionLike]]]

# Short on purpose: every token of it is prefill work in every round. The question comes last
# so that the prompt ends exactly where a plain prompt ends: the model continues with a solution.
INSTRUCTION = "Improve; end with \\boxed{}.\n"
# Tokenizers trained from scratch (models.train_tokenizer) take the template's fixed strings as
# whole tokens: a byte-level BPE trained on chain sums alone spelled them out character by
# character, 44 tokens for C = 4, more than four 8-token tails, and the aggregation rounds' extra
# prefill held RSA's throughput to about 0.85 of plain generation (benchmarks/rsa_throughput.py).
NUMBERED_TAILS_IN_VOCAB = 16


def candidate_marker(number: int) -> str:
    return f"[{number}]\n"


def template_pieces() -> list[str]:
    """The template's fixed strings: the instruction and the first markers."""
    return [INSTRUCTION] + [candidate_marker(i) for i in range(1, NUMBERED_TAILS_IN_VOCAB + 1)]


@dataclass(frozen=True)
class RsaConfig:
    population: int = 8  # N
    tails: int = 4  # C: candidates per aggregation prompt
    rounds: int = 2  # T: aggregation rounds after the first sampling round
    budget: int = 64  # β: max new tokens of every rollout
    tail_tokens: int = 32  # τ <= β: tokens of a candidate carried into the next round
    temperature: float = 1.0
    seed: int = 0  # for drawing tails; the engine keeps its own sampling seed
    hybrid: bool = False  # finished candidates pass their final-answer section, not their tail
    continuation: bool = False  # Delethink chunking: C = 1 and each trace continues its own tail
    # Temperature of the aggregation rounds (rounds 1..T; not of continuation chunks); None: `temperature`.
    # Round 0 sampled hot keeps the population diverse; a cooler aggregator answers with what it
    # reads as most likely from its candidates instead of adding its own sampling noise.
    aggregation_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.population < 1 or self.tails < 1 or self.rounds < 0 or self.budget < 1:
            raise ValueError("RSA needs population >= 1, tails >= 1, rounds >= 0, budget >= 1")
        if self.tails > self.population:
            raise ValueError(f"tails ({self.tails}) must be <= population ({self.population}): "
                             "they are drawn without replacement")
        if not 1 <= self.tail_tokens <= self.budget:
            raise ValueError(f"tail_tokens must be in [1, budget={self.budget}], got {self.tail_tokens}")
        if self.temperature < 0 or (self.aggregation_temperature or 0) < 0:
            raise ValueError("temperatures must be >= 0")
        if self.continuation and self.tails != 1:
            raise ValueError("continuation (Delethink chunking) carries one tail: set tails=1")


@dataclass
class RoundStats:
    prompts: int  # prompts sent to the engine this round (continuation skips finished traces)
    longest_prompt_tokens: int
    generated_tokens: int
    seconds: float


@dataclass
class RsaResult:
    populations: list[list[list[CompletionLike]]]  # [round][problem][member], rounds 0..T
    rounds: list[RoundStats]
    # [round - 1][problem][member]: indices of the previous round's members this member was
    # given (continuation: the member itself), so read-outs can judge what aggregation did.
    draws: list[list[list[list[int]]]]

    @property
    def final(self) -> list[list[CompletionLike]]:
        return self.populations[-1]


def aggregation_prompt(question: str, tails: Sequence[str]) -> str:
    """Numbered candidate tails, a short instruction, then the question."""
    candidates = "".join(f"{candidate_marker(i + 1)}{tail}\n" for i, tail in enumerate(tails))
    return candidates + INSTRUCTION + question


def template_overhead_tokens(tokenizer: TokenizerLike, tails: int) -> int:
    """Tokens the aggregation template adds around the question and `tails` tails."""
    return len(tokenizer.encode(aggregation_prompt("", [""] * tails), add_special_tokens=False))


def tokens_needed(tokenizer: TokenizerLike, questions: list[str], cfg: RsaConfig) -> int:
    """The context an engine needs to run `cfg` over `questions`: the longest prompt it builds
    (the longest question, with C tails of τ tokens and the template after round 0) plus β."""
    longest_question = max(len(tokenizer.encode(q, add_special_tokens=False)) for q in questions)
    carried = cfg.tail_tokens if cfg.continuation else \
        cfg.tails * cfg.tail_tokens + template_overhead_tokens(tokenizer, cfg.tails)
    return longest_question + (carried if cfg.rounds else 0) + cfg.budget


def last_tokens(texts: list[str], num_tokens: int, tokenizer: TokenizerLike) -> list[str]:
    """For each text, its longest end that encodes to at most `num_tokens` tokens.

    Batched: a tokenizer call per text took about 6% of an RSA aggregation round's time
    (benchmarks/rsa_throughput.py, 256 candidates).
    """
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = [text if len(text_ids) <= num_tokens else "" for text, text_ids in zip(texts, ids)]
    pending = [i for i, text_ids in enumerate(ids) if len(text_ids) > num_tokens]
    # A cut inside a multi-byte character decodes to U+FFFD, which re-encodes to 3 bytes (up to
    # 3 byte-level tokens), and decoded tokens can re-encode differently; so check the
    # re-encoding and drop a token until it fits.
    for keep in range(num_tokens, 0, -1):
        if not pending:
            break
        cut = tokenizer.batch_decode([ids[i][-keep:] for i in pending], skip_special_tokens=True)
        lengths = [len(x) for x in tokenizer(cut, add_special_tokens=False)["input_ids"]]
        for i, text, length in zip(pending, cut, lengths):
            if length <= num_tokens:
                out[i] = text
        pending = [i for i, length in zip(pending, lengths) if length > num_tokens]
    return out


def cut_tails(candidates: Sequence[CompletionLike], tail_tokens: int, tokenizer: TokenizerLike,
              hybrid: bool) -> list[str]:
    """What each candidate passes on: its last τ tokens; in hybrid mode a finished candidate
    passes its final-answer section (from the last line holding \\boxed), cut to τ tokens
    too so the prompt bound still holds."""
    texts = []
    for candidate in candidates:
        text = candidate.text
        if hybrid and candidate.finished:
            box = text.rfind("\\boxed")
            if box != -1:
                text = text[text.rfind("\n", 0, box) + 1:]
        texts.append(text)
    return last_tokens(texts, tail_tokens, tokenizer)


def draw_candidates(num_candidates: int, num_prompts: int, tails: int, rng: random.Random) -> list[list[int]]:
    """For each of `num_prompts` prompts, `tails` candidate indices drawn uniformly without
    replacement (draws independent across prompts)."""
    if tails > num_candidates:
        raise ValueError(f"cannot draw {tails} tails from {num_candidates} candidates")
    return [rng.sample(range(num_candidates), tails) for _ in range(num_prompts)]


def aggregation_prompts(questions: list[str], groups: Sequence[Sequence[CompletionLike]],
                        draws: list[list[list[int]]], tail_tokens: int, tokenizer: TokenizerLike,
                        hybrid: bool = False) -> list[str]:
    """For each question, one aggregation prompt per draw, carrying the drawn candidates of its
    group; all candidates' tails are cut in one batch."""
    cut = iter(cut_tails([c for group in groups for c in group], tail_tokens, tokenizer, hybrid))
    cut_groups = [[next(cut) for _ in group] for group in groups]
    return [aggregation_prompt(question, [group[i] for i in draw])
            for question, group, question_draws in zip(questions, cut_groups, draws) for draw in question_draws]


def run_rsa(generate: GenerateFn, tokenizer: TokenizerLike, questions: list[str],
            cfg: RsaConfig) -> RsaResult:
    """Markovian RSA over a batch of questions; one `generate` call per round."""
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    population = generate(questions, cfg.population, cfg.temperature)
    rounds = [_stats(len(questions), [c for group in population for c in group], start)]
    populations, all_draws = [population], []
    aggregation_temperature = cfg.temperature if cfg.aggregation_temperature is None else cfg.aggregation_temperature
    for _ in range(cfg.rounds):
        start = time.perf_counter()
        if cfg.continuation:
            draws = [[[j] for j in range(cfg.population)] for _ in questions]
            population, fresh, num_prompts = _continue(generate, tokenizer, questions, population, cfg)
        else:
            draws = [draw_candidates(len(group), cfg.population, cfg.tails, rng) for group in population]
            prompts = aggregation_prompts(questions, population, draws, cfg.tail_tokens, tokenizer, cfg.hybrid)
            fresh = [group[0] for group in generate(prompts, 1, aggregation_temperature)]
            population = [fresh[i * cfg.population:(i + 1) * cfg.population] for i in range(len(questions))]
            num_prompts = len(prompts)
        rounds.append(_stats(num_prompts, fresh, start))
        populations.append(population)
        all_draws.append(draws)
    return RsaResult(populations, rounds, all_draws)


def _continue(generate: GenerateFn, tokenizer: TokenizerLike, questions: list[str],
              population: list[list[CompletionLike]], cfg: RsaConfig):
    """One Delethink chunk: every unfinished trace goes on from question + its own tail;
    finished traces are kept as they are (and cost nothing)."""
    slots = [(i, j) for i, group in enumerate(population) for j, c in enumerate(group) if not c.finished]
    cut = last_tokens([population[i][j].text for i, j in slots], cfg.tail_tokens, tokenizer)
    prompts = [questions[i] + tail for (i, _), tail in zip(slots, cut)]
    fresh = [group[0] for group in generate(prompts, 1, cfg.temperature)] if prompts else []
    population = [list(group) for group in population]
    for (i, j), c in zip(slots, fresh):
        population[i][j] = c
    return population, fresh, len(prompts)


def _stats(num_prompts: int, completions: list[CompletionLike], start: float) -> RoundStats:
    return RoundStats(
        prompts=num_prompts,
        longest_prompt_tokens=max((len(c.prompt_ids) for c in completions), default=0),
        generated_tokens=sum(len(c.token_ids) for c in completions),
        seconds=time.perf_counter() - start,
    )


# ---- read-outs over one problem's population ------------------------------------------


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first member holding the most common answer (None: no member answered).
    Ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = counts.most_common(1)[0][0]
    return answers.index(best)


def plurality_correctness(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Expected correctness of a vote among these candidates with ties broken at random
    (no answer counts as wrong): the bar an aggregator should clear."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = {a for a, n in counts.items() if n == top}
    right = {a for a, ok in zip(answers, correct) if ok and a in winners}
    return len(right) / len(winners)


def readouts(answers: Sequence[str | None], correct: Sequence[bool]) -> dict[str, float]:
    """Mean correctness, majority-vote correctness and pass@N of one population."""
    winner = majority_index(answers)
    return {
        "mean": sum(correct) / len(correct),
        "majority": float(winner is not None and correct[winner]),
        "pass_at_n": float(any(correct)),
    }
