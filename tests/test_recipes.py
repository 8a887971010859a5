import json
from pathlib import Path

import pytest

from workbench.cli.main import main
from workbench.recipes.recipe import PreAnalysis, Recipe, RecipeError, load_recipe, recipe_name

REFERENCE = Path(__file__).parent / "data" / "reference_preanalysis.json"
LAYERS = [
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.resnets.0.conv1",
]


def test_reference_file_round_trips_unchanged(tmp_path):
    analysis = PreAnalysis.load(REFERENCE)
    assert analysis.model_version == "stabilityai/stable-diffusion-xl-base-1.0"
    assert analysis.baselines["linear_8bit"] == 66.025
    out = analysis.save(tmp_path / "again.json")
    assert out.read_text() == REFERENCE.read_text()  # same keys, same order, same layout
    original = json.loads(REFERENCE.read_text())
    assert list(json.loads(out.read_text())) == list(original)


def test_unknown_top_level_keys_are_kept(tmp_path):
    data = {"recipes": {"r": {"a": 4}}, "model_version": "x", "our_note": {"k": 1}}
    (tmp_path / "r.json").write_text(json.dumps(data))
    out = PreAnalysis.load(tmp_path / "r.json").save(tmp_path / "s.json")
    assert json.loads(out.read_text()) == data


def test_load_recipe_by_name_and_bits_per_param():
    recipe = load_recipe(REFERENCE, "recipe_4.50_bit_mixedpalette")
    assert recipe.bits[LAYERS[2]] == 8
    numels = dict(zip(LAYERS, [100, 300, 500, 100]))
    assert recipe.bits_per_param(numels) == pytest.approx((4 * 100 + 4 * 300 + 8 * 500 + 2 * 100) / 1000)
    assert recipe_name(4.5) == "recipe_4.50_bit_mixedpalette"


def test_single_recipe_file_loads_in_reference_shape(tmp_path):
    path = Recipe("recipe_3.00_bit_mixedpalette", {"a.b": 2, "c": 4}).save(tmp_path / "one.json", model_version="m")
    data = json.loads(path.read_text())
    assert data["recipes"] == {"recipe_3.00_bit_mixedpalette": {"a.b": 2, "c": 4}}  # what the apply script reads
    assert load_recipe(path).bits == {"a.b": 2, "c": 4}


def test_bad_recipes_give_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"unsupported bit width 5.*valid: 1, 2, 3, 4, 6, 8, 16"):
        Recipe("r", {"a": 5})
    with pytest.raises(RecipeError, match="names 1 layers not in the model: 'up_blocks.0.resnets.0.conv9'.*conv1"):
        Recipe("r", {"up_blocks.0.resnets.0.conv9": 4}).validate(LAYERS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"recipes": {"r": {"a": 4},}}')
    with pytest.raises(RecipeError, match="not valid JSON.*line 1"):
        PreAnalysis.load(bad)
    with pytest.raises(RecipeError, match="not found"):
        PreAnalysis.load(tmp_path / "missing.json")
    with pytest.raises(RecipeError, match="no recipe 'recipe_4.5'.*recipe_4.50_bit_mixedpalette"):
        load_recipe(REFERENCE, "recipe_4.5")
    with pytest.raises(RecipeError, match="has 3 recipes; pick one"):
        load_recipe(REFERENCE)


def test_cli_recipe_errors_exit_non_zero(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert main(["recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err
    assert main(["recipe", str(REFERENCE), "--name", "recipe_4.50_bit_mixedpalette"]) == 0
    assert "recipe_4.50_bit_mixedpalette" in capsys.readouterr().out
