"""Seed-matched comparisons: the same prompts from the same seeds under several recipes, each image scored
against the float model's image of its row.

Images come from `workbench.models.generation.generate_images` (row `i` from seed `seed + i`) and are scored with
`workbench.metrics.image_psnr` / `image_ssim` (uint8, peak 255), the same definitions the analysis'
full-trajectory metrics use, so a recipe's image PSNR is one number wherever it is shown.

Example:
    >>> comparison = seed_matched_images(pipe, ["a red circle"], {"6-bit": six_bit, "4-bit": four_bit}, steps=8)
    >>> comparison.render().save("grid.png")
    >>> comparison.to_frame()   # one row per cell: prompt, column, bits/param, size, image PSNR
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.coreml import coreml_pipeline
from workbench.demo.adherence import score_adherence
from workbench.metrics import image_psnr, image_ssim
from workbench.models.generation import generate_images
from workbench.models.layers import compressible_layers
from workbench.palettes.apply import palettized
from workbench.palettes.given import GivenPalettes
from workbench.palettes.size import SizeReport, size_report
from workbench.recipes.recipe import Recipe
from workbench.sweep.probe import OneStepProbe
from workbench.viz.grids import image_grid

REFERENCE_COLUMN = "float16"  # the unpalettized model's column, as the reference labels it


@dataclass(frozen=True)
class Column:
    """One column of a comparison: a recipe and its size.

    Attributes:
        name: the column's title, e.g. `"4-bit"` or `"recipe_4.50_bit_mixedpalette"`.
        size: the recipe's size over the sized layers (`workbench.palettes.size.SizeReport`; 16 bits/param for the
            float model), the one size every view shows.
    """

    name: str
    size: SizeReport

    @property
    def bits_per_param(self) -> float:
        return self.size.bits_per_param

    @property
    def nbytes(self) -> int:
        """Stored bytes of the sized layers (packed indices + LUTs, float16 for the rest)."""
        return self.size.nbytes

    @property
    def caption(self) -> str:
        """The lines under the column's title: `SizeReport.label`, one part a line."""
        return self.size.label("\n")


@dataclass(frozen=True)
class SeedMatchedImages:
    """Images for `prompts` x `columns`, each row generated from `seeds[row]` in every column.

    Attributes:
        prompts: one per row.
        seeds: the generator seed of each row (the same in every column).
        columns: `columns[0]` is the reference the PSNRs are measured against.
        images: `images[row][col]`, HWC uint8 RGB arrays.
        psnr: `psnr[row][col]`, image PSNR in dB against `images[row][0]` (`inf` in column 0).
        ssim: `ssim[row][col]`, SSIM against `images[row][0]` (1.0 in column 0).
        steps: sampling steps used for every image.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    columns: tuple[Column, ...]
    images: tuple[tuple[np.ndarray, ...], ...] = field(repr=False)
    psnr: tuple[tuple[float, ...], ...]
    ssim: tuple[tuple[float, ...], ...]
    steps: int

    def to_frame(self):
        """One row per cell: prompt, seed, column, bits/param, size (MB), % of float16, image PSNR (dB), SSIM."""
        import pandas as pd

        rows = []
        for r, prompt in enumerate(self.prompts):
            for c, column in enumerate(self.columns):
                rows.append(
                    {
                        "prompt": prompt,
                        "seed": self.seeds[r],
                        "column": column.name,
                        **column.size.columns(),
                        "image_psnr_db": self.psnr[r][c],
                        "ssim": self.ssim[r][c],
                    }
                )
        return pd.DataFrame(rows)

    def mean_psnr(self) -> dict[str, float]:
        """Column name -> mean image PSNR over the rows (finite values only; `inf` if all are identical)."""
        out = {}
        for c, column in enumerate(self.columns):
            values = [row[c] for row in self.psnr if math.isfinite(row[c])]
            out[column.name] = float(np.mean(values)) if values else math.inf
        return out

    def render(self, *, cell_size: int = 128, title: str | None = None, subtitles: Mapping[str, str] | None = None):
        """The comparison as one captioned PIL image (see `image_grid`): each column headed by its name, its
        subtitle (`subtitles`: column name -> a line, e.g. the recipe's strategy) and its size (`Column.caption`)."""
        captions = [[_psnr_caption(value) if c else "reference" for c, value in enumerate(row)] for row in self.psnr]
        subtitles = subtitles or {}
        headers = ["\n".join(filter(None, (c.name, subtitles.get(c.name), c.caption))) for c in self.columns]
        return image_grid(
            self.images,
            row_labels=[f"{p}\n(seed {s})" for p, s in zip(self.prompts, self.seeds)],
            column_labels=headers,
            cell_captions=captions,
            cell_size=cell_size,
            title=title,
        )


@dataclass(frozen=True)
class TrainedUnet:
    """A column whose UNet was trained with its palettes (training-time palettization, `workbench.tune.qat`): its
    palettized weights already are `palettes`' values and its other parameters were trained too, so the whole UNet
    is swapped into the pipeline for the column.

    Attributes:
        unet (`nn.Module`): the trained UNet (same architecture as the pipeline's).
        palettes (`GivenPalettes`): its palettes, which size the column.
    """

    unet: torch.nn.Module = field(repr=False)
    palettes: GivenPalettes


def _psnr_caption(value: float) -> str:
    return "identical" if math.isinf(value) else f"PSNR {value:.1f} dB"


def column_for(name: str, layers: Mapping[str, torch.nn.Module], recipe: Mapping) -> Column:
    """A `Column` sized with `workbench.palettes.size.size_report` over `layers` (e.g. `compressible_layers(unet)`)."""

    return Column(name, size_report(layers, {k: v for k, v in recipe.items() if k in layers}))


@torch.no_grad()
def seed_matched_images(
    pipe,
    prompts: Sequence[str],
    recipes: Mapping[str, Mapping],
    *,
    layers: Mapping[str, torch.nn.Module] | None = None,
    seed: int = 0,
    steps: int = 20,
    cache=None,
    reference_name: str = REFERENCE_COLUMN,
    **kwargs,
) -> SeedMatchedImages:
    """Generate `prompts` with the float UNet and with each recipe applied (in place, restored after), from
    the same seeds, and measure each image's PSNR against the float image of its row.

    Row `i` uses seed `seed + i` in every column.

    Args:
        pipe: a diffusers text-to-image pipeline; its UNet is palettized in place and restored exactly.
        prompts (`Sequence[str]`): one row each.
        recipes (`Mapping[str, Mapping]`): column name -> recipe (layer -> bits or `PaletteConfig`), in order; or
            given palettes (`GivenPalettes`, e.g. learned LUTs), used as they are; or a `TrainedUnet`, swapped in.
        layers (`Mapping[str, nn.Module]`, *optional*): layers to size the columns by; defaults to every
            Linear/Conv2d of the UNet (`compressible_layers(unet, min_numel=0)`).
        seed (`int`, defaults to 0): seed of the first row.
        steps (`int`, defaults to 20): sampling steps.
        cache (`PaletteCache`, *optional*): reuse palettes across calls.
        reference_name (`str`, defaults to `"float16"`): the first column's title.
        kwargs: passed to the pipeline.

    Returns:
        `SeedMatchedImages`.
    """

    if not prompts:
        raise ValueError("seed_matched_images needs at least one prompt")
    if reference_name in recipes:
        raise ValueError(f"a recipe is named {reference_name!r}, the reference column's name; rename it")
    if layers is None:
        layers = compressible_layers(pipe.unet, min_numel=0)
    seeds = tuple(seed + i for i in range(len(prompts)))
    columns = [column_for(reference_name, layers, {})]
    per_column = [generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs)]
    for name, recipe in recipes.items():
        if isinstance(recipe, TrainedUnet):
            columns.append(column_for(name, layers, recipe.palettes.configs))
            with _unet_swapped(pipe, recipe.unet):
                per_column.append(generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs))
            continue
        given = recipe if isinstance(recipe, GivenPalettes) else None
        recipe = recipe.configs if given is not None else recipe
        columns.append(column_for(name, layers, recipe))
        with palettized(pipe.unet, recipe, cache=cache, given=given):
            per_column.append(generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs))
    images = tuple(tuple(column[r] for column in per_column) for r in range(len(prompts)))
    psnr = tuple(tuple(image_psnr(row[0], image) for image in row) for row in images)
    ssim = tuple(tuple(image_ssim(row[0], image) for image in row) for row in images)
    return SeedMatchedImages(tuple(prompts), seeds, tuple(columns), images, psnr, ssim, steps)


@contextmanager
def _unet_swapped(pipe, unet: torch.nn.Module):
    """`pipe.unet` is `unet` inside the block, the pipeline's own again after it."""
    original = pipe.unet
    pipe.unet = unet
    try:
        yield
    finally:
        pipe.unet = original


def uniform_recipes(layers, nbits) -> dict[str, dict[str, int]]:
    """`{"8-bit": {layer: 8, ...}, ...}`: every layer of `layers` palettized at each width of `nbits`."""
    return {f"{b}-bit": {name: int(b) for name in layers} for b in nbits}


@torch.no_grad()
def latent_psnr_one_step(
    pipe, recipes: Mapping[str, Mapping], prompts: Sequence[str], *, seed: int = 0, cache=None
) -> dict[str, float]:
    """The reference's metric for each recipe: latent PSNR after one denoising step, averaged over prompts.

    Uses `workbench.sweep.probe.OneStepProbe` (the pipeline's single step at t=1 with the fixed generator state,
    guidance and empty negative prompt; PSNR peak from the test latent, rounded to 0.1 dB per prompt).

    Returns:
        recipe name -> mean PSNR in dB.
    """

    probe = OneStepProbe(pipe, prompts, seed)
    out = {}
    for name, recipe in recipes.items():
        with palettized(pipe.unet, recipe, cache=cache):
            out[name] = float(np.mean(probe.psnr()))
    return out


def adherence_by_column(comparison: SeedMatchedImages) -> dict[str, dict[str, float]]:
    """Prompt adherence of every column's images (demo model prompts: "a small red circle at the top left").

    Returns:
        column name -> {"color": x, "shape": y, "position": z} fractions in [0, 1], from
        `workbench.demo.adherence.score_adherence`. Raises `ValueError` if a prompt is not a shapes caption.
    """

    out = {}
    for c, column in enumerate(comparison.columns):
        report = score_adherence([row[c] for row in comparison.images], comparison.prompts)
        out[column.name] = {
            "color": report.color_adherence,
            "shape": report.shape_adherence,
            "position": report.position_adherence,
        }
    return out


@torch.no_grad()
def backend_comparison(
    pipe,
    packages,
    recipe: Recipe,
    prompts: Sequence[str],
    *,
    layers: Mapping[str, torch.nn.Module],
    seed: int = 0,
    steps: int = 20,
    backend: str | None = None,
    **kwargs,
) -> tuple[SeedMatchedImages, str]:
    """Seed-matched images of the float model, the recipe simulated in torch, and the exported Core ML package.

    The package runs through `workbench.coreml.coreml_pipeline`: the real Core ML runtime on macOS
    (`backend="coreml"`), weight-exact emulation elsewhere (`"emulate"`: the package's decompressed weights in
    torch). PSNRs are against the float model; the third column's name carries the backend's label.

    Args:
        pipe: the float pipeline the packages were exported from.
        packages: an `ExportReport`, the folder `export_pipeline` wrote, or `{component: package path}`.
        recipe (`Recipe`): the recipe the UNet package holds; its name titles the simulated column.
        prompts (`Sequence[str]`): one row each, row `i` from seed `seed + i`.
        layers (`Mapping[str, nn.Module]`): the layers the columns are sized over (`compressible_layers(unet)`).
        seed, steps, **kwargs: for `workbench.models.generation.generate_images`.
        backend (`str`, *optional*): `"coreml"` or `"emulate"`; default: `"coreml"` on macOS, else `"emulate"`.

    Returns:
        `(SeedMatchedImages, label)`: the label says what produced the Core ML column.
    """
    import sys

    backend = backend or ("coreml" if sys.platform == "darwin" else "emulate")
    seeds = tuple(seed + i for i in range(len(prompts)))
    columns = [
        column_for(REFERENCE_COLUMN, layers, {}),
        column_for(f"{recipe.name} (torch simulation)", layers, recipe.bits),
    ]
    per_column = [generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs)]
    with palettized(pipe.unet, recipe.bits):
        per_column.append(generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs))
    with coreml_pipeline(pipe, packages, backend=backend) as core:
        label = core.label
        per_column.append(generate_images(core.pipe, prompts, seed=seed, steps=steps, **kwargs))
    title = "Core ML package (emulated on Linux)" if backend == "emulate" else "Core ML package (Core ML runtime)"
    columns.append(Column(title, columns[1].size))
    images = tuple(tuple(column[r] for column in per_column) for r in range(len(prompts)))
    psnr = tuple(tuple(image_psnr(row[0], image) for image in row) for row in images)
    ssim = tuple(tuple(image_ssim(row[0], image) for image in row) for row in images)
    return SeedMatchedImages(tuple(prompts), seeds, tuple(columns), images, psnr, ssim, steps), label
