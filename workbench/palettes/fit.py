"""Palettization: n-bit lookup tables of float16 values, fitted exactly as Core ML fits them.

A palettized weight is a LUT of 2**nbits float16 values and, for every weight, a uint8 index into
it. `fit_palette` reproduces `coremltools.optimize.coreml.palettize_weights` (coremltools 9) bit for
bit: the weight is cast to float16; in `"kmeans"` mode a tensor (or channel group) with >= 10,000
elements gets exact 1-D k-means over its distinct values weighted by their counts, a smaller one
scikit-learn's KMeans with coremltools' settings; `"uniform"` mode is coremltools' linear LUT.

`"wkmeans"` (data-aware) palettes are ours: exact 1-D k-means weighted by each weight's importance (the
second moment of the input channel it multiplies, `workbench.palettes.importance`), minimising
`sum(importance * (w - lut[idx])**2)`, a proxy of the layer's output error. Core ML stores their LUT and
indices as given (`workbench.coreml.explicit_lut`).

Example:
    >>> cfg = PaletteConfig(nbits=4)
    >>> with palettized(pipe.unet, {"mid_block.attentions.0.proj_in": cfg}):
    ...     image = pipe(prompt).images[0]   # weights restored exactly on exit
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.errors import InvalidValueError
from workbench.palettes.config import (
    KMEANS_1D_MIN_NUMEL,
    PaletteConfig,
)
from workbench.palettes.kmeans import kmeans_float16
from workbench.threads import sklearn_single_thread

BINNED = "binned"  # fit_palette's approximate solver (estimates only)


@dataclass(frozen=True, eq=False)
class Palette:
    """A fitted palette: `dense()[c, ...] == lut[c // group_size, indices[c, ...]]`.

    Attributes:
        lut (`np.ndarray`): float16, shape (n_groups, 2**nbits); unused entries are 0.
        indices (`np.ndarray`): uint8, the weight's shape.
        config (`PaletteConfig`): how it was fitted.
    """

    lut: np.ndarray
    indices: np.ndarray
    config: PaletteConfig = field(repr=False)

    def dense(self) -> np.ndarray:
        """The palettized weight, float16, in the weight's shape."""
        groups = self.lut.shape[0]
        if groups == 1:  # per-tensor: one gather with the small indices as they are (4x faster than below)
            return self.lut[0][self.indices]
        rows = self.indices.reshape(groups, -1)
        return np.take_along_axis(self.lut, rows.astype(np.intp), axis=1).reshape(self.indices.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: indices packed at nbits each, plus the float16 LUT(s) (`PaletteConfig.nbytes`)."""
        return self.config.nbytes(self.indices.size, self.indices.shape[0])


def _as_float16_numpy(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float16).numpy()
    weight = np.asarray(weight).astype(np.float16, copy=False)
    if weight.ndim == 0 or weight.size == 0:
        raise ValueError(f"cannot palettize a weight of shape {weight.shape}")
    return weight


def _fit_group_kmeans(values: np.ndarray, nbits: int, solver: str) -> tuple[np.ndarray, np.ndarray]:
    lut = np.zeros(1 << nbits)
    if values.size >= KMEANS_1D_MIN_NUMEL or solver == BINNED:
        clusters = kmeans_float16(values, len(lut), solver=solver, binned=solver == BINNED)
        lut[: len(clusters.centroids)] = clusters.centroids
        return lut, clusters.labels
    from sklearn.cluster import KMeans

    # coremltools' small-tensor path, with its exact settings, on the same float16 column.
    n_clusters = min(values.size, len(lut))
    kmeans = KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values.reshape(-1, 1))
    lut[:n_clusters] = kmeans.cluster_centers_[:, 0]
    return lut, kmeans.labels_


def _fit_group_weighted(values: np.ndarray, nbits: int, solver: str, importance: np.ndarray):
    """Exact importance-weighted 1-D k-means of one group, whatever its size (no scikit-learn path)."""
    lut = np.zeros(1 << nbits)
    clusters = kmeans_float16(values, len(lut), solver=solver, weights=importance)
    lut[: len(clusters.centroids)] = clusters.centroids
    return lut, clusters.labels


def _importance_array(importance, config: PaletteConfig, shape: tuple) -> np.ndarray | None:
    """The importance of every weight (a read-only broadcast view), for data-aware configs; None for the others."""
    if not config.data_aware:
        return None
    if importance is None:
        raise InvalidValueError(
            f"the data-aware palette {config.key} needs per-weight importances (workbench.palettes.importance); "
            f"got none. Collect them with collect_importance, or use mode='kmeans'"
        )
    importance = np.asarray(importance, dtype=np.float64)
    try:
        return np.broadcast_to(importance, shape)
    except ValueError:
        raise InvalidValueError(
            f"importance of shape {importance.shape} does not broadcast to the weight's shape {shape}"
        ) from None


def _fit_group_uniform(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    # coremltools' arithmetic, kept in float16 as it does, so the LUT matches bit for bit.
    lo, hi = np.amin(values), np.amax(values)
    levels = (1 << nbits) - 1
    if hi == lo:
        return np.full(1 << nbits, lo), np.zeros(values.size, dtype=np.uint8)
    indices = np.round(((values - lo) / (hi - lo)) * levels).astype(np.uint8)
    return np.arange(1 << nbits) * ((hi - lo) / levels) + lo, indices


def fit_palette(
    weight: torch.Tensor | np.ndarray, config: PaletteConfig, solver: str = "auto", importance=None
) -> Palette:
    """Fit an n-bit palette to a weight, exactly as coremltools 9's `palettize_weights` does (k-means, uniform),
    or by importance-weighted exact k-means (`"wkmeans"`).

    Args:
        weight (`torch.Tensor` or `np.ndarray`): any float dtype; cast to float16 first, as Core ML stores it.
            Axis 0 is the output-channel axis that grouped palettes split.
        config (`PaletteConfig`): bits, mode and granularity.
        solver (`str`, defaults to `"auto"`): the 1-D k-means solver (see `workbench.palettes.kmeans.kmeans_1d`), or
            `"binned"`: an approximate k-means palette at any size (`kmeans_float16(binned=True)`, milliseconds
            where an 8-bit fit takes a second), for estimates only: not what Core ML stores.
        importance (`np.ndarray`, *optional*): for data-aware configs (required there, ignored by the others):
            finite importances >= 0 broadcastable to the weight's shape, e.g.
            `Importance.for_weight(name, weight.shape)` (the input channel's second moment of every weight).

    Returns:
        `Palette` with a float16 LUT per channel group and uint8 indices in the weight's shape.
    """
    if solver == BINNED and config.mode != "kmeans":
        raise ValueError(f"the {BINNED!r} solver approximates plain k-means palettes only, not {config.key!r}")
    w = _as_float16_numpy(weight)
    channels = w.shape[0]
    group_size = config.group_size if config.granularity == "per_grouped_channel" else channels
    if channels % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {channels} output channels of a weight of shape {w.shape}"
        )
    importance = _importance_array(importance, config, w.shape)
    luts, indices = [], []
    small_groups = (
        config.mode == "kmeans" and solver != BINNED and w.size // (channels // group_size) < KMEANS_1D_MIN_NUMEL
    )
    # scikit-learn's path: pinned once per weight, not per group (setting the pin costs ~5 ms)
    with sklearn_single_thread() if small_groups else nullcontext():
        for start in range(0, channels, group_size):
            group = w[start : start + group_size]
            values = group.reshape(-1)
            if config.mode == "kmeans":
                lut, idx = _fit_group_kmeans(values, config.nbits, solver)
            elif config.data_aware:
                lut, idx = _fit_group_weighted(values, config.nbits, solver, importance[start : start + group_size])
            else:
                lut, idx = _fit_group_uniform(values, config.nbits)
            luts.append(lut.astype(np.float16))
            indices.append(np.asarray(idx).astype(np.uint8, copy=False).reshape(group.shape))
    return Palette(np.stack(luts), indices[0] if len(indices) == 1 else np.concatenate(indices, axis=0), config)


@torch.no_grad()
def palettize_tensor(weight: torch.Tensor, config: PaletteConfig, importance=None) -> torch.Tensor:
    """The weight with every value replaced by its palette entry; same shape, dtype and device (`importance`:
    see `fit_palette`)."""
    dense = fit_palette(weight, config, importance=importance).dense()
    return torch.from_numpy(dense).to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def linear_quantize_tensor(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Simulated 8-bit linear quantization, the reference's baselines.

    - `per_channel=False`: asymmetric uint8 over the whole tensor, the reference's `linear_8bit`:
      `scale = (max - min) / 255`, `zero = round(-min / scale)`, `q = clip(round(w / scale) + zero, 0, 255)`.
    - `per_channel=True`: symmetric int8 per output channel (coremltools' default `linear_symmetric`):
      `scale_c = max|w_c| / 127`, `q = clip(round(w / scale_c), -127, 127)`.

    Returns `(q - zero) * scale` in float16 precision, cast back to the weight's dtype.
    """
    w = weight.detach().float()
    if per_channel:
        scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127.0
        scale = scale.view(-1, *([1] * (w.dim() - 1)))
        q = torch.clamp(torch.round(w / scale), -127, 127)
        out = q * scale
    else:
        lo, hi = w.min().clamp_max(0.0), w.max().clamp_min(0.0)
        scale = ((hi - lo) / 255.0).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 255)
        out = (q - zero) * scale
    return out.half().to(dtype=weight.dtype)
