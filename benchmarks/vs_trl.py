"""End to end against TRL: the default recipe's RL stage beside TRL's `GRPOTrainer`, from the
same warmed-up checkpoint, on the same tasks, group size, batch and number of steps, on this
machine, one after the other in one run.

    python -m benchmarks.vs_trl [--quick] [--recipe recipes/tiny.yaml] [--out benchmarks/results]
                                [--warmup runs/tiny/stages/warmup]

On a GPU recipe (`--recipe recipes/gpu.yaml`, on a machine with a GPU) both run on the card:
ours colocated as the recipe places it, TRL in its vLLM colocate mode (`use_vllm=True`,
`vllm_mode="colocate"`, sleep mode on, bf16, the recipe's `gpu_memory_utilization`), its
batch in `trl_micro_batches` micro-batches of one optimizer step.

1. the start: `--warmup`, else the suite's own warmup (`zaya-rl run` of the recipe's SFT stage
   for `warmup_seconds`, kept under --out/runs/vs_trl/warmup and reused by later runs);
2. `zaya-rl run` of the recipe's RL stage from it, for a fixed number of steps at its start
   level (the curriculum held still, so both trainers see the same task distribution; no
   periodic checkpoints, as TRL saves none);
3. TRL's `GRPOTrainer` from the warmup checkpoint, in a process of its own: on the CPU
   transformers generation (TRL's default; its vLLM mode needs a GPU), on a GPU vLLM colocated;
   the same correctness reward (`rewards.math.verify`), G, prompts
   per step, learning rate and warm-up, clip range, temperature and completion length, one
   optimizer step per batch, no KL term; `loss_type="dr_grpo"` is TRL's nearest to the
   recipe's per-sequence token sum;
4. held-out accuracy of the warmup, our RL result and TRL's, on one vLLM engine whose weights
   are swapped (on the card for a GPU recipe), sampled at the recipe's eval temperature and
   greedy.

TRL is timed at the niceness of Ray's workers (benchmarks/report.py), the one our learner and
rollout worker run at. Seconds per step and samples per second count the training loop after
its first step (no start-up, no eval, no first-step set-up; see `rates`); samples are all
generated samples (the recipe's dynamic sampling may draw more than a step keeps).
Writes vs_trl.json (with both reward curves) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.report import machine, match_ray_workers_niceness, text_table, write_json
from benchmarks.warmup_vs_rl import run as run_recipe
from rewards.math import verify
from zaya_rl.controller import accuracy_with_interval
from zaya_rl.recipe import Recipe, RlStage, load_recipe
from zaya_rl.tasks import TaskStream, held_out

SETTINGS = {  # warmup seconds, RL steps, held-out problems, micro-batches of a TRL step
    # A step of either takes 1-2 s on 2 quiet cores; --quick's few steps show the rate, not
    # where accuracy goes.
    "quick": {"warmup_seconds": 120, "rl_steps": 6, "eval_problems": 200, "trl_micro_batches": 1},
    "full": {"warmup_seconds": 270, "rl_steps": 30, "eval_problems": 1000, "trl_micro_batches": 1},
    # recipes/gpu.yaml on an H100: its 400 warmup steps take about 75 s, an RL step about 3.3 s.
    # TRL pads every sequence of a micro-batch to the longest, so a step of 256 x 8 completions
    # goes in 8 micro-batches (our learner packs the batch's real tokens and takes it in one).
    "gpu": {"warmup_seconds": 150, "rl_steps": 20, "eval_problems": 1000, "trl_micro_batches": 8},
}


def stage_recipe(recipe: Recipe, kind: str, model_path: Path | None, eval_problems: int, **stage_fields) -> dict:
    """The recipe reduced to its first stage of `kind` with `stage_fields` set, no evaluation
    or periodic checkpoint of its own, starting from `model_path` when given."""
    out = recipe.model_dump(mode="json")
    out["model"]["path"] = str(model_path) if model_path else None
    out["eval"]["num_problems"] = eval_problems
    out["checkpoint"]["every_steps"] = 10**9
    stage = next(s for s in out["stages"] if s["kind"] == kind)
    # The stage's eval block is the recipe's (the held-out set its training stream excludes).
    out["stages"] = [{**stage, "eval": out["eval"], "eval_at_end": False, **stage_fields}]
    return out


def warmup_checkpoint(recipe: Recipe, seconds: float, eval_problems: int, work: Path) -> tuple[Path, int]:
    """The warmup (SFT) checkpoint both trainers start from, and its steps: an earlier suite
    run's when `work` holds one (the warmup is not what is compared), else a new warmup run
    of `seconds`."""
    run_dir = work / "warmup"
    if not (run_dir / "summary.json").exists():
        path = work / "warmup.yaml"
        path.write_text(yaml.safe_dump(stage_recipe(recipe, "sft", None, eval_problems, max_seconds=seconds),
                                       sort_keys=False))
        run_recipe(path, run_dir)
    [stage] = json.loads((run_dir / "summary.json").read_text())["stages"].values()
    return Path(stage["checkpoint"]), stage["steps"]


def trl_in_subprocess(model_path: Path, recipe_path: Path, out_dir: Path, micro_batches: int) -> dict:
    """`run_trl` in a process of its own (`--trl-job`): on a GPU, TRL's colocated vLLM and its
    torch.distributed group stay out of this process, whose evaluation engine comes after."""
    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / "job.json"
    job.write_text(json.dumps({"model_path": str(model_path), "recipe": str(recipe_path), "out_dir": str(out_dir),
                               "micro_batches": micro_batches}))
    subprocess.run([sys.executable, "-m", "benchmarks.vs_trl", "--trl-job", str(job)], check=True)
    return json.loads((out_dir / "trl.json").read_text())


def run_trl_job(job_path: Path) -> None:
    """The `--trl-job` entry: run_trl as the job file says, its result beside it (trl.json)."""
    job = json.loads(job_path.read_text())
    recipe = load_recipe(Path(job["recipe"]))
    [stage] = recipe.stages
    result = run_trl(Path(job["model_path"]), stage, recipe, Path(job["out_dir"]), job["micro_batches"])
    write_json(Path(job["out_dir"]) / "trl.json", result)


def run_trl(model_path: Path, stage: RlStage, recipe: Recipe, out_dir: Path, micro_batches: int = 1) -> dict:
    """TRL's GRPOTrainer for `stage.steps` steps on the recipe's training stream at the stage's
    start level (held-out prompts excluded, as the controller does); returns timings, the
    reward curve and the path of the trained model. A step's prompts_per_step x G completions
    are generated at once and trained in `micro_batches` micro-batches of one optimizer step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from workers.learner import prepare_policy
    from zaya_rl.models import context_length, load_model, load_tokenizer

    torch.set_num_threads(recipe.resources.torch_threads)
    match_ray_workers_niceness()  # our run's learner and rollout worker ran at Ray's worker niceness
    exclude = frozenset(t.prompt for t in held_out(recipe.tasks.generator, recipe.eval.levels, recipe.eval.num_problems))
    tasks = TaskStream(recipe.tasks.generator, recipe.seed, exclude).take(stage.curriculum.start_level,
                                                                          stage.steps * stage.prompts_per_step)
    data = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in tasks])

    def correctness(prompts, completions, answer, **_) -> list[float]:
        return [float(verify(c, a).correct) for c, a in zip(completions, answer)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    algo = stage.algorithm
    res = recipe.resources
    device = (dict(use_cpu=False, bf16=recipe.deepspeed.bf16, use_vllm=True, vllm_mode="colocate",
                   vllm_gpu_memory_utilization=res.gpu_memory_utilization, vllm_enable_sleep_mode=True,
                   vllm_max_model_length=context_length(model_path))
              if res.on_gpu else dict(use_cpu=True, bf16=False))
    batch = stage.prompts_per_step * stage.rollout.group_size
    if batch % micro_batches:
        raise ValueError(f"a step's {batch} completions do not split into {micro_batches} micro-batches")
    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=stage.steps,
        per_device_train_batch_size=batch // micro_batches, gradient_accumulation_steps=micro_batches,
        steps_per_generation=micro_batches,
        num_generations=stage.rollout.group_size, max_completion_length=stage.rollout.max_tokens,
        temperature=stage.rollout.temperature,
        learning_rate=stage.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=stage.warmup_steps,
        epsilon=algo.clip_low, epsilon_high=algo.clip_high, beta=0.0, loss_type="dr_grpo", scale_rewards="group",
        max_grad_norm=recipe.deepspeed.grad_clip, gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", report_to="none", seed=recipe.seed, shuffle_dataset=False, disable_tqdm=True, **device,
    )
    step_times = StepTimes()
    # The same experts kernel as our learner's (transformers' grouped GEMMs), so that the model
    # code is not what is compared.
    model = prepare_policy(load_model(model_path)).train()
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=data,
                          processing_class=load_tokenizer(model_path), callbacks=[step_times])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out_dir / "final"))
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"train_seconds": seconds, "steps": stage.steps, "rewards": rewards, "checkpoint": str(out_dir / "final"),
            "step_ends": [t - start for t in step_times.ends]}


def rates(train_seconds: float, step_ends: list[float], samples: list[int], rewards: list[float]) -> dict:
    """Seconds per step and samples per second from the end of the first step to the end of the
    last (`step_ends`: seconds since any fixed origin): the first step of either trainer pays
    one-time costs (vLLM's first batches set up its CPU kernels: about 10 s) that a run of
    hundreds of steps does not feel. The whole-loop figures are kept beside them."""
    steady = step_ends[-1] - step_ends[0]
    return {"steps": len(samples), "seconds_per_step": steady / (len(samples) - 1),
            "samples_per_second": sum(samples[1:]) / steady, "samples": sum(samples),
            "train_seconds": train_seconds, "first_step_seconds": train_seconds - steady,
            "all_steps_samples_per_second": sum(samples) / train_seconds, "rewards": rewards}


def evaluate(checkpoints: dict[str, Path], recipe: Recipe, num_problems: int) -> dict[str, dict]:
    """Held-out accuracy of each checkpoint on one vLLM engine (weights swapped in; on the card
    in the learner's dtype for a GPU recipe), sampled at the recipe's eval temperature and
    greedy, seeded as the controller's eval is."""
    from workers.rollout import GpuOptions, Rollout
    from zaya_rl.models import context_length, load_model

    res = recipe.resources
    tasks = held_out(recipe.tasks.generator, recipe.eval.levels, num_problems)
    first = next(iter(checkpoints.values()))
    rollout = Rollout("vllm", str(first), seed=recipe.seed, max_model_len=context_length(first),
                      torch_threads=res.torch_threads, dtype=recipe.engine_dtype,
                      gpu=GpuOptions(memory_utilization=res.gpu_memory_utilization) if res.on_gpu else None)
    results = {}
    for version, (name, path) in enumerate(checkpoints.items(), start=1):
        rollout.load_weights(load_model(path).state_dict(), version)
        results[name] = {}
        for mode, temperature in (("sampled", recipe.eval.temperature), ("greedy", 0.0)):
            groups = rollout.generate([t.prompt for t in tasks], 1, temperature, recipe.eval.max_tokens, seed=recipe.seed)
            results[name][mode] = accuracy_with_interval([verify(g[0].text, t.answer).correct
                                                          for g, t in zip(groups, tasks)])
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/tiny.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--warmup", type=Path, help="an HF checkpoint to start both from (e.g. a default job's "
                        "runs/tiny/stages/warmup) instead of the suite's own warmup run")
    parser.add_argument("--trl-job", type=Path, help=argparse.SUPPRESS)  # run_trl in its own process
    args = parser.parse_args(argv)
    if args.trl_job:
        return run_trl_job(args.trl_job)
    recipe = load_recipe(args.recipe)
    settings = SETTINGS["gpu" if recipe.resources.on_gpu else "quick" if args.quick else "full"]
    work = args.out / "runs" / "vs_trl"
    work.mkdir(parents=True, exist_ok=True)
    if args.warmup is not None:
        warmup_ckpt, warmup_steps = args.warmup, None
    else:
        warmup_ckpt, warmup_steps = warmup_checkpoint(recipe, settings["warmup_seconds"], settings["eval_problems"], work)
    bench_path = work / "rl.yaml"
    bench_path.write_text(yaml.safe_dump(stage_recipe(
        recipe, "rl", warmup_ckpt, settings["eval_problems"], steps=settings["rl_steps"], max_seconds=None,
        curriculum={**next(s for s in recipe.stages if isinstance(s, RlStage)).curriculum.model_dump(mode="json"),
                    "adaptive": False}), sort_keys=False))
    bench = load_recipe(bench_path)
    [rl] = bench.stages

    ours_dir = work / "zaya_rl"
    ours = run_recipe(bench_path, ours_dir)["stages"][rl.name]
    metrics = [json.loads(line) for line in (ours_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["stage"] == rl.name and "reward" in m]
    # Dynamic sampling may draw more groups than a step keeps: count every generated sample.
    ours_samples = [m["sampled_groups"] * rl.rollout.group_size for m in steps]
    # Each metrics record is written as its step ends.
    ours_ends = [m["time"] - steps[0]["time"] for m in steps]

    trl = trl_in_subprocess(warmup_ckpt, bench_path, work / "trl", settings["trl_micro_batches"])
    accuracy = evaluate({"warmup": warmup_ckpt, "zaya_rl": Path(ours["checkpoint"]), "trl": Path(trl["checkpoint"])},
                        bench, settings["eval_problems"])

    trl_samples = [rl.prompts_per_step * rl.rollout.group_size] * trl["steps"]
    rows = {"zaya_rl": rates(ours["train_seconds"], ours_ends, ours_samples, [m["reward"] for m in steps]),
            "trl": rates(trl["train_seconds"], trl["step_ends"], trl_samples, trl["rewards"])}
    for name, row in rows.items():
        row["eval"] = accuracy[name]
    result = {"machine": machine(), "settings": settings, "recipe": str(args.recipe),
              "group_size": rl.rollout.group_size, "prompts_per_step": rl.prompts_per_step,
              "warmup_checkpoint": str(warmup_ckpt), "warmup_steps": warmup_steps,
              "warmup_eval": accuracy["warmup"], "ours_phase_seconds": ours["phase_seconds"],
              "rows": rows, "speedup": rows["zaya_rl"]["samples_per_second"] / rows["trl"]["samples_per_second"]}
    write_json(args.out / "vs_trl.json", result)
    print(text_table(
        f"\nRL stage vs TRL GRPOTrainer: {rl.steps} steps of {rl.prompts_per_step}x{rl.rollout.group_size} samples "
        f"from one warmup checkpoint; held-out accuracy on {settings['eval_problems']} problems "
        f"(warmup: {accuracy['warmup']['sampled']['accuracy']:.3f} sampled, {accuracy['warmup']['greedy']['accuracy']:.3f} greedy)",
        ["trainer", "s/step", "samples/s", "sampled acc", "greedy acc"],
        [[name, r["seconds_per_step"], r["samples_per_second"], r["eval"]["sampled"]["accuracy"],
          r["eval"]["greedy"]["accuracy"]] for name, r in rows.items()]))
    print(f"samples/s zaya-rl / TRL (target >= 2): {result['speedup']:.2f}")
    return result


if __name__ == "__main__":
    main()
