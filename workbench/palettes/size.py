"""Size accounting: bits per parameter, bytes with LUT overhead, and % of the float16 model.

A recipe's size is ONE thing, its `SizeReport` (`recipe_size`, `size_report`), shown everywhere with the same names
and labels (`SIZE_COLUMNS`, `SizeReport.label`):

- **bits/param** is *the* size: `sum(bits * numel) / sum(numel)` over the candidate layers, LUTs not counted (the
  reference's measure). Recipe names carry it (`recipe_4.62_bit_refined`: `workbench.recipes.recipe.recipe_name`),
  size targets, the knapsack's budget and the explorer's slider are in it.
- **MB** and **% of float16** are the same recipe's stored bytes (packed indices plus every float16 LUT), next to
  the float16 bytes of the same layers: what the weights take on disk, a little above `bits/param / 16` by the LUTs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from workbench.palettes.config import FLOAT_BITS, PaletteConfig, as_config

__all__ = [
    "FLOAT_BITS",
    "SIZE_COLUMNS",
    "LayerSize",
    "SizeReport",
    "bits_per_param",
    "format_bits",
    "format_megabytes",
    "layer_nbytes",
    "recipe_nbytes",
    "recipe_size",
    "size_reduction_pct",
    "size_report",
]


# The size's table columns and their labels, the same in every table, explorer, grid and plot.
SIZE_COLUMNS = {"bits_per_param": "bits/param", "size_mb": "size (MB)", "pct_of_float16": "% of float16"}


def format_bits(bits_per_param: float) -> str:
    """`"4.62 bits/param"`: the size as every label writes it (2 decimals, as recipe names)."""
    return f"{bits_per_param:.2f} bits/param"


def format_megabytes(nbytes: int) -> str:
    """Bytes as MB (10**6 bytes): `"2.12 MB"` below 10 MB, `"12.3 MB"` above."""
    mb = nbytes / 1e6
    return f"{mb:.2f} MB" if mb < 10 else f"{mb:.1f} MB"


def _recipe_bits(spec) -> int:
    """A recipe entry's bits per weight: its palette width, or 16 for float16 (16 / None)."""
    config = as_config(spec)
    return FLOAT_BITS if config is None else config.nbits


def bits_per_param(recipe: Mapping[str, int | PaletteConfig | None], numels: Mapping[str, int]) -> float:
    """The reference's size measure: `sum(bits * numel) / sum(numel)` over the layers of `numels`.

    LUTs are not counted (see `recipe_nbytes` for the stored size). Layers absent from `recipe` count as
    float16 (16 bits); recipe entries for layers outside `numels` are ignored.

    Args:
        recipe: layer name -> bit width (16 = float16) or `PaletteConfig`.
        numels: layer name -> number of weights, e.g. `{n: m.weight.numel() for n, m in layers.items()}`.

    Returns:
        `float`: bits per parameter, in [1, 16].
    """
    total = sum(numels.values())
    if total == 0:
        raise ValueError("bits_per_param over no layers")
    return sum(_recipe_bits(recipe.get(name)) * n for name, n in numels.items()) / total


def size_reduction_pct(bits_per_param: float) -> float:
    """The reference's x-axis, "model size reduction (%)": `100 * (1 - bits_per_param / 16)`."""
    return 100.0 * (1.0 - bits_per_param / FLOAT_BITS)


def recipe_nbytes(
    recipe: Mapping[str, int | PaletteConfig | None],
    numels: Mapping[str, int],
    out_channels: Mapping[str, int] | None = None,
) -> int:
    """Stored bytes of the layers of `numels` under `recipe`: packed indices plus float16 LUTs (`layer_nbytes`),
    2 bytes a weight for float16 layers (absent or 16). `out_channels` is needed only for grouped palettes
    (`recipe_size(...).nbytes`)."""
    return recipe_size(recipe, numels, out_channels).nbytes


@dataclass(frozen=True)
class LayerSize:
    name: str
    numel: int
    out_channels: int
    nbits: int  # 16 for float16
    nbytes: int  # packed indices + LUTs, or 2 bytes a weight for float16


@dataclass(frozen=True)
class SizeReport:
    """The size of a set of layers under a recipe.

    Attributes:
        bits_per_param: the reference's measure, sum(bits * numel) / sum(numel), LUTs not counted.
        nbytes: bytes of the layers' weights as stored, LUTs and index packing included.
        float16_nbytes: bytes of the same weights in float16.
        layers: one `LayerSize` per layer.
    """

    bits_per_param: float
    nbytes: int
    float16_nbytes: int
    layers: tuple[LayerSize, ...]

    @property
    def pct_of_float16(self) -> float:
        """Stored size as a percentage of float16 size (LUTs included)."""
        return 100.0 * self.nbytes / self.float16_nbytes

    @property
    def size_reduction_pct(self) -> float:
        """The reference's x-axis, "model size reduction (%)": 100 * (1 - bits_per_param / 16)."""
        return size_reduction_pct(self.bits_per_param)

    def label(self, sep: str = " · ") -> str:
        """`"4.62 bits/param · 2.12 MB · 29.2 % of float16"` (`sep="\\n"`: one per line, for narrow headers)."""
        return sep.join(
            (
                format_bits(self.bits_per_param),
                format_megabytes(self.nbytes),
                f"{self.pct_of_float16:.1f} % of float16",
            )
        )

    def columns(self) -> dict:
        """The `SIZE_COLUMNS` of a table row: bits/param (3 decimals), MB (4) and % of float16 (1)."""
        return {
            "bits_per_param": round(self.bits_per_param, 3),
            "size_mb": round(self.nbytes / 1e6, 4),
            "pct_of_float16": round(self.pct_of_float16, 1),
        }

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(layer) for layer in self.layers])


def layer_nbytes(numel: int, out_channels: int, config: PaletteConfig | None) -> int:
    """Stored bytes of one weight: float16, or packed nbits indices plus every float16 LUT
    (`PaletteConfig.nbytes`, the one formula, also `Palette.nbytes`)."""
    if config is None:
        return 2 * numel
    return config.nbytes(numel, out_channels)


def size_report(layers: Mapping[str, nn.Module], recipe: Mapping[str, int | PaletteConfig | None]) -> SizeReport:
    """Size of `layers` (e.g. `compressible_layers(unet)`) when palettized by `recipe` (`recipe_size` of their
    weight counts and output channels).

    Layers missing from the recipe count as float16. Recipe entries for layers not in `layers` are an error.
    """
    extra = set(recipe) - set(layers)
    if extra:
        raise KeyError(f"recipe names {len(extra)} layers that are not being sized, e.g. {sorted(extra)[:3]}")
    numels = {name: layer.weight.numel() for name, layer in layers.items()}
    return recipe_size(recipe, numels, {name: layer.weight.shape[0] for name, layer in layers.items()})


def recipe_size(
    recipe: Mapping[str, int | PaletteConfig | None],
    numels: Mapping[str, int],
    out_channels: Mapping[str, int] | None = None,
) -> SizeReport:
    """The size of the layers of `numels` under `recipe`: the one size every view shows (`SizeReport.label`).

    Layers absent from `recipe` count as float16; entries for layers outside `numels` are ignored. `out_channels`
    (layer -> output channels) is needed only for grouped palettes, whose LUTs are per group.
    """
    rows = []
    for name, numel in numels.items():
        config = as_config(recipe.get(name))
        if config is not None and config.granularity == "per_grouped_channel" and out_channels is None:
            raise ValueError(f"the size of the grouped palette of {name!r} needs out_channels")
        channels = 1 if out_channels is None else out_channels[name]
        nbits = FLOAT_BITS if config is None else config.nbits
        rows.append(LayerSize(name, numel, channels, nbits, layer_nbytes(numel, channels, config)))
    if not rows:
        raise ValueError("the size of no layers")
    return SizeReport(
        bits_per_param=bits_per_param(recipe, {r.name: r.numel for r in rows}),
        nbytes=sum(r.nbytes for r in rows),
        float16_nbytes=2 * sum(r.numel for r in rows),
        layers=tuple(rows),
    )
