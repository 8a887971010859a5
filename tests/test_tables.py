"""Recipe tables: sizes with LUTs, strategy names, choosing recipes near target sizes."""

import pytest

from workbench.palettes.size import bits_per_param, recipe_nbytes
from workbench.report.tables import pick_recipes, strategy_of

NUMELS = {"a": 1000, "b": 3000}
RECIPES = {
    "recipe_6.00_bit_mixedpalette": {"a": 6, "b": 6},
    "recipe_3.00_bit_mixedpalette": {"a": 6, "b": 2},
    "recipe_4.00_bit_sizeaware": {"a": 4, "b": 4},
    "recipe_2.50_bit_sizeaware": {"a": 4, "b": 2},
}


def test_bits_and_bytes():
    assert bits_per_param({"a": 4}, NUMELS) == (4 * 1000 + 16 * 3000) / 4000
    # 4-bit a: 500 bytes of indices + 16 float16 LUT entries; b float16: 6000 bytes
    assert recipe_nbytes({"a": 4}, NUMELS) == 500 + 32 + 6000


def test_strategy_of_names():
    assert strategy_of("recipe_4.50_bit_mixedpalette") == "apple"
    assert strategy_of("recipe_4.50_bit_sizeaware") == "size-aware"


def test_pick_recipes_nearest_per_strategy():
    picked = pick_recipes(RECIPES, NUMELS, [3.0, 6.0])
    assert list(picked) == [
        "recipe_6.00_bit_mixedpalette",
        "recipe_3.00_bit_mixedpalette",
        "recipe_4.00_bit_sizeaware",
        "recipe_2.50_bit_sizeaware",
    ]
    assert list(pick_recipes(RECIPES, NUMELS, [4.4], ["size-aware"])) == ["recipe_4.00_bit_sizeaware"]
    with pytest.raises(ValueError, match="no recipe of strategies"):
        pick_recipes(RECIPES, NUMELS, [4.0], ["nope"])
