"""The teaching plots: labelled axes with units, legends, palette values drawn where the LUT is."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.report.widgets import palette_error_table
from workbench.viz.plots import (
    BITS_AXIS,
    plot_palette_bytes,
    plot_palette_error_vs_bits,
    plot_palette_histograms,
    plot_quality_vs_bits,
    plot_recipe_metric,
    plot_weight_histogram,
)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def weight():
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(0))


def test_histogram_marks_every_used_palette_value(weight):
    palette = fit_palette(weight, PaletteConfig(2))
    fig = plot_weight_histogram(weight, palette, title="w")
    ax = fig.axes[0]
    lines = sorted(line.get_xdata()[0] for line in ax.lines)
    np.testing.assert_allclose(lines, np.sort(palette.lut[0].astype(np.float64)), rtol=0, atol=0)
    assert "weight value" in ax.get_xlabel() and ax.get_ylabel() == "number of weights"
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"4 palette values (LUT)", "2,048 weights"}


def test_stacked_histograms_one_panel_per_palette(weight):
    palettes = [fit_palette(weight, PaletteConfig(n)) for n in (2, 4)]
    fig = plot_palette_histograms(weight, palettes, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["2-bit palette: 4 values", "4-bit palette: 16 values"]


def test_error_and_bytes_plots(weight):
    table = palette_error_table(weight, nbits=(1, 2, 4), group_size=8)
    fig = plot_palette_error_vs_bits(table)
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("weight SNR (dB") and "bit width" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per_tensor", "per_grouped_channel"]
    ys = ax.lines[0].get_ydata()
    assert list(ys) == sorted(ys), "SNR must rise with bits"
    fig = plot_palette_bytes(table)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "stored size (kB)" and len(ax.patches) == 2 * len(table)
    assert ax.get_legend() is not None


def test_quality_and_recipe_plots_skip_missing_values():
    table = pd.DataFrame(
        {
            "name": ["float16", "8-bit", "4-bit"],
            "strategy": ["float", "apple", "apple"],
            "bits_per_param": [16.0, 8.0, 4.0],
            "latent_psnr_db": [None, 60.0, 40.0],
            "image_psnr_db": [None, 45.0, 30.0],
        }
    )
    ax = plot_quality_vs_bits(table).axes[0]
    assert ax.get_xlabel() == BITS_AXIS and "dB" in ax.get_ylabel()  # the one size axis of every recipe plot
    assert len(ax.lines) == 2
    ax = plot_recipe_metric(table, "image_psnr_db").axes[0]
    assert len(ax.lines) == 1 and list(ax.lines[0].get_xdata()) == [4.0, 8.0]
    assert "dB" in ax.get_ylabel()


def test_figures_name_a_local_model_by_its_folder():
    from workbench.viz.plots import model_name

    assert model_name("/work/main/data/tiny-shapes") == "tiny-shapes"
    assert model_name("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert model_name("StableDiffusionPipeline") == "StableDiffusionPipeline"
