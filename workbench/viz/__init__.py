"""Figures and image grids: plain matplotlib and PIL, no model code."""

from workbench.viz.grids import image_grid
from workbench.viz.plots import plot_psnr_vs_size, plot_quality_vs_bits, plot_recipe_metric, plot_weight_histogram

__all__ = ["image_grid", "plot_psnr_vs_size", "plot_quality_vs_bits", "plot_recipe_metric", "plot_weight_histogram"]
