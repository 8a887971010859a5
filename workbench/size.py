"""Size accounting: bits per parameter, bytes with LUT overhead, and % of the float16 model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from workbench.palettize import PaletteConfig, as_config


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
        return 100.0 * (1.0 - self.bits_per_param / 16.0)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(layer) for layer in self.layers])


def layer_nbytes(numel: int, out_channels: int, config: PaletteConfig | None) -> int:
    """Stored bytes of one weight: float16, or packed nbits indices plus float16 LUT(s)."""
    if config is None:
        return 2 * numel
    groups = out_channels // config.group_size if config.granularity == "per_grouped_channel" else 1
    return math.ceil(numel * config.nbits / 8) + groups * (1 << config.nbits) * 2


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
        nbits = 16 if config is None else config.nbits
        rows.append(LayerSize(name, numel, out_channels, nbits, layer_nbytes(numel, out_channels, config)))
    total = sum(r.numel for r in rows)
    if total == 0:
        raise ValueError("size_report over no layers")
    return SizeReport(
        bits_per_param=sum(r.nbits * r.numel for r in rows) / total,
        nbytes=sum(r.nbytes for r in rows),
        float16_nbytes=2 * total,
        layers=tuple(rows),
    )
