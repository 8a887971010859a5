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

import functools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch

from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import as_config
from workbench.palettes.stash import WeightStash
from workbench.sweep.executor import UNetState

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


@functools.cache
def _kernels() -> ModuleType | None:
    """`workbench.recipes._bins_numba` (compiled on first use), or None when numba is missing."""
    try:
        import workbench.recipes._bins_numba as kernels
    except ImportError:
        return None
    return kernels


def _flat(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A weight's float32 values and their float16 bit patterns (uint16), flat."""
    w = weight.detach().reshape(-1).to("cpu", torch.float32)
    return w.numpy(), w.to(torch.float16).view(torch.int16).numpy().view(np.uint16)  # torch's cast: vectorised


def _keys(bits: np.ndarray, segment: int) -> np.ndarray:
    """Each weight's bin, `segment index * 65536 + bits` (int64: only without numba)."""
    return np.arange(bits.size, dtype=np.int64) // segment * FLOAT16_PATTERNS + bits


def _bin_stats(bits: np.ndarray, w: np.ndarray, imp: np.ndarray | None, segment: int):
    """`(h, h1, first, h2)`: per bin the sums of the importance and of `imp * w`, and the first flat position;
    and `sum imp w^2`."""
    imp = np.ascontiguousarray(imp).reshape(-1) if imp is not None else np.empty(0, dtype=np.float32)
    kernels = _kernels()
    if kernels is not None:
        return kernels.bin_stats(bits, w, imp, segment)
    keys, size = _keys(bits, segment), bits.size // segment * FLOAT16_PATTERNS
    m = imp.astype(np.float64) if imp.size else np.ones(bits.size)
    wd = w.astype(np.float64)
    first = np.full(size, bits.size, dtype=np.int64)
    occupied, at = np.unique(keys, return_index=True)
    first[occupied] = at
    h2 = float(np.dot(m * wd, wd))
    return np.bincount(keys, m, size), np.bincount(keys, m * wd, size), first, h2


def _bin_gradient(bits: np.ndarray, w: np.ndarray, g: np.ndarray, segment: int) -> tuple[np.ndarray, float]:
    """Per bin the gradient's sum, and `<g, w>`, in float64."""
    kernels = _kernels()
    if kernels is not None:
        return kernels.bin_gradient(bits, w, g, segment)
    gd = g.astype(np.float64)
    return np.bincount(_keys(bits, segment), gd, bits.size // segment * FLOAT16_PATTERNS), float(gd @ w)


@dataclass
class LayerBins:
    """A layer's bins and its importance's sums over them (they depend on the original weight only).

    Attributes:
        segment: flat weights per segment (`segment_of`).
        keys: the occupied bins, sorted (int32 where they fit, as on every SD layer: half the memory).
        first: the flat position of each bin's first weight (reads `q_c(k)` off any palette; int32 where it fits).
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
        w, bits = _flat(weight)
        h, h1, first, h2 = _bin_stats(bits, w, importance, segment)
        occupied = np.flatnonzero(first < bits.size)
        index = np.int32 if max(bits.size, first.size) < 2**31 else np.int64
        keys, positions = occupied.astype(index), first[occupied].astype(index)
        return cls(segment, keys, positions, h[occupied], h1[occupied], float(h2))

    def gradient_sums(self, original: torch.Tensor, grad: torch.Tensor) -> tuple[np.ndarray, float]:
        """`(G, <g, W>)`: the gradient's sum over each bin of the original weight, and its inner product with it."""
        w, bits = _flat(original)
        g = grad.detach().reshape(-1).to("cpu", torch.float32).numpy()
        sums, dot = _bin_gradient(bits, w, g, self.segment)
        return sums[self.keys], float(dot)

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
        state (`workbench.sweep.executor.UNetState`, *optional*): the recipe in force on the UNet, shared with the
            executor that measures the candidates (its stash must be `stash`): a round's gradient then puts its
            recipe in force by changing only the layers that differ from the last candidate measured, and leaves it
            there for the candidates, which differ from it in a few layers. None = the recipe put in force and
            taken out again for each gradient.
        bins (`dict`): layer -> `LayerBins`, filled on first use.
        values (`dict`): (layer, option, approximate) -> `q(k)` per bin, float16 (the LUTs' own values), filled on
            first use.
    """

    cache: PaletteCache
    importance: object = None
    approximate: bool = False
    stash: WeightStash | None = None
    state: UNetState | None = None
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

    def original(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`name`'s original values: `weight` itself, or with a `state` in force its original from the stash."""
        return weight if self.state is None else self.stash.original(name, weight)

    def option_values(self, name: str, option: Hashable, weight: torch.Tensor, exact: bool) -> np.ndarray | None:
        """`q(k)` of `option` per bin of `name` (None for float16: the original itself), `weight` its parameter; a
        plain k-means option's approximate palette unless `exact` or the pricing is not approximate. With a `state`
        in force the parameter may hold palettized values: a palette held for its identity is used (the parameter
        keeps the original's storage on the stash's disk path), else one of the original from the stash."""
        config = as_config(option)
        if config is None:
            return None
        approximate = self.approximate and not exact and config.mode == "kmeans"
        q = self.values.get((name, option, approximate))
        if q is None:
            palette = self.cache.held(name, weight, config, approximate) if self.state is not None else None
            if palette is None:
                palette = self.cache.palette(name, self.original(name, weight), config, approximate=approximate)
            q = self.values[name, option, approximate] = self.bins[name].values(palette).astype(np.float16)
        return q.astype(np.float64)

    @property
    def nbytes(self) -> int:
        """Bytes this pricing holds (bins and values)."""
        held = sum(b.keys.nbytes + b.first.nbytes + b.imp.nbytes + b.imp_w.nbytes for b in self.bins.values())
        return held + sum(q.nbytes for q in self.values.values())
