import subprocess
import sys
from pathlib import Path

import pytest

from zaya_rl.recipe import RecipeError, RlStage, SftStage, load_recipe

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
