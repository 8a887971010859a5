"""How the refinement prices a layer's change of palette: sums over the layer's distinct float16 values ("bins").

Every palette of a layer (any width, exact or approximate, plain or data-aware) gives each weight a value that
depends only on the weight's float16 value, and for a grouped palette on its group of output channels:
`Q_c[i] = q_c(k_i)`, `k_i` the weight's bin (float16 bits, within a segment of the flat weight as fine as the
layer's grouped options need). So the terms of the aligned model (`workbench.recipes.refine`) are sums over bins:

    <g, Q_c>              = sum_k G_k q_c(k),            G_k = sum_{k_i = k} g_i        (each round, the gradient g)
    sum imp (Q_c - Q_a)^2 = sum_k H_k (q_c(k) - q_a(k))^2,   H_k = sum_{k_i = k} imp_i   (once per layer)
    sum imp (Q_c - W)^2   = sum imp W^2 - 2 sum_k H1_k q_c(k) + sum_k H_k q_c(k)^2,   H1_k = sum_{k_i = k} imp_i W_i

(`W` the float32 original, the float16 option's value). A round therefore keeps, per layer, its gradient's bin sums
(a few tens of thousands of float64 on SD-1.5's layers, a float16 value has 65,536 bit patterns) and `<g, W>`,
taken as each weight's gradient comes out of the backward pass (`OneStepProbe.distortion_gradient(consume=...)`),
instead of the gradient of every weight (the UNet's size again, in float32); and prices an option in as many
operations as the layer has bins, not weights.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import as_config
from workbench.palettes.stash import WeightStash

CHUNK = 1 << 22  # weights per pass when binning (bounds the transient int64 / float64 copies)
FLOAT16_PATTERNS = 1 << 16


def segment_of(shape: tuple[int, ...], options) -> int:
    """Flat weights per segment: the whole weight for per-tensor palettes, else the gcd of the grouped options'
    weights per group (a group is `group_size` output channels, the weight's first axis)."""
    numel = math.prod(shape)
    segment = numel
    for option in options:
        config = as_config(option)
        if config is not None and config.granularity == "per_grouped_channel":
            segment = math.gcd(segment, numel // (shape[0] // config.group_size))
    return segment


def _keys(flat: torch.Tensor, start: int, segment: int, numel: int) -> torch.Tensor:
    """The bins of `flat` (a weight's `numel` float weights from flat position `start` on): segment * 65536 +
    float16 bits."""
    bits = flat.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    if segment >= numel:
        return bits
    position = torch.arange(start, start + flat.numel(), dtype=torch.int64)
    return torch.div(position, segment, rounding_mode="floor") * FLOAT16_PATTERNS + bits


@dataclass
class LayerBins:
    """A layer's bins and its importance's sums over them (they depend on the original weight only).

    Attributes:
        segment: flat weights per segment (`segment_of`).
        keys: the occupied bins, sorted (int64).
        first: the flat position of each bin's first weight (reads `q_c(k)` off any palette).
        imp, imp_w: per bin, the sum of the importance and of importance times the float32 weight.
        imp_w2: the sum of importance times the weight squared.
    """

    segment: int
    keys: np.ndarray
    first: np.ndarray
    imp: np.ndarray
    imp_w: np.ndarray
    imp_w2: float

    @classmethod
    def of(cls, weight: torch.Tensor, importance: np.ndarray | None, segment: int) -> LayerBins:
        flat = weight.detach().reshape(-1).to("cpu", torch.float32)
        size = flat.numel() // segment * FLOAT16_PATTERNS
        imp_flat = None if importance is None else torch.from_numpy(np.ascontiguousarray(importance).reshape(-1))
        h, h1 = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        first = torch.full((size,), flat.numel(), dtype=torch.int64)
        h2 = 0.0
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            keys = _keys(part, start, segment, flat.numel())
            imp = torch.ones(len(part), dtype=torch.float64) if imp_flat is None else imp_flat[start : start + CHUNK]
            imp = imp.to(torch.float64)
            w = part.to(torch.float64)
            h.index_add_(0, keys, imp)
            h1.index_add_(0, keys, imp * w)
            h2 += float((imp * w * w).sum())
            first.scatter_reduce_(0, keys, torch.arange(start, start + len(part)), "amin")
        occupied = torch.nonzero(first < flat.numel()).reshape(-1)
        return cls(segment, occupied.numpy(), first[occupied].numpy(), h[occupied].numpy(), h1[occupied].numpy(), h2)

    def gradient_sums(self, original: torch.Tensor, grad: torch.Tensor) -> tuple[np.ndarray, float]:
        """`(G, <g, W>)`: the gradient's sum over each bin of the original weight, and its inner product with it."""
        flat = original.detach().reshape(-1).to("cpu", torch.float32)
        g = grad.detach().reshape(-1).to("cpu", torch.float64)
        size = flat.numel() // self.segment * FLOAT16_PATTERNS
        sums = torch.zeros(size, dtype=torch.float64)
        dot = 0.0
        for start in range(0, flat.numel(), CHUNK):
            part, gpart = flat[start : start + CHUNK], g[start : start + CHUNK]
            sums.index_add_(0, _keys(part, start, self.segment, flat.numel()), gpart)
            dot += float((gpart * part.to(torch.float64)).sum())
        return sums[torch.from_numpy(self.keys)].numpy(), dot

    def values(self, palette) -> np.ndarray:
        """`q(k)` of a `workbench.palettes.fit.Palette` of this weight, per bin (float64)."""
        groups = palette.lut.shape[0]
        per_group = palette.indices.size // groups
        index = palette.indices.reshape(-1)[self.first]
        return palette.lut[self.first // per_group, index].astype(np.float64)

    def error(self, q: np.ndarray | None, q_other: np.ndarray | None) -> float:
        """`sum imp (Q - Q')^2` of two options' values per bin (None: the original weight)."""
        if q is None and q_other is None:
            return 0.0
        if q is None or q_other is None:
            q = q if q is not None else q_other
            return max(self.imp_w2 - 2.0 * float(self.imp_w @ q) + float(self.imp @ (q * q)), 0.0)
        return float(self.imp @ np.square(q - q_other))


@dataclass
class Pricing:
    """How layer changes are priced (`workbench.recipes.refine.layer_changes`), and what pricing keeps across rounds
    (and across the searches of an analysis: none of it depends on the recipe).

    Attributes:
        cache (`PaletteCache`): the palettes (data-aware ones with its importance).
        importance (`workbench.palettes.importance.Importance`, *optional*): weights of the weight error; None = 1.
        approximate (`bool`, defaults to False): price the other options' plain k-means palettes with their
            approximate ones (`PaletteCache.palette(approximate=True)`): no exact fit of every width (a fast
            analysis). The current option is always priced with the exact palette the gradient was taken at;
            candidates are measured with exact palettes, always.
        stash (`WeightStash`, *optional*): where originals wait while a round's recipe is in force for its
            gradient (shared with the analysis' executor, so each is written to disk once); None = a stash per round.
        bins (`dict`): layer -> `LayerBins`, filled on first use.
        values (`dict`): (layer, option, approximate) -> `q(k)` per bin, float16 (the LUTs' own values), filled on
            first use.
    """

    cache: PaletteCache
    importance: object = None
    approximate: bool = False
    stash: WeightStash | None = None
    bins: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)

    def layer_bins(self, name: str, original: torch.Tensor, options) -> LayerBins:
        """`name`'s bins, computed from `original` (its original weight) on first use."""
        bins, segment = self.bins.get(name), segment_of(tuple(original.shape), options)
        if bins is None or bins.segment != segment:
            self.values = {k: v for k, v in self.values.items() if k[0] != name}  # read off the old bins
            imp = None
            if self.importance is not None and name in self.importance:
                imp = self.importance.for_weight(name, tuple(original.shape))
            bins = self.bins[name] = LayerBins.of(original, imp, segment)
        return bins

    def option_values(self, name: str, option: Hashable, weight: torch.Tensor, exact: bool) -> np.ndarray | None:
        """`q(k)` of `option` per bin of `name` (None for float16: the original itself), `weight` the original in
        place; a plain k-means option's approximate palette unless `exact` or the pricing is not approximate."""
        config = as_config(option)
        if config is None:
            return None
        approximate = self.approximate and not exact and config.mode == "kmeans"
        q = self.values.get((name, option, approximate))
        if q is None:
            palette = self.cache.palette(name, weight, config, approximate=approximate)
            q = self.values[name, option, approximate] = self.bins[name].values(palette).astype(np.float16)
        return q.astype(np.float64)

    @property
    def nbytes(self) -> int:
        """Bytes this pricing holds (bins and values)."""
        held = sum(b.keys.nbytes + b.first.nbytes + b.imp.nbytes + b.imp_w.nbytes for b in self.bins.values())
        return held + sum(q.nbytes for q in self.values.values())
