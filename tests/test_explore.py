"""The explorers' update logic, driven by setting widget values as a user's clicks would."""

import pytest
import torch
from torch import nn

from workbench.metrics import weight_snr_db
from workbench.palettes.config import PaletteConfig
from workbench.report.widgets import (
    PaletteExplorer,
    RecipeExplorer,
    bits_per_block,
    block_of,
    default_group_size,
    palette_error_table,
    palette_state,
)


@pytest.fixture(scope="module")
def layers():
    g = torch.Generator().manual_seed(0)
    layers = {"down_blocks.0.attn.to_q": nn.Linear(64, 32), "mid_block.resnets.0.conv1": nn.Conv2d(8, 48, 3)}
    for layer in layers.values():
        layer.requires_grad_(False)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    return layers


def test_weight_snr_definition():
    w = torch.tensor([3.0, 4.0]).numpy()
    assert weight_snr_db(w, w) == float("inf")
    assert weight_snr_db(w, w * 0.9) == pytest.approx(20.0)  # noise = 0.01 * signal power


def test_error_table_gains_about_6db_per_bit(layers):
    weight = layers["mid_block.resnets.0.conv1"].weight
    table = palette_error_table(weight, nbits=(2, 4, 6), group_size=default_group_size(48, 16))
    tensor = table[table.granularity == "per_tensor"].set_index("nbits")
    assert tensor.loc[4, "weight_snr_db"] - tensor.loc[2, "weight_snr_db"] > 9
    assert tensor.loc[6, "weight_snr_db"] - tensor.loc[4, "weight_snr_db"] > 9
    grouped = table[table.granularity == "per_grouped_channel"].set_index("nbits")
    assert (grouped["weight_snr_db"] >= tensor["weight_snr_db"] - 0.01).all(), "grouped LUTs must not be worse"
    assert (grouped["lut_bytes"] == 3 * tensor["lut_bytes"]).all()  # 48 channels / 16 per group
    assert tensor.loc[4, "index_bytes"] == weight.numel() // 2


def test_palette_explorer_follows_its_widgets(layers):
    explorer = PaletteExplorer(layers, nbits=4)
    assert explorer.state.layer == "down_blocks.0.attn.to_q" and explorer.state.config == PaletteConfig(4)
    snr4 = explorer.state.weight_snr_db
    explorer.nbits.value = 2
    assert explorer.state.config.nbits == 2 and explorer.state.weight_snr_db < snr4 - 6
    assert explorer.state.palette.lut.shape == (1, 4)
    explorer.layer.value = "mid_block.resnets.0.conv1"
    explorer.grouped.value = True
    assert explorer.state.layer == "mid_block.resnets.0.conv1"
    assert explorer.state.config.granularity == "per_grouped_channel" and explorer.state.palette.lut.shape == (3, 4)
    assert "2-bit per_grouped_channel" in explorer.text.value
    assert explorer.figure.axes[0].get_xlabel().startswith("weight value")
    assert explorer.updates == 4
    expected = palette_state("mid_block.resnets.0.conv1", layers["mid_block.resnets.0.conv1"].weight,
                             PaletteConfig(2, granularity="per_grouped_channel", group_size=16))  # fmt: skip
    assert explorer.state.weight_snr_db == expected.weight_snr_db


def test_recipe_explorer_picks_largest_fitting_recipe():
    numels = {"down_blocks.0.a": 100, "down_blocks.0.b": 300, "mid_block.c": 600}
    recipes = {
        "r8": {"down_blocks.0.a": 8, "down_blocks.0.b": 8, "mid_block.c": 8},
        "r4": {"down_blocks.0.a": 8, "down_blocks.0.b": 4, "mid_block.c": 4},
        "r2": {"down_blocks.0.a": 2, "down_blocks.0.b": 2, "mid_block.c": 2},
    }
    calls = []
    explorer = RecipeExplorer(
        recipes, numels, metrics={"r4": {"psnr": 30.5}}, preview=lambda name, bits: calls.append(name) or name
    )
    assert explorer.state.name == "r8" and explorer.state.bits_per_param == 8.0
    explorer.target.value = 5.0
    assert explorer.state.name == "r4"
    assert explorer.state.bits_per_param == pytest.approx((800 + 1200 + 2400) / 1000)
    assert explorer.state.bits_per_block == {"down_blocks.0": pytest.approx(5.0), "mid_block": 4.0}
    assert explorer.state.metrics == {"psnr": 30.5} and "<td>psnr</td><td>30.50</td>" in explorer.text.value
    explorer.target.value = 2.0
    assert explorer.state.name == "r2" and explorer.state.nbytes == (25 + 8) + (75 + 8) + (150 + 8)
    explorer.target.value = 4.4
    assert calls == ["r8", "r4", "r2"], "a preview is made once per recipe"


def test_recipe_explorer_offers_every_strategy_and_labels_one_size():
    numels = {"down_blocks.0.a": 100, "down_blocks.0.b": 300, "mid_block.c": 600}
    recipes = {
        "recipe_4.00_bit_mixedpalette": dict.fromkeys(numels, 4),
        "recipe_3.60_bit_sizeaware": {"down_blocks.0.a": 6, "down_blocks.0.b": 6, "mid_block.c": 2},
        "recipe_3.20_bit_refined": {"down_blocks.0.a": 8, "down_blocks.0.b": 4, "mid_block.c": 2},
    }
    metrics = {name: {"bits_per_param": 99.0, "size_mb": 99.0, "image_psnr_db": 40.0} for name in recipes}
    explorer = RecipeExplorer(recipes, numels, metrics=metrics)
    values = [value for _, value in explorer.strategy.options]
    assert values == ["apple", "size-aware", "refined", "all"]
    assert explorer.strategy.value == "refined" and explorer.state.name == "recipe_3.20_bit_refined"
    for strategy, name in (("apple", "recipe_4.00_bit_mixedpalette"), ("size-aware", "recipe_3.60_bit_sizeaware")):
        explorer.strategy.value = strategy
        assert explorer.state.name == name and explorer.state.strategy == strategy
    explorer.strategy.value = "all"
    explorer.target.value = 3.4
    assert explorer.state.name == "recipe_3.20_bit_refined"
    # one size in the view: the name's, the computed one's, in one human label; the table's size keys are not repeated
    size = explorer.state.size
    assert size.bits_per_param == pytest.approx(3.2) and size.label() in explorer.text.value
    assert size.label().startswith("3.20 bits/param · ") and "% of float16" in size.label()
    assert explorer.state.metrics == {"image_psnr_db": 40.0}
    assert "image PSNR (dB)" in explorer.text.value and "99" not in explorer.text.value


def test_blocks():
    assert block_of("down_blocks.1.attentions.0.proj_in") == "down_blocks.1"
    assert block_of("mid_block.resnets.0.conv1") == "mid_block"
    assert bits_per_block({"conv_in": 4}, {"conv_in": 10, "conv_out": 10}) == {"conv_in": 4.0, "conv_out": 16.0}
