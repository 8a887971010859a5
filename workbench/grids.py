"""Seed-matched image comparisons: generate the same prompts from the same seeds under several recipes,
and lay the images out as a captioned grid (prompts as rows, recipes as columns).

The first column is the reference (the float model); every other cell carries its image PSNR against the
reference cell of its row, so a reader sees at a glance where a recipe starts to change the picture.

Example:
    >>> comparison = seed_matched_images(pipe, ["a red circle"], {"6-bit": six_bit, "4-bit": four_bit}, steps=8)
    >>> comparison.render().save("grid.png")
    >>> comparison.to_frame()   # one row per cell: prompt, column, bits/param, size, image PSNR
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.generation import generate_images
from workbench.metrics import image_psnr, image_ssim

REFERENCE_COLUMN = "float16"  # the unpalettized model's column, as the reference labels it
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass(frozen=True)
class Column:
    """One column of a comparison: a recipe and its size.

    Attributes:
        name: the column's title, e.g. `"4-bit"` or `"recipe_4.50_bit_mixedpalette"`.
        bits_per_param: sum(bits * numel) / sum(numel) over the sized layers (16 for the float model).
        nbytes: stored bytes of the sized layers (packed indices + LUTs, float16 for the rest).
    """

    name: str
    bits_per_param: float
    nbytes: int

    @property
    def caption(self) -> str:
        """`"4.00 bits/param\n0.71 MB"`: the lines under the column's title."""
        return f"{self.bits_per_param:.2f} bits/param\n{format_megabytes(self.nbytes)}"


def format_megabytes(nbytes: int) -> str:
    """Bytes as MB (10**6 bytes) with 2 significant decimals below 10 MB."""
    mb = nbytes / 1e6
    return f"{mb:.2f} MB" if mb < 10 else f"{mb:.1f} MB"


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
        """One row per cell: prompt, seed, column, bits/param, size (MB), image PSNR (dB), SSIM."""
        import pandas as pd

        rows = []
        for r, prompt in enumerate(self.prompts):
            for c, column in enumerate(self.columns):
                rows.append(
                    {
                        "prompt": prompt,
                        "seed": self.seeds[r],
                        "column": column.name,
                        "bits_per_param": round(column.bits_per_param, 3),
                        "size_mb": round(column.nbytes / 1e6, 4),
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

    def render(self, *, cell_size: int = 128, title: str | None = None):
        """The comparison as one captioned PIL image (see `image_grid`)."""
        captions = [[_psnr_caption(value) if c else "reference" for c, value in enumerate(row)] for row in self.psnr]
        return image_grid(
            self.images,
            row_labels=[f"{p}\n(seed {s})" for p, s in zip(self.prompts, self.seeds)],
            column_labels=[f"{col.name}\n{col.caption}" for col in self.columns],
            cell_captions=captions,
            cell_size=cell_size,
            title=title,
        )


def _psnr_caption(value: float) -> str:
    return "identical" if math.isinf(value) else f"PSNR {value:.1f} dB"


def _font(size: int):
    from PIL import ImageFont

    # Pillow >= 10.1 ships a scalable default font (FreeType), so no system font file is needed.
    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int, draw) -> list[str]:
    """Greedy word wrap of each line of `text` to `width` pixels; a word wider than `width` (a long recipe
    name) is broken after `_` or `.` where possible, else between characters."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word, glued in _split_long(paragraph.split(" "), font, width, draw):
            candidate = line + word if glued else f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _split_long(words, font, width, draw) -> list[tuple[str, bool]]:
    """`(piece, glued)` pairs: `glued` pieces continue the previous piece of the same word (no space)."""
    out = []
    for word in words:
        glued = False
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            breaks = [i + 1 for i in range(cut) if word[i] in "_."]
            cut = breaks[-1] if breaks else cut
            out.append((word[:cut], glued))
            word, glued = word[cut:], True
        out.append((word, glued))
    return out


def image_grid(
    images: Sequence[Sequence],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_captions: Sequence[Sequence[str]] | None = None,
    cell_size: int = 128,
    title: str | None = None,
    font_size: int = 13,
):
    """Lay out `images[row][col]` as one PIL image with row labels on the left, column headers on top and a
    caption under each cell. Images are upscaled with nearest-neighbour so pixels stay visible.

    Args:
        images (`Sequence[Sequence]`): rows of PIL images or HWC uint8 arrays; every row the same length.
        row_labels (`Sequence[str]`, *optional*): one per row (wrapped; `\\n` starts a new line).
        column_labels (`Sequence[str]`, *optional*): one per column; the first line is drawn dark, the rest muted.
        cell_captions (`Sequence[Sequence[str]]`, *optional*): `cell_captions[row][col]`, under each image.
        cell_size (`int`, defaults to 128): displayed side of each image in pixels.
        title (`str`, *optional*): a line across the top.
        font_size (`int`, defaults to 13): label text size in pixels.

    Returns:
        `PIL.Image.Image`: RGB.
    """
    from PIL import Image, ImageDraw

    n_rows = len(images)
    if n_rows == 0:
        raise ValueError("image_grid needs at least one row of images")
    n_cols = len(images[0])
    if n_cols == 0 or any(len(row) != n_cols for row in images):
        raise ValueError(f"every row needs the same, non-zero number of images; got {[len(r) for r in images]}")
    for name, labels, n in (("row_labels", row_labels, n_rows), ("column_labels", column_labels, n_cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name.split('_')[0]}s")
    if cell_captions is not None and [len(r) for r in cell_captions] != [n_cols] * n_rows:
        raise ValueError(f"cell_captions must be {n_rows} rows of {n_cols}")

    font, small = _font(font_size), _font(font_size - 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_h, small_h = 6, font_size + 4, font_size + 2
    label_w = 0
    wrapped_rows = []
    if row_labels is not None:
        label_w = max(150, cell_size + 30)
        wrapped_rows = [_wrap(label, font, label_w - 2 * pad, measure) for label in row_labels]
    wrapped_cols = [_wrap(label, font, cell_size, measure) for label in (column_labels or [])]
    header_h = (max(len(lines) for lines in wrapped_cols) * line_h + pad) if wrapped_cols else 0
    caption_h = small_h + pad if cell_captions is not None else 0
    title_lines = _wrap(title, font, label_w + n_cols * (cell_size + pad) - pad, measure) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title else 0
    row_h = max(cell_size + caption_h, max((len(r) * line_h for r in wrapped_rows), default=0)) + pad
    width = label_w + n_cols * (cell_size + pad) + pad
    height = title_h + header_h + n_rows * row_h + pad

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_h), line, fill=TEXT, font=font)
    for c, lines in enumerate(wrapped_cols):
        x = label_w + pad + c * (cell_size + pad)
        dark = len(_wrap(column_labels[c].split("\n")[0], font, cell_size, measure))  # the title's lines
        for i, line in enumerate(lines):
            draw.text((x, title_h + i * line_h), line, fill=TEXT if i < dark else MUTED, font=font)
    for r, row in enumerate(images):
        y = title_h + header_h + r * row_h
        if wrapped_rows:
            dark = len(_wrap(row_labels[r].split("\n")[0], font, label_w - 2 * pad, measure))
            for i, line in enumerate(wrapped_rows[r]):
                draw.text((pad, y + i * line_h), line, fill=TEXT if i < dark else MUTED, font=font)
        for c, image in enumerate(row):
            x = label_w + pad + c * (cell_size + pad)
            tile = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            canvas.paste(tile.convert("RGB").resize((cell_size, cell_size), Image.NEAREST), (x, y))
            if cell_captions is not None:
                draw.text((x, y + cell_size + 2), cell_captions[r][c], fill=MUTED, font=small)
    return canvas


def column_for(name: str, layers: Mapping[str, torch.nn.Module], recipe: Mapping) -> Column:
    """A `Column` sized with `workbench.size.size_report` over `layers` (e.g. `compressible_layers(unet)`)."""
    from workbench.size import size_report

    report = size_report(layers, {k: v for k, v in recipe.items() if k in layers})
    return Column(name, report.bits_per_param, report.nbytes)


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
        recipes (`Mapping[str, Mapping]`): column name -> recipe (layer -> bits or `PaletteConfig`), in order.
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
    from workbench.layers import compressible_layers
    from workbench.palettize import palettized

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
        columns.append(column_for(name, layers, recipe))
        with palettized(pipe.unet, recipe, cache=cache):
            per_column.append(generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs))
    images = tuple(tuple(column[r] for column in per_column) for r in range(len(prompts)))
    psnr = tuple(tuple(image_psnr(row[0], image) for image in row) for row in images)
    ssim = tuple(tuple(image_ssim(row[0], image) for image in row) for row in images)
    return SeedMatchedImages(tuple(prompts), seeds, tuple(columns), images, psnr, ssim, steps)


def uniform_recipes(layers, nbits) -> dict[str, dict[str, int]]:
    """`{"8-bit": {layer: 8, ...}, ...}`: every layer of `layers` palettized at each width of `nbits`."""
    return {f"{b}-bit": {name: int(b) for name in layers} for b in nbits}


@torch.no_grad()
def latent_psnr_one_step(
    pipe, recipes: Mapping[str, Mapping], prompts: Sequence[str], *, seed: int = 0, cache=None
) -> dict[str, float]:
    """The reference's metric for each recipe: latent PSNR after one denoising step, averaged over prompts.

    Uses `workbench.analysis.OneStepProbe` (the pipeline's single step at t=1 with the fixed generator state,
    guidance and empty negative prompt; PSNR peak from the test latent, rounded to 0.1 dB per prompt).

    Returns:
        recipe name -> mean PSNR in dB.
    """
    from workbench.palettize import palettized
    from workbench.probe import OneStepProbe

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
        `workbench.shapes.score_adherence`. Raises `ValueError` if a prompt is not a shapes caption.
    """
    from workbench.shapes import score_adherence

    out = {}
    for c, column in enumerate(comparison.columns):
        report = score_adherence([row[c] for row in comparison.images], comparison.prompts)
        out[column.name] = {
            "color": report.color_adherence,
            "shape": report.shape_adherence,
            "position": report.position_adherence,
        }
    return out


def recipe_summary(
    comparison: SeedMatchedImages, *, latent_psnr: Mapping[str, float] | None = None, adherence: bool = False
):
    """One row per column: name, bits/param, size (MB), % of float16, latent PSNR (one step), image PSNR, SSIM,
    and (with `adherence=True`, demo-model prompts only) colour/shape/position adherence.

    Image PSNR and SSIM are means over the prompts against the reference column (float model, same seeds).
    The reference column's own PSNR is left empty rather than infinite.
    """
    import pandas as pd

    float16 = comparison.columns[0].nbytes
    scores = adherence_by_column(comparison) if adherence else {}
    rows = []
    for c, column in enumerate(comparison.columns):
        psnrs = [row[c] for row in comparison.psnr]
        row = {
            "name": column.name,
            "bits_per_param": round(column.bits_per_param, 3),
            "size_mb": round(column.nbytes / 1e6, 4),
            "pct_of_float16": round(100.0 * column.nbytes / float16, 1),
            "latent_psnr_db": None if latent_psnr is None else latent_psnr.get(column.name),
            "image_psnr_db": None if c == 0 else round(float(np.mean(psnrs)), 2),
            "ssim": round(float(np.mean([row[c] for row in comparison.ssim])), 4),
        }
        for attribute, value in scores.get(column.name, {}).items():
            row[f"{attribute}_adherence"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.drop(columns=["latent_psnr_db"]) if latent_psnr is None else frame


@torch.no_grad()
def backend_comparison(
    pipe,
    packages,
    recipe_name: str,
    recipe: Mapping[str, int],
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

    Returns:
        `(SeedMatchedImages, label)`: the label says what produced the Core ML column.
    """
    import sys

    from workbench.coreml import coreml_pipeline
    from workbench.palettize import palettized

    backend = backend or ("coreml" if sys.platform == "darwin" else "emulate")
    seeds = tuple(seed + i for i in range(len(prompts)))
    columns = [
        column_for(REFERENCE_COLUMN, layers, {}),
        column_for(f"{recipe_name} (torch simulation)", layers, recipe),
    ]
    per_column = [generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs)]
    with palettized(pipe.unet, recipe):
        per_column.append(generate_images(pipe, prompts, seed=seed, steps=steps, **kwargs))
    with coreml_pipeline(pipe, packages, backend=backend) as core:
        label = core.label
        per_column.append(generate_images(core.pipe, prompts, seed=seed, steps=steps, **kwargs))
    title = "Core ML package (emulated on Linux)" if backend == "emulate" else "Core ML package (Core ML runtime)"
    columns.append(Column(title, columns[1].bits_per_param, columns[1].nbytes))
    images = tuple(tuple(column[r] for column in per_column) for r in range(len(prompts)))
    psnr = tuple(tuple(image_psnr(row[0], image) for image in row) for row in images)
    ssim = tuple(tuple(image_ssim(row[0], image) for image in row) for row in images)
    return SeedMatchedImages(tuple(prompts), seeds, tuple(columns), images, psnr, ssim, steps), label
