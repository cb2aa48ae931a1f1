import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zaya_rl.recipe import CHAIN_SUM_LEVELS, Recipe, RecipeError, RlStage, SftStage, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_recipes_validate():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.stages


def test_tiny_recipe_has_warmup_then_rl():
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    assert [type(s) for s in recipe.stages] == [SftStage, RlStage]
    assert recipe.eval.num_problems >= 1000


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_field_names_field_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  - name: a\n    kind: sft\n    steps: 3\n    lr: 0.1\n    bogus: 1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:7: stages.0.sft.bogus" in str(err.value)


def test_wrong_type_names_field_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  - name: a\n    kind: rl\n    steps: many\n    lr: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:5: stages.0.rl.steps" in str(err.value)


def test_missing_model_path_is_named(tmp_path):
    path = _write(tmp_path, "name: x\nmodel:\n  path: /no/such/ckpt\nstages:\n  - {name: a, kind: sft, steps: 1, lr: 0.1}\n")
    with pytest.raises(RecipeError, match="/no/such/ckpt"):
        load_recipe(path)


def test_level_above_max_rejected(tmp_path):
    path = _write(tmp_path, "name: x\ntasks: {max_level: 1}\nstages:\n  - {name: a, kind: sft, steps: 1, lr: 0.1, levels: [2]}\n")
    with pytest.raises(RecipeError, match="max_level"):
        load_recipe(path)


def test_cli_exit_code_2_and_nothing_started(tmp_path):
    path = _write(tmp_path, "name: x\nrun_dir: " + str(tmp_path / "run") + "\nstages:\n  - {name: a, kind: sft, steps: x, lr: 0.1}\n")
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "stages.0.sft.steps" in proc.stderr
    assert not (tmp_path / "run").exists()
    missing = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_old_task_fields_are_the_one_source_case():
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    [source] = recipe.data.sources
    assert (source.kind, source.name, source.generator) == ("gym", "chain_sum", "chain_sum")
    assert source.level_settings() == list(CHAIN_SUM_LEVELS[:recipe.tasks.max_level + 1])
    assert all(recipe.data_for(stage) == recipe.data for stage in recipe.stages)
    # The resolved recipe (`zaya-rl show`, recipe.resolved.yaml) loads back to the same recipe.
    assert Recipe.model_validate(yaml.safe_load(dump_recipe(recipe))) == recipe


MIXTURE = """name: x
data:
  sources:
    - {kind: gym, name: sums, generator: chain_sum, weight: 2}
    - {kind: file, name: mine, path: "${ZR_TEST_UNSET}/m.jsonl", fields: {solution: worked}}
stages:
  - {name: a, kind: sft, steps: 1, lr: 0.1, levels: [4]}
  - name: b
    kind: rl
    steps: 1
    lr: 0.1
    curriculum: {start_level: probe, adaptive: false}
    data:
      filter: {samples: 4, max_pass_rate: 0.75}
      sources:
        - {kind: code, name: he, dataset: humaneval}
        - {kind: gym, name: sums, generator: chain_sum, weight: 2}
"""


def test_mixture_stage_override_and_placeholder_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("ZR_TEST_UNSET", raising=False)
    recipe = load_recipe(_write(tmp_path, MIXTURE))
    sft, rl = recipe.stages
    assert [s.name for s in recipe.data_for(sft).sources] == ["sums", "mine"]
    assert [s.name for s in recipe.data_for(rl).sources] == ["he", "sums"]
    assert recipe.data_for(rl).filter.max_pass_rate == 0.75 and rl.curriculum.start_level == "probe"
    assert recipe.unresolved_paths() == ["${ZR_TEST_UNSET}/m.jsonl"]
    monkeypatch.setenv("ZR_TEST_UNSET", "/data")
    assert load_recipe(_write(tmp_path, MIXTURE)).data.sources[1].path == "/data/m.jsonl"


@pytest.mark.parametrize("old, new, where, message", [
    ("weight: 2}\n    - {kind: file", "weight: -2}\n    - {kind: file", ":4: data.sources.0.gym.weight",
     "greater than 0"),
    ("generator: chain_sum, weight: 2}\n    - {kind: file", "generator: no_such_gen}\n    - {kind: file",
     ":4: data.sources.0.gym", "unknown reasoning-gym generator 'no_such_gen'"),
    ("m.jsonl", "m.csv", ":5: data.sources.1.file.path", "should match pattern"),
    ("fields: {solution: worked}", "fields: {solution: worked, answr: a}", ":5: data.sources.1.file.fields.answr",
     "Extra inputs"),
    ("dataset: humaneval", "dataset: humaneval, path: x.jsonl", ":16: stages.1.rl.data.sources.0.code",
     "exactly one of dataset and path"),
    ("levels: [4]", "levels: [5]", ":7: stages.0.levels", "above source 'sums'"),
    ("steps: 1, lr: 0.1, levels", "steps: 1, epochs: 2, lr: 0.1, levels", ":7: stages.0.sft",
     "give either steps or epochs"),
    ("    steps: 1\n    lr: 0.1\n    curriculum", "    epochs: 1\n    lr: 0.1\n    curriculum", ":10: stages.1.epochs",
     "gym sources generate without end"),
    ("fields: {solution: worked}", "fields: {}", ":7: stages.0", "source 'mine' has no worked solutions"),
    ("adaptive: false", "adaptive: true", ":12: stages.1.curriculum.adaptive", "set curriculum.adaptive to false"),
    ("data:\n  sources:", "data:\n  filter: {samples: 2}\n  sources:", ":3: data.filter", "data.filter is for rl stages"),
    ("        - {kind: gym, name: sums, generator: chain_sum, weight: 2}",
     "        - {kind: gym, name: sums, generator: chain_sum, levels: [{}]}", ":17: stages.1.data.sources.1", "source 'sums' is defined twice, differently"),
])
def test_malformed_data_names_field_and_line(tmp_path, old, new, where, message):
    _assert_refused(tmp_path, MIXTURE, old, new, where, message)


def _assert_refused(tmp_path, recipe: str, old: str, new: str, where: str, message: str) -> None:
    """`recipe` with `old` (once in it) replaced by `new` is refused at `where` (':LINE: FIELD') with `message`."""
    assert recipe.count(old) == 1
    path = _write(tmp_path, recipe.replace(old, new))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}{where}" in str(err.value) and message in str(err.value), str(err.value)


def test_cli_refuses_to_run_with_placeholder_paths(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ZR_TEST_UNSET"}
    path = _write(tmp_path, MIXTURE.replace("name: x\n", f"name: x\nrun_dir: {tmp_path / 'run'}\n"))
    proc = subprocess.run([sys.executable, "-m", "zaya_rl.cli", "run", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "${ZR_TEST_UNSET}/m.jsonl" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_gym_sources_generate_every_level():
    """Every level a shipped recipe defines is a valid setting of its generator: it makes
    problems at that level, and each problem's gold answer, boxed, earns full reward from the
    scorer a run uses (the math verifier for chain_sum, the generator's own for the others)."""
    from rewards.gym import verify_gym
    from rewards.math import verify
    from zaya_rl.tasks import build_source

    checked = set()
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        recipe = load_recipe(path)
        for cfg in recipe.sources():
            if cfg.kind != "gym":
                continue
            source = build_source(cfg, seed=0)
            assert source.num_levels == len(cfg.level_settings())
            for level in range(source.num_levels):
                tasks = source.take(level, 3)
                assert [(t.level, t.source) for t in tasks] == [(level, cfg.name)] * 3
                for task in tasks:
                    boxed = f"\\boxed{{{task.answer}}}"
                    verdict = verify_gym(boxed, task.gym) if task.gym else verify(boxed, task.answer)
                    assert verdict.reward == 1.0, (path.name, cfg.name, level, task.answer, verdict)
            checked.add(cfg.name)
    assert {"chain_sum", "maze", "gsm_symbolic", "products"} <= checked


BLOCKS = """name: x
eval: {num_problems: 50, levels: [1], max_tokens: 32}
rollout: {group_size: 4, max_tokens: 32, rsa: {tails: 2}}
algorithm: {advantage: rloo, kl_coef: 0.01, clip_high: 0.3}
curriculum: {start_level: 0, window: 8}
stages:
  - {name: a, kind: sft, steps: 1, lr: 0.1, eval: {num_problems: 10}}
  - name: b
    kind: rl
    steps: 1
    lr: 0.1
    rollout: {temperature: 0.5, rsa: {population: 4}}
    algorithm: {kl_coef: 0.0}
  - {name: c, kind: rl, steps: 1, lr: 0.1}
"""


def test_stage_blocks_are_the_recipes_with_the_stages_fields_over_them(tmp_path):
    recipe = load_recipe(_write(tmp_path, BLOCKS))
    a, b, c = recipe.stages
    assert (b.algorithm.advantage, b.algorithm.kl_coef, b.algorithm.clip_high) == ("rloo", 0.0, 0.3)
    assert (b.rollout.group_size, b.rollout.max_tokens, b.rollout.temperature) == (4, 32, 0.5)
    assert (b.rollout.rsa.population, b.rollout.rsa.tails) == (4, 2)  # merged one level further down
    assert (c.rollout, c.algorithm, c.curriculum) == (recipe.rollout, recipe.algorithm, recipe.curriculum)
    assert b.curriculum.window == 8 and recipe.rollout.rsa.population == 8
    assert (a.eval.num_problems, a.eval.levels, a.eval.max_tokens) == (10, [1], 32)
    assert b.eval == c.eval == recipe.eval
    # `zaya-rl show` writes each stage's complete blocks, and they load back to the same recipe.
    shown = yaml.safe_load(dump_recipe(recipe))
    assert shown["stages"][1]["algorithm"]["clip_high"] == 0.3 and shown["stages"][2]["rollout"]["group_size"] == 4
    assert Recipe.model_validate(shown) == recipe


def test_a_merged_stage_block_is_validated_where_the_stage_sets_it(tmp_path):
    path = _write(tmp_path, BLOCKS.replace("rsa: {population: 4}", "rsa: {population: 1}"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:12: stages.1.rl.rollout.rsa: " in str(err.value), str(err.value)
    assert "tails (2) must be <= population (1)" in str(err.value)


@pytest.mark.parametrize("block", ["model: {path: null}", "resources: {num_verifiers: 1}", "deepspeed: {zero_stage: 0}",
                                   "checkpoint: {every_steps: 5}", "timeouts: {min_seconds: 5}",
                                   "metrics: {wandb_mode: online}"])
def test_a_stage_cannot_set_a_job_wide_block(tmp_path, block):
    stage_line = "    algorithm: {kl_coef: 0.0}\n"
    path = _write(tmp_path, BLOCKS.replace(stage_line, f"{stage_line}    {block}\n"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    field = block.split(":")[0]
    assert f"{path}:14: stages.1.{field}: " in str(err.value), str(err.value)
    assert f"stage 'b': {field} is job-wide" in str(err.value)


def test_eval_cli_takes_rsa_settings_from_the_recipe_unless_flags_say_otherwise(tmp_path):
    import argparse

    from zaya_rl.cli import add_eval_parser, rsa_config
    from zaya_rl.rsa import RsaConfig

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    recipe = load_recipe(_write(tmp_path, "name: x\nseed: 5\neval: {temperature: 0.7}\nrollout: {max_tokens: 48, "
                                "rsa: {population: 6, tails: 3, rounds: 1, hybrid: true, aggregation_temperature: 0.2}}\n"
                                "stages:\n  - {name: a, kind: sft, steps: 1, lr: 0.1}\n"))
    assert rsa_config(parser.parse_args(["eval"]), recipe) == RsaConfig(
        population=6, tails=3, rounds=1, budget=48, tail_tokens=24, temperature=0.7, seed=5, hybrid=True,
        aggregation_temperature=0.2)
    flags = ["eval", "--tails", "2", "--budget", "20", "--no-hybrid", "--temperature", "0", "--seed", "1",
             "--aggregation-temperature", "0.5"]
    assert rsa_config(parser.parse_args(flags), recipe) == RsaConfig(
        population=6, tails=2, rounds=1, budget=20, tail_tokens=10, temperature=0.0, seed=1, hybrid=False,
        aggregation_temperature=0.5)
    assert rsa_config(parser.parse_args(["eval", "--tail-tokens", "8"]), None) == RsaConfig(tail_tokens=8)


def test_lr_schedule_warms_up_then_decays_by_the_stages_progress():
    from zaya_rl.controller import lr_at

    constant = SftStage(kind="sft", name="s", steps=100, lr=1.0, warmup_steps=10)
    assert [lr_at(constant, s, s / 100) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(constant, 99, 0.99) == 1.0
    cosine = constant.model_copy(update={"lr_schedule": "cosine", "min_lr_ratio": 0.2})
    assert lr_at(cosine, 4, 0.04) == 0.5  # still warming up
    assert lr_at(cosine, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(cosine, 50, 0.5) == pytest.approx(0.6)
    assert lr_at(cosine, 100, 1.0) == pytest.approx(0.2)
    assert lr_at(cosine, 100, 1.7) == pytest.approx(0.2)  # a step past max_seconds stays at the floor


def test_stage_progress_follows_the_budget_that_binds():
    from zaya_rl.controller import stage_progress

    # The default warmup: 270 s with steps: 100000 ends by the clock, not at 1% of its steps.
    assert stage_progress(470, 100000, 135.0, 270.0) == pytest.approx(0.5)
    assert stage_progress(50, 100, 10.0, 270.0) == pytest.approx(0.5)  # steps bind
    assert stage_progress(25, 100, 1e6, None) == 0.25


def test_held_out_splits_of_file_and_code_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("ZR_TEST_UNSET", raising=False)
    base = "name: x\nstages:\n  - {name: a, kind: rl, steps: 1, lr: 0.1}\ndata:\n  sources:\n"
    recipe = load_recipe(_write(tmp_path, base + (
        "    - {kind: file, name: m, path: \"${ZR_TEST_UNSET}/m.jsonl\", held_out: \"${ZR_TEST_UNSET}/t.parquet\"}\n"
        "    - {kind: code, name: c, path: c.jsonl, held_out: humaneval}\n"
        "    - {kind: code, name: he, dataset: humaneval}\n")))
    assert [s.held_out for s in recipe.sources()] == ["${ZR_TEST_UNSET}/t.parquet", "humaneval", None]
    assert recipe.unresolved_paths() == ["${ZR_TEST_UNSET}/m.jsonl", "${ZR_TEST_UNSET}/t.parquet"]
    for bad in ("{kind: file, name: m, path: m.jsonl, held_out: m.csv}",
                "{kind: code, name: c, path: c.jsonl, held_out: mbpp}"):
        with pytest.raises(RecipeError, match="held_out"):
            load_recipe(_write(tmp_path, base + f"    - {bad}\n"))


def test_overrides_give_the_same_recipe_as_a_file_with_those_values(tmp_path):
    overrides = ["name=other", "stages.aggregate_rl.lr=3e-5", "stages.1.batch_size=32",
                 "rollout.rsa={population: 4, tails: 2}", "stages.aggregate_rl.rollout.max_tokens=48",
                 "eval.levels=[0, 1]", "checkpoint.keep_last=5"]
    data = yaml.safe_load((ROOT / "recipes/tiny_rsa.yaml").read_text())
    data["name"] = "other"
    data["stages"][2]["lr"] = 3e-5
    data["stages"][1]["batch_size"] = 32
    data["rollout"]["rsa"] = {"population": 4, "tails": 2}
    data["stages"][2]["rollout"] = {"max_tokens": 48}
    data["eval"]["levels"] = [0, 1]
    data["checkpoint"] = {"keep_last": 5}
    edited = _write(tmp_path, yaml.safe_dump(data))
    recipe = load_recipe(ROOT / "recipes/tiny_rsa.yaml", overrides)
    assert recipe == load_recipe(edited)
    assert recipe != load_recipe(ROOT / "recipes/tiny_rsa.yaml")
    assert recipe.stages[2].lr == 3e-5 and recipe.stages[2].rollout.rsa.population == 4


@pytest.mark.parametrize("item, message", [
    ("stages.aggregate_rl.lr", "expected KEY=VALUE"),
    ("stages..lr=1", "expected KEY=VALUE"),
    ("stages.rl.lr=1", "stages has no element 'rl'"),
    ("stages.7.lr=1", "stages has no element '7'"),
    ("seed.x=1", "seed is a value, not a block"),
    ("rollout.rsa={population: [", "the value is not valid YAML"),
    ("stages.aggregate_rl.lrr=3", "stages.2.rl.lrr: Extra inputs are not permitted"),
    ("stages.aggregate_rl.lr=abc", "stages.2.rl.lr: Input should be a valid number"),
    ("rollout.rsa.population=0", "rollout.rsa.population: Input should be greater than or equal to 1"),
    ("stages.aggregate_rl.rollout.rsa.tails=9", "tails (9) must be <= population (8)"),
])
def test_a_bad_override_is_named(item, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/tiny_rsa.yaml", [item])
    assert str(err.value).startswith(f"--set {item}: "), str(err.value)
    assert message in str(err.value)
    assert "tiny_rsa.yaml" not in str(err.value)  # the file is fine: only the override is reported


def test_cli_set_on_show_validate_and_eval(tmp_path):
    cli = [sys.executable, "-m", "zaya_rl.cli"]
    shown = subprocess.run(cli + ["show", str(ROOT / "recipes/tiny.yaml"), "--set", "stages.rl.lr=3e-5",
                                  "--set", "rollout.group_size=4"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    recipe = yaml.safe_load(shown.stdout)
    assert recipe["stages"][1]["lr"] == 3e-5 and recipe["stages"][1]["rollout"]["group_size"] == 4
    bad = subprocess.run(cli + ["validate", str(ROOT / "recipes/tiny.yaml"), "--set", "stages.rl.steps=many"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--set stages.rl.steps=many: stages.1.rl.steps" in bad.stderr
    no_recipe = subprocess.run(cli + ["eval", "--checkpoint", str(tmp_path), "--set", "seed=1"],
                               capture_output=True, text=True)
    assert no_recipe.returncode == 2 and "give --recipe" in no_recipe.stderr


TOOLS = """name: x
rollout:
  environment: {kind: python_tool, max_turns: 3}
stages:
  - {name: warmup, kind: sft, steps: 2, lr: 0.1, tool_demonstrations: true}
  - name: rl
    kind: rl
    steps: 2
    lr: 0.1
    algorithm: {overlong: none}
"""


def test_tools_recipe_merges_the_environment_into_rl_stages(tmp_path):
    recipe = load_recipe(_write(tmp_path, TOOLS))
    assert recipe.stages[1].rollout.environment.max_turns == 3 and recipe.uses_environment()
    assert not load_recipe(ROOT / "recipes/tiny.yaml").uses_environment()
    tools = load_recipe(ROOT / "recipes/tiny_tools.yaml")
    assert tools.stages[0].tool_demonstrations and tools.stages[1].rollout.environment.instruction == ""


@pytest.mark.parametrize(("old", "new", "where", "message"), [
    ("name: x\n", "name: x\nresources: {rollout_engine: hf}\n", ":2: resources.rollout_engine",
     "needs resources.rollout_engine 'vllm'"),
    ("overlong: none", "router_replay: true", ":10: stages.1.rl.algorithm.router_replay", "router replay of multi-turn"),
    ("overlong: none", "overlong: shape, overlong_buffer: 4", ":10: stages.1.rl.algorithm.overlong",
     "bounds one turn of an episode"),
    ("    lr: 0.1\n", "    lr: 0.1\n    aggregation_share: 0.5\n", ":10: stages.1.rl.aggregation_share",
     "aggregation prompts are single-turn"),
    ("rollout:\n  environment: {kind: python_tool, max_turns: 3}\n", "", ":1: rollout.environment",
     "tool_demonstrations: they are episodes of the recipe's rollout.environment"),
    ("tool_demonstrations: true", "tool_demonstrations: true, data: {sources: [{kind: code, name: he, dataset: humaneval}]}",
     ":5: stages.0.sft.tool_demonstrations", "source 'he' is not one"),
    ("max_turns: 3", "max_turns: 0", ":3: rollout.environment.max_turns", "greater than or equal to 1"),
    ("max_turns: 3", "max_turns: 3, timeout_s: 600", ":3: rollout.environment.timeout_s", "less than or equal to 60"),
])
def test_bad_environment_combinations_name_the_field(tmp_path, old, new, where, message):
    _assert_refused(tmp_path, TOOLS, old, new, where, message)


RSA_TRACES = """name: x
rollout: {group_size: 4, rsa: {population: 4, tails: 2, rounds: 2}}
stages:
  - name: rl
    kind: rl
    steps: 2
    lr: 0.1
    rsa_traces: true
    rollout: {max_tokens: 24}
"""


def test_rsa_traces_take_the_rollouts_rsa_settings(tmp_path):
    [stage] = load_recipe(_write(tmp_path, RSA_TRACES)).stages
    assert stage.rsa_traces and stage.rollout.rsa.config(stage.rollout.max_tokens, 1.0).budget == 24


@pytest.mark.parametrize(("old", "new", "where", "message"), [
    ("population: 4", "population: 8", ":2: rollout.rsa.population", "must equal rollout.group_size (4)"),
    ("rounds: 2", "rounds: 0", ":2: rollout.rsa.rounds", "0 is plain sampling"),
    ("{max_tokens: 24}", "{max_tokens: 24, rsa: {budget: 16}}", ":9: stages.0.rl.rollout.rsa.budget",
     "set budget null or equal to it"),
    ("rounds: 2}", "rounds: 2, aggregation_temperature: 0.0}", ":2: rollout.rsa.aggregation_temperature",
     "every round samples at it"),
    ("{max_tokens: 24}", "{max_tokens: 24, environment: {kind: python_tool}}", ":8: stages.0.rl.rsa_traces",
     "turn off rollout.environment"),
    ("    lr: 0.1\n", "    lr: 0.1\n    aggregation_share: 0.5\n", ":8: stages.0.rl.aggregation_share",
     "set aggregation_share to 0"),
    ("name: x\n", "name: x\nalgorithm: {max_off_policy_steps: 1}\n", ":2: algorithm.max_off_policy_steps",
     "not ahead of the learner"),
    ("name: x\n", "name: x\nalgorithm: {max_sampling_rounds: 2}\n", ":2: algorithm.max_sampling_rounds",
     "do not refill dropped groups"),
])
def test_rsa_traces_refuse_what_they_cannot_go_with(tmp_path, old, new, where, message):
    _assert_refused(tmp_path, RSA_TRACES, old, new, where, message)


def test_engines_take_the_learners_dtype_on_gpus_and_fp32_on_the_cpu():
    assert load_recipe(Path("recipes/tiny.yaml")).engine_dtype == "float32"
    assert load_recipe(Path("recipes/gpu.yaml")).engine_dtype == "bfloat16"
    assert load_recipe(Path("recipes/gpu.yaml"), ["deepspeed.bf16=false"]).engine_dtype == "float32"
