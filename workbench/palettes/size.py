"""Size accounting: bits per parameter, bytes with LUT overhead, and % of the float16 model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from workbench.palettes.config import FLOAT_BITS, PaletteConfig, as_config

__all__ = [
    "FLOAT_BITS",
    "LayerSize",
    "SizeReport",
    "bits_per_param",
    "layer_nbytes",
    "recipe_nbytes",
    "size_reduction_pct",
    "size_report",
]


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
    2 bytes a weight for float16 layers (absent or 16). `out_channels` is needed only for grouped palettes."""
    total = 0
    for name, n in numels.items():
        config = as_config(recipe.get(name))
        if config is not None and config.granularity == "per_grouped_channel" and out_channels is None:
            raise ValueError(f"recipe_nbytes needs out_channels for the grouped palette of {name!r}")
        total += layer_nbytes(n, 1 if out_channels is None else out_channels[name], config)
    return total


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
    """Size of `layers` (e.g. `compressible_layers(unet)`) when palettized by `recipe`.

    Layers missing from the recipe count as float16. Recipe entries for layers not in `layers` are an error.
    """
    extra = set(recipe) - set(layers)
    if extra:
        raise KeyError(f"recipe names {len(extra)} layers that are not being sized, e.g. {sorted(extra)[:3]}")
    rows = []
    for name, layer in layers.items():
        config = as_config(recipe.get(name))
        numel, out_channels = layer.weight.numel(), layer.weight.shape[0]
        nbits = FLOAT_BITS if config is None else config.nbits
        rows.append(LayerSize(name, numel, out_channels, nbits, layer_nbytes(numel, out_channels, config)))
    if not rows:
        raise ValueError("size_report over no layers")
    return SizeReport(
        bits_per_param=bits_per_param(recipe, {r.name: r.numel for r in rows}),
        nbytes=sum(r.nbytes for r in rows),
        float16_nbytes=2 * sum(r.numel for r in rows),
        layers=tuple(rows),
    )
