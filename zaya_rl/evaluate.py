"""Test-time compute evaluation: Markovian RSA against single samples and majority vote.

Owns `evaluate` (over a `generate` callable) and `run_eval` (starts rollout workers on a
checkpoint in Ray and spreads every round's prompts over their engines). On one set of tasks
it reports:

- single-sample accuracy: mean correctness of the N round-0 samples (the same draws RSA
  starts from, so the comparison is paired);
- majority vote over those N samples, and pass@N;
- RSA: mean correctness of the final population (the paper's "pass@1") and its majority;
- a matched-token baseline: majority vote over k fresh samples, k chosen so that they cost
  about as many generated tokens as RSA spent, and RSA's paired difference from it (per
  problem, so its standard error is that of the difference, not of either accuracy);
- generated tokens per problem for each, and per round the longest prompt and its time;
- per aggregation round, the accuracy a vote among the candidates each member was shown would
  have had, and how often a member's answer was one of theirs: an aggregator worth its tokens
  beats that vote, one that ignores its candidates copies at about the population's rate.

All of it over all tasks and per source (`Task.source`), so a recipe's held-out sets
(zaya_rl.tasks.held_out_tasks) are read source by source. Answers are scored by
`MathVerifier` (a killable child process; a reasoning-gym item by its generator's scorer,
counted correct at full credit), programs by running their tests in the sandbox: model output
is untrusted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rewards.code import extract_code, verify_code
from rewards.math import START_FAILED, MathVerifier, extract_answer
from zaya_rl.deadlines import Deadlines, wait
from zaya_rl.recipe import TimeoutsConfig
from zaya_rl.rsa import RsaConfig, TokenizerLike, plurality_correctness, readouts, run_rsa, tokens_needed
from zaya_rl.tasks import Task


def judge(groups, tasks: list[Task], verifier: MathVerifier) -> list[tuple[list[str | None], list[bool]]]:
    """Each task's group of completions as (answers, correctness). A code task's answer is its
    program, correct when its tests pass in the sandbox; any other's is its extracted final
    answer, checked by `verifier`. Raises when the verifier could not start: an evaluation
    scored as all wrong would be worse than none."""
    items = [(c.text, task.gym or task.answer) for task, group in zip(tasks, groups) if task.tests is None
             for c in group]
    verdicts = verifier.score(items) if items else []
    if any(v.reason == START_FAILED for v in verdicts):
        raise RuntimeError("the math verifier's child process failed to start, so answers cannot be scored "
                           "(a script that evaluates needs an `if __name__ == \"__main__\":` guard: the "
                           "verifier's forkserver imports the main module)")
    verdicts = iter(verdicts)
    judged = []
    for task, group in zip(tasks, groups):
        if task.tests is not None:
            judged.append(([extract_code(c.text).strip() or None for c in group],
                           [verify_code(c.text, task.tests).passed for c in group]))
        else:
            judged.append(([extract_answer(c.text) for c in group], [next(verdicts).correct for _ in group]))
    return judged


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def aggregation_readouts(before: list[tuple[list, list[bool]]], after: list[tuple[list, list[bool]]],
                         draws: list[list[list[int]]]) -> dict[str, float]:
    """What one aggregation round did with the candidates each member was shown: the
    correctness a vote among them would have had (the bar an aggregator should clear), and how
    often the member's answer was one of theirs (copying rather than solving anew)."""
    vote, copied, members = 0.0, 0, 0
    for (answers, correct), (new_answers, _), drawn in zip(before, after, draws):
        for member, idx in enumerate(drawn):
            vote += plurality_correctness([answers[i] for i in idx], [correct[i] for i in idx])
            copied += new_answers[member] is not None and new_answers[member] in {answers[i] for i in idx}
            members += 1
    return {"candidate_vote_accuracy": vote / members, "answer_from_candidates": copied / members}


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-problem scores a - b on the same problems: the mean difference, its standard error,
    and on how many problems each side scored higher."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need two equal, non-empty lists, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {"difference": mean, "standard_error": (variance / n) ** 0.5,
            "a_higher": sum(d > 0 for d in diffs), "b_higher": sum(d < 0 for d in diffs)}


def evaluate(generate: Callable[[list[str], int, float, int], list[list]], tokenizer: TokenizerLike,
             tasks: list[Task], cfg: RsaConfig, verifier: MathVerifier) -> dict:
    """RSA, sampling and majority-vote read-outs on `tasks` of the model that
    `generate(prompts, n, temperature, max_tokens)` samples (`n` completions of each prompt)."""
    num = len(tasks)
    questions = [t.prompt for t in tasks]
    start = time.perf_counter()
    result = run_rsa(lambda prompts, n, temperature: generate(prompts, n, temperature, cfg.budget), tokenizer,
                     questions, cfg)
    judged = [judge(pop, tasks, verifier) for pop in result.populations]
    per_round = [[readouts(*group) for group in pop] for pop in judged]
    first, final = per_round[0], per_round[-1]
    first_tokens = result.rounds[0].generated_tokens
    rsa_tokens = sum(r.generated_tokens for r in result.rounds)

    # Matched tokens: as many fresh samples as RSA's tokens buy at round 0's mean length.
    tokens_per_sample = max(first_tokens / (num * cfg.population), 1.0)
    k = max(1, round(rsa_tokens / num / tokens_per_sample))
    matched = generate(questions, k, cfg.temperature, cfg.budget)
    matched_tokens = sum(len(c.token_ids) for group in matched for c in group)
    matched_scores = [readouts(*group) for group in judge(matched, tasks, verifier)]

    by_source: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_source.setdefault(task.source, []).append(i)
    return {
        "num_problems": num,
        "rsa": asdict(cfg),
        "single_sample": {"accuracy": _mean(first, "mean"),
                          "tokens_per_problem": first_tokens / num / cfg.population},
        "majority_vote": {"accuracy": _mean(first, "majority"), "samples": cfg.population,
                          "tokens_per_problem": first_tokens / num},
        "rsa_mean": {"accuracy": _mean(final, "mean"), "tokens_per_problem": rsa_tokens / num},
        "rsa_majority": {"accuracy": _mean(final, "majority"), "tokens_per_problem": rsa_tokens / num},
        "matched_majority": {"accuracy": _mean(matched_scores, "majority"), "samples": k,
                             "tokens_per_problem": matched_tokens / num},
        "rsa_minus_matched": paired_difference([r["mean"] for r in final], [r["majority"] for r in matched_scores]),
        "pass_at_n": {"round_0": _mean(first, "pass_at_n"), "final": _mean(final, "pass_at_n")},
        "rounds": [{"round": t, **asdict(stats), "mean_accuracy": _mean(scores, "mean"),
                    **(aggregation_readouts(judged[t - 1], judged[t], result.draws[t - 1]) if t else {})}
                   for t, (stats, scores) in enumerate(zip(result.rounds, per_round))],
        "by_source": {name: source_accuracies([first[i] for i in idx], [final[i] for i in idx],
                                              [matched_scores[i] for i in idx]) for name, idx in by_source.items()},
        "seconds": time.perf_counter() - start,
    }


def source_accuracies(first: list[dict], final: list[dict], matched: list[dict]) -> dict[str, float]:
    """One source's problems: the read-outs of round 0, of the final population and of the
    matched-token majority vote (each problem's `readouts`)."""
    return {"num_problems": len(first), "single_sample": _mean(first, "mean"),
            "majority_vote": _mean(first, "majority"), "rsa_mean": _mean(final, "mean"),
            "rsa_majority": _mean(final, "majority"), "matched_majority": _mean(matched, "majority"),
            "pass_at_n": _mean(first, "pass_at_n")}


def check_context(checkpoint: Path, tasks: list[Task], cfg: RsaConfig) -> int:
    """The model's context length; ValueError when RSA's longest prompt plus budget exceeds it
    (better now than from vLLM in the middle of a run)."""
    from zaya_rl.models import context_length, load_tokenizer

    max_model_len = context_length(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    needed = tokens_needed(tokenizer, [t.prompt for t in tasks], cfg)
    if needed > max_model_len:
        raise ValueError(f"RSA prompts plus budget need up to {needed} tokens but the model's context "
                         f"is {max_model_len}: lower --tails, --tail-tokens or --budget")
    return max_model_len


def run_eval(checkpoint: Path, tasks: list[Task], cfg: RsaConfig, max_model_len: int, engines: int = 1,
             seed: int = 0, torch_threads: int = 2, timeouts: TimeoutsConfig | None = None) -> dict:
    """Start `engines` rollout workers (vLLM, seeded seed + i) on `checkpoint` in the Ray
    instance of RAY_ADDRESS, or a local one, and run `evaluate` over them: each call's prompts
    are spread over every engine; RSA's rounds, and the answers' scoring, run here. A worker
    that does not answer within its deadline (`timeouts`, a recipe's or the defaults) ends the
    evaluation with `deadlines.Hung`, which names the call, instead of a wait without end."""
    import ray

    from workers.rollout import send_generate, start_worker
    from zaya_rl.controller import init_ray
    from zaya_rl.models import load_tokenizer

    init_ray()
    deadlines = Deadlines(timeouts or TimeoutsConfig())
    workers = [start_worker(i, "vllm", str(checkpoint), seed, max_model_len, torch_threads) for i in range(engines)]

    def generate(prompts: list[str], n: int, temperature: float, max_tokens: int) -> list[list]:
        refs = send_generate(workers, prompts, n, temperature, max_tokens)
        chunks = wait(refs, deadlines.generate(len(prompts) * n, max_tokens), "RolloutWorker.generate",
                      workers[:len(refs)])
        return [group for chunk in chunks for group in chunk]

    try:  # the workers go when eval ends, a hung one too
        wait([w.version.remote() for w in workers], deadlines.start, "RolloutWorker.version", workers)
        print("zaya-rl eval: every call spread over " + ", ".join(f"rollout-{i}" for i in range(engines)))
        with MathVerifier() as verifier:
            report = evaluate(generate, load_tokenizer(checkpoint), tasks, cfg, verifier)
    finally:
        for worker in workers:
            ray.kill(worker)
    return {"checkpoint": str(checkpoint), "seed": seed, **report}


def format_report(report: dict) -> str:
    """The report as a small text table."""
    cfg = report["rsa"]
    lines = [
        f"{report['checkpoint']}: {report['num_problems']} problems; RSA N={cfg['population']} C={cfg['tails']} "
        f"T={cfg['rounds']} budget={cfg['budget']} tail={cfg['tail_tokens']} temperature={cfg['temperature']}"
        + ("" if cfg.get("aggregation_temperature") is None else
           f" (aggregation rounds {cfg['aggregation_temperature']})"),
        f"{'method':38} {'accuracy':>9} {'gen tokens/problem':>19}",
    ]
    rows = [
        ("single sample", report["single_sample"]),
        (f"majority vote @{cfg['population']}", report["majority_vote"]),
        ("RSA (mean of final population)", report["rsa_mean"]),
        ("RSA (majority of final population)", report["rsa_majority"]),
        (f"majority vote @{report['matched_majority']['samples']} (matched tokens)", report["matched_majority"]),
    ]
    lines += [f"{name:38} {r['accuracy']:9.3f} {r['tokens_per_problem']:19.1f}" for name, r in rows]
    paired = report["rsa_minus_matched"]
    lines.append(f"RSA (mean) minus matched majority: {paired['difference']:+.3f} +- {paired['standard_error']:.3f} "
                 f"(paired standard error); RSA higher on {paired['a_higher']} problems, lower on {paired['b_higher']}")
    lines.append(f"pass@{cfg['population']}: round 0 {report['pass_at_n']['round_0']:.3f}, "
                 f"final {report['pass_at_n']['final']:.3f}")
    lines.append(f"{'round':>5} {'prompts':>8} {'longest prompt':>15} {'gen tokens':>11} {'seconds':>8} "
                 f"{'mean acc':>9} {'vote of shown':>13} {'copied':>7}")
    lines += [f"{r['round']:5d} {r['prompts']:8d} {r['longest_prompt_tokens']:15d} {r['generated_tokens']:11d} "
              f"{r['seconds']:8.1f} {r['mean_accuracy']:9.3f} {_share(r, 'candidate_vote_accuracy'):>13} "
              f"{_share(r, 'answer_from_candidates'):>7}" for r in report["rounds"]]
    lines.append("vote of shown: accuracy of a vote among the candidates each member was shown; "
                 "copied: share of members whose answer is one of theirs")
    pass_at_n = f"pass@{cfg['population']}"
    lines.append(f"{'source':20} {'problems':>8} {'single':>7} {'majority':>9} {'RSA mean':>9} "
                 f"{'RSA majority':>13} {'matched':>8} {pass_at_n:>8}")
    lines += [f"{name[:20]:20} {r['num_problems']:8d} {r['single_sample']:7.3f} {r['majority_vote']:9.3f} "
              f"{r['rsa_mean']:9.3f} {r['rsa_majority']:13.3f} {r['matched_majority']:8.3f} {r['pass_at_n']:8.3f}"
              for name, r in report["by_source"].items()]
    return "\n".join(lines)


def _share(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"
