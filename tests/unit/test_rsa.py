"""Markovian RSA: the prompt bound, its special cases (T=0, τ=β, C=1) and read-outs on a
deterministic fake engine; then the real vLLM engine on a tiny checkpoint (`zaya-rl eval`, which
runs it through Ray's rollout workers: tests/e2e/test_rsa_workers.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from zaya_rl.evaluate import aggregation_readouts, paired_difference
from zaya_rl.rsa import (
    INSTRUCTION, RsaConfig, aggregation_prompt, last_tokens, majority_index, plurality_correctness, readouts,
    run_rsa, template_overhead_tokens,
)
from zaya_rl.tasks import TaskStream

QUESTIONS = ["1+2=?\n", "10-3+4=?\n", "7+8-9=?\n"]


class CharTokenizer:
    """One token per character: token counts are plain string lengths."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self.encode(text) for text in texts]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(i) for i in one) for one in ids]


@dataclass
class FakeCompletion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool


class FakeEngine:
    """Deterministic: the k-th sample is a chain of `k % 5 + 1` steps and the answer `k % 3`;
    samples longer than the budget are cut there and unfinished."""

    def __init__(self, budget: int):
        self.budget, self.count, self.calls, self.temperatures = budget, 0, [], []
        self.tok = CharTokenizer()

    def __call__(self, prompts, n, temperature):
        self.calls.append((list(prompts), n))
        self.temperatures.append(temperature)
        return [[self._sample(p) for _ in range(n)] for p in prompts]

    def _sample(self, prompt):
        k, self.count = self.count, self.count + 1
        full = "".join(f"step{k}.{s}\n" for s in range(k % 5 + 1)) + f"\\boxed{{{k % 3}}}"
        text = full[:self.budget]
        return FakeCompletion(self.tok.encode(prompt), self.tok.encode(text), text, text == full)


def run_fake(**kw):
    cfg = RsaConfig(**kw)
    engine = FakeEngine(cfg.budget)
    return cfg, engine, run_rsa(engine, engine.tok, QUESTIONS, cfg)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("tails,tail_tokens", [(1, 5), (2, 12), (4, 40)])
def test_every_round_prompt_is_bounded(tails, tail_tokens, hybrid):
    cfg, engine, result = run_fake(population=6, tails=tails, rounds=4, budget=40,
                                   tail_tokens=tail_tokens, hybrid=hybrid)
    bound = max(map(len, QUESTIONS)) + tails * tail_tokens + template_overhead_tokens(engine.tok, tails)
    assert len(engine.calls) == 5  # one engine call per round, all problems together
    for (prompts, n), stats in zip(engine.calls[1:], result.rounds[1:]):
        assert n == 1 and len(prompts) == len(QUESTIONS) * cfg.population
        for i, prompt in enumerate(prompts):
            assert len(prompt) <= len(QUESTIONS[i // cfg.population]) + tails * tail_tokens \
                + template_overhead_tokens(engine.tok, tails)
        assert stats.longest_prompt_tokens == max(map(len, prompts)) <= bound
    assert [len(p) for p in result.populations] == [len(QUESTIONS)] * 5
    assert all(len(group) == cfg.population for pop in result.populations for group in pop)


def test_no_rounds_is_parallel_sampling():
    cfg, engine, result = run_fake(population=5, tails=2, rounds=0, budget=40, tail_tokens=10)
    plain = FakeEngine(cfg.budget)(QUESTIONS, cfg.population, cfg.temperature)
    assert engine.calls == [(QUESTIONS, 5)]
    assert result.final == plain and len(result.rounds) == 1
    assert result.rounds[0].generated_tokens == sum(len(c.token_ids) for g in plain for c in g)


def test_full_tail_carries_whole_traces():
    cfg, engine, result = run_fake(population=4, tails=3, rounds=2, budget=40, tail_tokens=40, seed=7)
    rng = random.Random(7)
    for t in (1, 2):
        expected = [aggregation_prompt(q, [group[i].text for i in rng.sample(range(4), 3)])
                    for q, group in zip(QUESTIONS, result.populations[t - 1]) for _ in range(4)]
        assert engine.calls[t][0] == expected
        # The draws recorded are the ones the prompts were built from.
        assert [aggregation_prompt(q, [group[i].text for i in draw])
                for q, group, draws in zip(QUESTIONS, result.populations[t - 1], result.draws[t - 1])
                for draw in draws] == expected


def test_one_tail_with_continuation_is_chunked_thinking():
    cfg, engine, result = run_fake(population=4, tails=1, rounds=3, budget=20, tail_tokens=8,
                                   continuation=True)
    calls = iter(engine.calls[1:])
    for t in (1, 2, 3):
        before, after = result.populations[t - 1], result.populations[t]
        open_traces = [(i, j) for i, g in enumerate(before) for j, c in enumerate(g) if not c.finished]
        prompts = next(calls)[0] if open_traces else []  # no engine call when all have finished
        # Each unfinished trace continues from the question (head) + its own last τ tokens.
        assert prompts == [QUESTIONS[i] + before[i][j].text[-8:] for i, j in open_traces]
        for i, group in enumerate(before):
            for j, c in enumerate(group):
                if c.finished:
                    assert after[i][j] is c  # a finished trace is not sampled again
        assert result.rounds[t].prompts == len(open_traces)
        assert result.draws[t - 1] == [[[j] for j in range(4)]] * len(QUESTIONS)
        assert result.rounds[t].longest_prompt_tokens <= max(map(len, QUESTIONS)) + 8


def test_hybrid_passes_the_final_answer_section_of_finished_candidates():
    _, engine, result = run_fake(population=3, tails=3, rounds=1, budget=200, tail_tokens=30, hybrid=True)
    for prompt in engine.calls[1][0]:
        candidates = prompt[:prompt.index(INSTRUCTION)]
        assert "step" not in candidates and candidates.count("\\boxed") == 3


def test_majority_and_pass_at_n_readouts():
    assert majority_index(["3", None, "4", "4", "3", "4"]) == 2
    assert majority_index(["5", "6"]) == 0  # tie: the first answer seen
    assert majority_index([None, None]) is None
    assert readouts(["3", "4", "4", None], [True, False, False, False]) == \
        {"mean": 0.25, "majority": 0.0, "pass_at_n": 1.0}
    assert readouts([None, None], [False, False]) == {"mean": 0.0, "majority": 0.0, "pass_at_n": 0.0}


def test_aggregation_rounds_take_their_own_temperature():
    _, engine, _ = run_fake(population=4, tails=2, rounds=2, budget=40, tail_tokens=10, temperature=0.9)
    assert engine.temperatures == [0.9, 0.9, 0.9]
    _, engine, _ = run_fake(population=4, tails=2, rounds=2, budget=40, tail_tokens=10, temperature=0.9,
                            aggregation_temperature=0.0)
    assert engine.temperatures == [0.9, 0.0, 0.0]
    _, engine, _ = run_fake(population=4, tails=1, rounds=2, budget=20, tail_tokens=8, temperature=0.9,
                            continuation=True, aggregation_temperature=0.0)
    assert set(engine.temperatures) == {0.9}  # continuation chunks go on with the trace's temperature


def test_evaluation_refuses_to_score_without_a_verifier():
    from rewards.math import START_FAILED, Verdict
    from zaya_rl.evaluate import judge
    from zaya_rl.tasks import held_out

    class DeadVerifier:  # what MathVerifier.score returns when its child cannot start
        def score(self, items):
            return [Verdict(False, START_FAILED) for _ in items]

    tasks = held_out("chain_sum", [1], 2)
    groups = [[FakeCompletion([], [], f"\\boxed{{{t.answer}}}", True)] for t in tasks]
    with pytest.raises(RuntimeError, match="failed to start"):
        judge(groups, tasks, DeadVerifier())


def test_judge_scores_gym_items_by_their_generator_and_programs_by_their_tests():
    from rewards.math import MathVerifier
    from zaya_rl.evaluate import judge
    from zaya_rl.recipe import CodeSource, GymSource
    from zaya_rl.tasks import held_out_for

    [words] = held_out_for(GymSource(kind="gym", name="w", generator="word_sorting"), [0], 1)
    [code] = held_out_for(CodeSource(kind="code", name="he", dataset="humaneval"), [0], 1)
    groups = [[FakeCompletion([], [], f"\\boxed{{{words.answer}}}", True),
               FakeCompletion([], [], "\\boxed{zebra}", True)],
              [FakeCompletion([], [], code.solution, True),
               FakeCompletion([], [], "```python\ndef nothing():\n    pass\n```", True)]]
    with MathVerifier() as verifier:
        (answers, correct), (programs, passed) = judge(groups, [words, code], verifier)
    assert correct == [True, False] and answers == [words.answer, "zebra"]
    assert passed == [True, False] and programs[1] == "def nothing():\n    pass"


def test_vote_among_shown_candidates_and_copying():
    assert plurality_correctness(["3", "4", "4", "5"], [False, True, True, False]) == 1.0
    assert plurality_correctness(["3", "4", "3", "4"], [True, False, True, False]) == 0.5  # a tie: a coin
    assert plurality_correctness(["3", None, None, "4"], [False, False, False, True]) == 0.5
    assert plurality_correctness([None, None], [False, False]) == 0.0
    before = [(["1", "2", "2", "9"], [False, True, True, False])]
    after = [(["2", "7", None], [True, False, False])]
    draws = [[[0, 1, 2], [0, 3, 1], [3, 0, 1]]]
    # Votes: "2" wins (right); a three-way tie ("1","9","2": 1/3 right); the same tie again.
    readout = aggregation_readouts(before, after, draws)
    assert readout["candidate_vote_accuracy"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert readout["answer_from_candidates"] == pytest.approx(1 / 3)  # "2" was shown; "7" and None were not


def test_paired_difference_of_per_problem_scores():
    paired = paired_difference([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0])
    # differences 1, 0, -1, 1: mean 0.25, sample variance (0.5625 + 0.0625 + 1.5625 + 0.5625) / 3
    assert paired["difference"] == pytest.approx(0.25)
    assert paired["standard_error"] == pytest.approx((2.75 / 3 / 4) ** 0.5)
    assert (paired["a_higher"], paired["b_higher"]) == (2, 1)
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0], [1.0, 0.0])


@pytest.mark.parametrize("kw", [dict(tails=9), dict(tail_tokens=65), dict(tails=2, continuation=True),
                                dict(rounds=-1),
                                dict(aggregation_temperature=-0.5)])
def test_bad_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        RsaConfig(**{"population": 8, "budget": 64, **kw})


def test_tail_fits_its_budget_even_when_a_cut_splits_a_character(tiny_checkpoint):
    from zaya_rl.models import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)  # byte-level BPE: a cut can fall inside a character
    texts = ["12+3=15\n" + "Λ�é" * 10 + "15-4=11\n\\boxed{11}", "é" * 30, "1+2=3\n"]
    for n in range(1, 40):
        cut = last_tokens(texts, n, tok)
        assert [len(tok.encode(c, add_special_tokens=False)) <= n for c in cut] == [True] * 3
        assert all(text.endswith(c) for text, c in zip(texts, cut))
    assert last_tokens(texts, 1000, tok) == texts
    assert last_tokens([], 4, tok) == []


def test_rsa_on_vllm_keeps_prompts_bounded(tiny_checkpoint):
    from workers.rollout import Rollout
    from zaya_rl.tasks import held_out

    rollout = Rollout("vllm", str(tiny_checkpoint), seed=0, max_model_len=512, torch_threads=2)
    tok = rollout.engine.tokenizer
    tasks = held_out("chain_sum", [1, 2], 4)
    cfg = RsaConfig(population=4, tails=2, rounds=1, budget=32, tail_tokens=12, hybrid=True)
    result = rollout.rsa([t.prompt for t in tasks], cfg)
    assert len(result.populations) == 2 and len(result.rounds) == 2
    assert all(len(pop) == 4 and all(len(g) == 4 for g in pop) for pop in result.populations)
    overhead = template_overhead_tokens(tok, cfg.tails)
    for task, group in zip(tasks, result.final):
        q = len(tok.encode(task.prompt, add_special_tokens=False))
        for c in group:
            assert len(c.prompt_ids) <= q + cfg.tails * cfg.tail_tokens + overhead
            assert len(c.token_ids) <= cfg.budget
    assert result.rounds[1].generated_tokens == sum(len(c.token_ids) for g in result.final for c in g)


def test_rsa_round_metrics_of_groups_laid_out_round_by_round():
    import torch

    from zaya_rl.controller import rsa_round_metrics

    # 2 problems, N = 2, rounds 0..2: rows are round 0's groups, then round 1's, then round 2's.
    correct = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [1, 1], [1, 1]], dtype=torch.float)
    metrics = rsa_round_metrics(correct, keep=[0, 2, 3, 5], problems=2)
    assert metrics == {"rsa_round_rewards": [0.25, 0.75, 1.0], "rsa_round_samples": [2, 4, 2]}


def test_rl_stages_whose_prompts_overflow_the_context_are_refused(tiny_checkpoint):
    from pathlib import Path

    from zaya_rl.controller import check_rl_context
    from zaya_rl.models import load_tokenizer
    from zaya_rl.recipe import RecipeError, load_recipe

    tok = load_tokenizer(tiny_checkpoint)
    mini = Path(__file__).resolve().parents[1] / "e2e" / "mini.yaml"  # rl: group 4, 24 tokens, share 0.25
    check_rl_context(load_recipe(mini), tok, 512)
    # Four tails of at most 24 tokens (the rollouts' length, below τ = 40), the template, the longest
    # chain-sum question and β = 24: the bound is exact, one token less of context is refused.
    tight = load_recipe(mini, ["stages.rl.aggregation_tails=4", "stages.rl.aggregation_tail_tokens=40"])
    questions = [t.prompt for level in range(3) for t in TaskStream("chain_sum", 0).take(level, 16)]
    longest = max(len(tok.encode(q, add_special_tokens=False)) for q in questions)
    needed = longest + 4 * 24 + template_overhead_tokens(tok, 4) + 24
    check_rl_context(tight, tok, needed)
    with pytest.raises(RecipeError, match=rf"stages\.1 \('rl'\): its aggregation prompts plus their budget need up "
                                          rf"to {needed} tokens but the model's context is {needed - 1}: lower "
                                          "aggregation_tails, aggregation_tail_tokens or rollout.max_tokens"):
        check_rl_context(tight, tok, needed - 1)
    # A checkpoint's chat template wraps every prompt the engines get: its tokens count too.
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    with pytest.raises(RecipeError, match=rf"need up to {needed + len(tok.encode('<user></user><assistant>'))} "):
        check_rl_context(tight, tok, needed)
    tok.chat_template = None
    traces = load_recipe(mini, ["stages.rl.aggregation_share=0", "stages.rl.rsa_traces=true",
                                "rollout.rsa={population: 4, tails: 2, rounds: 1}"])
    with pytest.raises(RecipeError, match=r"its RSA traces .* lower rollout\.rsa\.tails"):
        check_rl_context(traces, tok, 40)
    check_rl_context(load_recipe(mini, ["stages.rl.aggregation_share=0"]), tok, 40)  # plain prompts: not checked
