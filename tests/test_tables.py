"""Recipe tables: sizes with LUTs, strategy names, choosing recipes near target sizes."""

import pandas as pd
import pytest

from workbench.palettes.size import bits_per_param, recipe_nbytes, recipe_size
from workbench.report.tables import labelled, pick_recipes, strategy_of

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


def test_pick_recipes_puts_each_strategy_beside_the_reference_rule_at_its_size():
    picked = pick_recipes(RECIPES, NUMELS, [3.0, 6.0])
    # Apple's rule picks the size nearest each target; the size-aware recipe nearest that size stands beside it
    assert list(picked) == [
        "recipe_6.00_bit_mixedpalette",
        "recipe_4.00_bit_sizeaware",
        "recipe_3.00_bit_mixedpalette",
        "recipe_2.50_bit_sizeaware",
    ]
    assert list(pick_recipes(RECIPES, NUMELS, [4.4], ["size-aware"])) == ["recipe_4.00_bit_sizeaware"]
    with pytest.raises(ValueError, match="no recipe of strategies"):
        pick_recipes(RECIPES, NUMELS, [4.0], ["nope"])


def test_pick_recipes_shows_the_refined_recipes_and_takes_recorded_strategies():
    recipes = {**RECIPES, "recipe_2.25_bit_refined": {"a": 3, "b": 2}, "recipe_5.50_bit_refined": {"a": 4, "b": 6}}
    picked = pick_recipes(recipes, NUMELS, [3.0, 6.0])
    assert list(picked) == [
        "recipe_6.00_bit_mixedpalette",
        "recipe_4.00_bit_sizeaware",
        "recipe_5.50_bit_refined",
        "recipe_3.00_bit_mixedpalette",
        "recipe_2.50_bit_sizeaware",
        "recipe_2.25_bit_refined",
    ]
    # a strategy the analysis recorded wins over the name's suffix (the fast sweep's `..._fastrule` is size-aware)
    fast = {"recipe_3.00_bit_mixedpalette": {"a": 6, "b": 2}, "recipe_2.50_bit_fastrule": {"a": 4, "b": 2}}
    assert list(pick_recipes(fast, NUMELS, [3.0], ["size-aware"], {"recipe_2.50_bit_fastrule": "size-aware"})) == [
        "recipe_2.50_bit_fastrule"
    ]


def test_one_size_label():
    size = recipe_size({"a": 4}, NUMELS)
    assert size.bits_per_param == bits_per_param({"a": 4}, NUMELS) and size.nbytes == recipe_nbytes({"a": 4}, NUMELS)
    assert size.label() == f"13.00 bits/param · 0.01 MB · {100 * (500 + 32 + 6000) / 8000:.1f} % of float16"
    assert size.label("\n").split("\n") == size.label().split(" · ")
    assert size.columns() == {"bits_per_param": 13.0, "size_mb": 0.0065, "pct_of_float16": 81.7}
    assert list(labelled(pd.DataFrame([size.columns()]))) == ["bits/param", "size (MB)", "% of float16"]
    with pytest.raises(ValueError, match="needs out_channels"):
        recipe_size({"a": "kmeans4_g16"}, NUMELS)
