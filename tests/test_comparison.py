"""Seed-matched comparisons and image grids: layout, captions, PSNR against the float column, exact restore of
the UNet, and one image PSNR shared with the analysis' full-trajectory metrics."""

import math

import numpy as np
import pytest
import torch

from workbench.analysis.trajectory import evaluate_trajectories
from workbench.compare.seed_matched import Column, seed_matched_images, uniform_recipes
from workbench.metrics import image_psnr
from workbench.models.generation import Sampling, generate_images
from workbench.models.layers import compressible_layers
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.size import recipe_size
from workbench.report.tables import recipe_summary
from workbench.viz.grids import image_grid

PROMPTS = ["a large red circle at the center", "a small blue square at the top left"]


@pytest.fixture(scope="module")
def comparison(pipe):
    layers = compressible_layers(pipe.unet, 2048)
    recipes = uniform_recipes(layers, [8, 2])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = seed_matched_images(pipe, PROMPTS, recipes, layers=layers, steps=2, seed=3, cache=PaletteCache())
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "UNet not restored exactly"
    return result


def test_columns_rows_and_sizes(comparison):
    assert [c.name for c in comparison.columns] == ["float16", "8-bit", "2-bit"]
    assert comparison.seeds == (3, 4)
    assert [c.bits_per_param for c in comparison.columns] == [16.0, 8.0, 2.0]
    f16, b8, b2 = (c.nbytes for c in comparison.columns)
    assert b2 < b8 < f16 and b8 <= f16 / 2 + 104 * 256 * 2  # 8-bit: half of float16 plus one 256-entry LUT a layer
    assert all(img.dtype == np.uint8 and img.shape == (64, 64, 3) for row in comparison.images for img in row)


def test_psnr_against_the_float_column(comparison):
    for row_psnr, row_ssim in zip(comparison.psnr, comparison.ssim):
        assert math.isinf(row_psnr[0]) and row_ssim[0] == pytest.approx(1.0)
        assert row_psnr[1] > row_psnr[2] + 5, f"8-bit should be much closer to float than 2-bit: {row_psnr}"
        assert row_psnr[1] >= 35, f"8-bit image PSNR {row_psnr[1]:.1f} dB is too low"
    frame = comparison.to_frame()
    assert len(frame) == 6 and set(frame.columns) >= {"prompt", "seed", "column", "image_psnr_db", "ssim"}


def test_same_seed_is_reproducible(pipe, comparison):
    again = seed_matched_images(pipe, PROMPTS[:1], {}, steps=2, seed=3)
    assert np.array_equal(again.images[0][0], comparison.images[0][0])


def test_summary_and_adherence_columns(comparison):
    table = recipe_summary(comparison, latent_psnr={"8-bit": 40.0, "2-bit": 20.0}, adherence=True)
    assert list(table["name"]) == ["float16", "8-bit", "2-bit"]
    assert table["image_psnr_db"].isna().tolist() == [True, False, False]
    assert table["pct_of_float16"].iloc[0] == 100.0 and table["pct_of_float16"].iloc[2] < 15
    assert {"color_adherence", "shape_adherence", "position_adherence"} <= set(table.columns)
    assert table["latent_psnr_db"].tolist()[1:] == [40.0, 20.0]


def test_render_has_room_for_labels(comparison):
    image = comparison.render(cell_size=96, title="t")
    assert image.mode == "RGB"
    assert image.width >= 3 * 96 + 150 and image.height >= 2 * 96
    pixels = np.asarray(image)
    assert (pixels[:20] < 100).any(), "title text missing"


def test_image_grid_validates_shapes():
    tile = np.zeros((8, 8, 3), np.uint8)
    grid = image_grid([[tile, tile]], row_labels=["r"], column_labels=["a", "b"], cell_captions=[["x", "y"]])
    assert grid.width > 2 * 128
    with pytest.raises(ValueError, match="same, non-zero number"):
        image_grid([[tile, tile], [tile]])
    with pytest.raises(ValueError, match="column_labels has 1 entries for 2"):
        image_grid([[tile, tile]], column_labels=["a"])
    with pytest.raises(ValueError, match="at least one row"):
        image_grid([])


def test_column_caption_is_the_size_label():
    four = recipe_size({"a": 4, "b": 4}, {"a": 1_000_000, "b": 420_000})
    assert Column("4-bit", four).caption == "4.00 bits/param\n0.71 MB\n25.0 % of float16"
    float16 = recipe_size({}, {"a": 6_172_839})
    assert Column("float16", float16).caption == "16.00 bits/param\n12.3 MB\n100.0 % of float16"


def test_grid_cells_hold_the_images_upscaled():
    red, blue = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    grid = np.asarray(image_grid([[red, blue]], cell_size=32))
    pad = 6  # no row labels: the first cell starts at (pad, 0)
    assert (grid[0:32, pad : pad + 32] == [255, 0, 0]).all()
    assert (grid[0:32, pad + 32 + pad : pad + 64 + pad] == [0, 0, 255]).all()


def test_one_image_psnr_for_comparisons_and_trajectories(pipe):
    """Notebook 04's image PSNR of a recipe (seed-matched grid) equals notebook 03's (the analysis' trajectory
    metrics) for the same recipe, prompts, seed and steps: one generation path, one PSNR definition."""
    layers = compressible_layers(pipe.unet, 2048)
    recipe = dict.fromkeys(layers, 4)
    grid = seed_matched_images(pipe, PROMPTS, {"4-bit": recipe}, layers=layers, steps=2, seed=5)
    trajectories = evaluate_trajectories(pipe, {"4-bit": recipe}, PROMPTS, Sampling(seed=5, steps=2))
    assert [row[1] for row in grid.psnr] == list(trajectories[1].image_psnr)
    assert all(math.isfinite(v) and v > 10 for v in trajectories[1].image_psnr)
    with palettized(pipe.unet, recipe):  # and both are the PSNR of generate_images' uint8 pixels, peak 255
        images = generate_images(pipe, PROMPTS, seed=5, steps=2)
    assert grid.psnr[1][1] == image_psnr(generate_images(pipe, PROMPTS, seed=5, steps=2)[1], images[1])


def test_generation_seeds_each_prompt_independently_of_its_batch(pipe):
    both = generate_images(pipe, PROMPTS, seed=7, steps=2)
    second_alone = generate_images(pipe, PROMPTS[1:], seed=8, steps=2)
    assert both.dtype == np.uint8 and both.shape == (2, 64, 64, 3)
    assert np.abs(both[1].astype(int) - second_alone[0].astype(int)).max() <= 1  # batched math may round
    assert not np.array_equal(both[0], generate_images(pipe, PROMPTS[:1], seed=8, steps=2)[0])


def test_a_trained_unet_column_is_swapped_in_whole_and_the_pipeline_keeps_its_own(pipe, comparison):
    import copy

    from workbench.compare.seed_matched import TrainedUnet
    from workbench.palettes.given import GivenPalettes

    layers = compressible_layers(pipe.unet, 2048)
    given = GivenPalettes.fit(pipe.unet, dict.fromkeys(layers, 2))
    trained = copy.deepcopy(pipe.unet)  # "trained" to exactly the 2-bit palettes, nothing else changed
    with torch.no_grad():
        for name in given:
            trained.get_submodule(name).weight.copy_(torch.from_numpy(given.dense(name).astype(np.float32)))
    own = pipe.unet
    result = seed_matched_images(
        pipe, PROMPTS, {"trained": TrainedUnet(trained, given)}, layers=layers, steps=2, seed=3
    )
    assert pipe.unet is own
    assert result.columns[1].bits_per_param == comparison.columns[2].bits_per_param == 2.0
    for row, expected in zip(result.images, comparison.images):
        assert np.array_equal(row[1], expected[2])  # the same images as the 2-bit palettes applied in place
