"""Exact 1-D k-means on float16 weights.

A float16 tensor has at most 65,536 distinct bit patterns, so clustering its values is clustering a
short sorted list of distinct values weighted by how often each occurs. Optimal 1-D k-means on sorted
points splits them into contiguous runs, which dynamic programming finds exactly (Gronlund et al. 2017,
"Fast Exact k-Means, k-Medians and Bregman Divergence Clustering in 1D").

What makes it fast where coremltools is slow on a large layer:

- `kmeans_float16` counts the uint16 bit patterns (one linear pass, no sort), and labels every weight
  through a 65,536-entry table of bit pattern -> cluster (one gather, no intp inverse index);
- the dynamic program runs on the distinct values only (at most 65,536), in `workbench.palettes._kmeans_numba`:
  coremltools' own SMAWK solver re-done in numba with the same floating-point operations in the same order,
  so its LUTs are the same bits, several times faster. Without numba, coremltools' compiled solver runs
  it, else `kmeans_1d_numpy` (vectorised divide and conquer).

numba is optional and imported on the first fit that uses it, never by `import workbench.palettes.kmeans`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import numpy as np

_N_PATTERNS = 1 << 16
_NEGATIVE_ZERO = 0x8000
SOLVERS = ("auto", "numba", "coremltools", "numpy")
# bins of an approximate palette (`kmeans_float16(binned=True)`): on the demo model's layers an 8-bit one is within
# 2.5-3.5 % of the optimal error with 1,024 bins (0.8 % with 2,048, at twice the time: the solver is O(k * bins))
BINNED_PALETTE_BINS = 1024


@functools.cache
def _jit_kernels() -> ModuleType | None:
    """`workbench.palettes._kmeans_numba` (compiled on first use, cached on disk), or None when numba is missing."""
    try:
        import workbench.palettes._kmeans_numba as _kmeans_numba
    except ImportError:
        return None
    return _kmeans_numba


class UniqueValues(NamedTuple):
    values: np.ndarray  # sorted distinct values, float16
    counts: np.ndarray  # occurrences of each value, int64
    inverse: np.ndarray  # index into `values` for every input element, flat, intp


class _Histogram(NamedTuple):
    patterns: np.ndarray  # uint16 bit patterns of the distinct values, in ascending order of value
    counts: np.ndarray  # occurrences of each, int64


def _flat_bits(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float16:
        raise TypeError(f"expected a float16 array, got {x.dtype}")
    return np.ascontiguousarray(x).reshape(-1).view(np.uint16)


def _histogram(bits: np.ndarray) -> _Histogram:
    """The distinct float16 values of a flat uint16 view, -0.0 counted as +0.0 (as `np.unique` does)."""
    kernels = _jit_kernels()
    counts = kernels.histogram_uint16(bits) if kernels else np.bincount(bits, minlength=_N_PATTERNS)
    counts[0] += counts[_NEGATIVE_ZERO]
    counts[_NEGATIVE_ZERO] = 0
    patterns = np.flatnonzero(counts).astype(np.uint16)
    values = patterns.view(np.float16).astype(np.float32)  # float32: numpy 2.2-2.3 sorts float16 wrongly on AVX-512
    if np.isnan(values).any():
        raise ValueError("cannot palettize a tensor that contains NaN")
    patterns = patterns[np.argsort(values, kind="stable")]
    return _Histogram(patterns, counts[patterns].astype(np.int64))


def unique_float16(x: np.ndarray) -> UniqueValues:
    """`np.unique(x, return_inverse=True, return_counts=True)` for float16, in linear time.

    Like `np.unique`, -0.0 and +0.0 are one value. NaNs are rejected: a weight with NaNs has no palette.

    Args:
        x (`np.ndarray`): float16 array of any shape.

    Returns:
        `UniqueValues`: sorted distinct values, their counts, and the flat inverse index.
    """
    bits = _flat_bits(x)
    hist = _histogram(bits)
    rank = np.zeros(_N_PATTERNS, dtype=np.intp)
    rank[hist.patterns] = np.arange(len(hist.patterns))
    rank[_NEGATIVE_ZERO] = rank[0]
    return UniqueValues(hist.patterns.view(np.float16), hist.counts, rank[bits])


@dataclass(frozen=True)
class Float16Clusters:
    """Exact 1-D k-means of a float16 array's values.

    Attributes:
        centroids (`np.ndarray`): float64, shape (min(k, distinct values),), ascending.
        labels (`np.ndarray`): uint8, the cluster of every element of the array, flat.
    """

    centroids: np.ndarray
    labels: np.ndarray


def _weighted_histogram(bits: np.ndarray, weights: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """The sum of `weights` over the elements of each bit pattern in `patterns` (-0.0 summed into +0.0), float64."""
    weights = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != bits.shape:
        raise ValueError(f"kmeans_float16 needs one weight per element: {weights.size} weights, {bits.size} elements")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("kmeans_float16 weights must be finite and >= 0")
    kernels = _jit_kernels()
    sums = kernels.weighted_histogram_uint16(bits, weights) if kernels else np.bincount(bits, weights, _N_PATTERNS)
    sums[0] += sums[_NEGATIVE_ZERO]
    return sums[patterns]


def _cluster_weighted(values: np.ndarray, weights: np.ndarray, k: int, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """`kmeans_1d` of sorted distinct values whose weights may be 0: those carry no cost, so the optimum
    clusters the others and gives each weightless value the nearest centroid's label."""
    positive = weights > 0
    if positive.all():
        return kmeans_1d(values, weights, k, solver=solver)
    labels, centroids = kmeans_1d(values[positive], weights[positive], k, solver=solver)
    all_labels = np.empty(len(values), dtype=labels.dtype)
    all_labels[positive] = labels
    edges = (centroids[1:] + centroids[:-1]) / 2  # centroids ascend: nearest = which interval between midpoints
    all_labels[~positive] = np.searchsorted(edges, values[~positive].astype(np.float64))
    return all_labels, centroids


def kmeans_float16(
    x: np.ndarray, k: int, solver: str = "auto", weights: np.ndarray | None = None, binned: bool = False
) -> Float16Clusters:
    """Optimal k-means of a float16 array's values: coremltools' 1-D k-means path, without its big passes.

    coremltools runs `np.unique(x, return_inverse=True, return_counts=True)`, clusters the distinct values
    weighted by their counts (`kmeans_1d`) and gathers `labels[inverse]`; the same result comes from a
    histogram of the bit patterns and a gather through a 65,536-entry uint8 table (-0.0 labelled as +0.0).

    With `weights` (an importance per element) it minimises `sum_i weights[i] * (x[i] - centroid(i))**2`
    exactly: elements with the same float16 value always share a cluster, so each distinct value is one point
    whose weight is the sum of its elements' weights, and the centroids are weighted means. Values whose
    weights sum to 0 cost nothing anywhere and take the nearest centroid. `weights=None` is the count-weighted
    (plain) k-means above, bit for bit.

    Args:
        x (`np.ndarray`): float16 array of any shape, without NaN.
        k (`int`): clusters wanted, 1 <= k <= 256; fewer when `x` has fewer distinct values.
        solver (`str`, defaults to `"auto"`): see `kmeans_1d`.
        weights (`np.ndarray`, *optional*): finite weights >= 0, one per element of `x` (any shape of that size).
        binned (`bool`, defaults to False): approximate instead: the distinct values clustered by
            `kmeans_1d_binned` in at most `BINNED_PALETTE_BINS` bins and each labelled with its nearest centroid
            (plain k-means only). Milliseconds where an exact 8-bit fit takes a second; for estimates (the
            refinement prices options with it), never for export.

    Returns:
        `Float16Clusters`: the centroids and a uint8 label for every element.
    """
    if not 1 <= k <= 256:
        raise ValueError(f"kmeans_float16 labels with uint8, so 1 <= k <= 256; got k={k}")
    bits = _flat_bits(x)
    hist = _histogram(bits)
    values = hist.patterns.view(np.float16)
    if binned:
        if weights is not None:
            raise ValueError("binned k-means approximates plain k-means only: pass weights=None")
        points = values.astype(np.float64)
        centroids, _ = kmeans_1d_binned(points, hist.counts, k, max_bins=BINNED_PALETTE_BINS)
        labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, points)  # the nearest centroid
    elif weights is None:
        labels, centroids = kmeans_1d(values, hist.counts, k, solver=solver)
    else:
        summed = _weighted_histogram(bits, weights, hist.patterns)
        if not summed.any():  # no element matters more than another: plain k-means
            summed = hist.counts.astype(np.float64)
        labels, centroids = _cluster_weighted(values, summed, k, solver)
    table = np.zeros(_N_PATTERNS, dtype=np.uint8)
    table[hist.patterns] = labels
    table[_NEGATIVE_ZERO] = table[0]
    kernels = _jit_kernels()
    return Float16Clusters(centroids, kernels.gather_uint8(table, bits) if kernels else table[bits])


def merge_bins(values: np.ndarray, counts: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Consecutive sorted points merged into at most `bins` bins: (means, weights, within-bin sum of squared
    deviations); the points themselves (and 0.0) when there are no more than `bins`.

    Half the edges split the weight equally (where the points are dense), half the range of values (the tails,
    where optimal clusters hold little weight). Equal-weight edges alone put too few bins in the tails, and an
    8-bit clustering of such bins falls well short of the optimum, worst on heavy-tailed tensors; with both kinds
    of edges it stays close to it (the figures are in docs/benchmarks.md).
    """
    if len(values) <= bins:
        return values, counts, 0.0
    half = bins // 2
    by_weight = np.searchsorted(np.cumsum(counts), np.linspace(0, counts.sum(), half + 1)[1:-1], side="right")
    by_value = np.searchsorted(values, np.linspace(values[0], values[-1], bins - half + 1)[1:-1], side="right")
    starts = np.unique(np.concatenate([[0], by_weight, by_value]))
    starts = starts[starts < len(values)]
    w = np.add.reduceat(counts, starts)
    s1 = np.add.reduceat(counts * values, starts)
    s2 = np.add.reduceat(counts * values * values, starts)
    means = s1 / w
    return means, w, float(np.maximum(s2 - s1 * means, 0.0).sum())


def kmeans_1d_binned(
    x: np.ndarray, weights: np.ndarray, k: int, bins_per_cluster: int = 32, max_bins: int = 2048
) -> tuple[np.ndarray, float]:
    """Approximate weighted 1-D k-means of sorted points, in milliseconds at any k: the points merged into at most
    `min(bins_per_cluster * k, max_bins)` bins (`merge_bins`), the bins clustered exactly.

    Returns:
        `(centroids, error)`: the centroids (float64, ascending, at most k) and the points' squared error to their
        bins' clustering (within-bin plus clustering), an upper bound of the optimum that is exact when no bins
        merge and within a few percent otherwise.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    means, bin_weights, within = merge_bins(x, w, min(bins_per_cluster * k, max_bins))
    labels, centroids = kmeans_1d(means, bin_weights, k)
    centroids = np.asarray(centroids, dtype=np.float64)
    return centroids, within + float((bin_weights * (means - centroids[labels]) ** 2).sum())


def _segment_cost(cw: np.ndarray, cs: np.ndarray, cq: np.ndarray, j: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Weighted sum of squared deviations of points j..i (inclusive) from their mean, from prefix sums."""
    w = cw[i + 1] - cw[j]
    s = cs[i + 1] - cs[j]
    return np.maximum((cq[i + 1] - cq[j]) - s * s / w, 0.0)


def kmeans_1d_numpy(x: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted k-means of sorted 1-D points, by dynamic programming in numpy.

    D[m][i], the least cost of putting points 0..i in m+1 clusters, is
    min over j of D[m-1][j-1] + cost(j, i). The best j never decreases as i grows, so each row is
    filled by divide and conquer; all sub-problems of one recursion depth are solved in one vectorised
    step, so a row costs O(n log n) work in O(log n) numpy calls.

    Args:
        x (`np.ndarray`): sorted points (ascending), shape (n,).
        weights (`np.ndarray`): positive weight of each point, shape (n,).
        k (`int`): number of clusters, 1 <= k.

    Returns:
        `(labels, centroids)`: cluster of each point (int64, non-decreasing) and the weighted mean of
        each cluster (float64, shape (min(k, n),)).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n = len(x)
    k = min(k, n)
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 and at least one point, got k={k}, n={n}")
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cs = np.concatenate([[0.0], np.cumsum(w * x)])
    cq = np.concatenate([[0.0], np.cumsum(w * x * x)])

    prev = _segment_cost(cw, cs, cq, np.zeros(n, dtype=np.int64), np.arange(n))
    starts = np.zeros((k, n), dtype=np.int64)  # starts[m][i]: first point of the last cluster
    for m in range(1, k):
        cur = np.full(n, np.inf)
        # Segments of rows [ilo, ihi] whose best start lies in [jlo, jhi].
        ilo, ihi = np.array([m]), np.array([n - 1])
        jlo, jhi = np.array([m]), np.array([n - 1])
        while len(ilo):
            mid = (ilo + ihi) // 2
            jend = np.minimum(jhi, mid)
            lengths = jend - jlo + 1
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            seg = np.repeat(np.arange(len(mid)), lengths)
            j = jlo[seg] + np.arange(lengths.sum()) - offsets[seg]
            i = mid[seg]
            value = prev[j - 1] + _segment_cost(cw, cs, cq, j, i)
            best = np.minimum.reduceat(value, offsets)
            first = np.where(value == best[seg], np.arange(len(value)), len(value))
            best_j = j[np.minimum.reduceat(first, offsets)]
            cur[mid], starts[m, mid] = best, best_j
            left, right = ilo <= mid - 1, mid + 1 <= ihi
            ilo, ihi, jlo, jhi = (
                np.concatenate([ilo[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, ihi[right]]),
                np.concatenate([jlo[left], best_j[right]]),
                np.concatenate([best_j[left], jhi[right]]),
            )
        prev = cur

    labels = np.empty(n, dtype=np.int64)
    end = n - 1
    for m in range(k - 1, 0, -1):
        start = starts[m, end]
        labels[start : end + 1] = m
        end = start - 1
    labels[: end + 1] = 0
    sums = np.bincount(labels, weights=w * x, minlength=k)
    totals = np.bincount(labels, weights=w, minlength=k)
    return labels, sums / totals


def _kmeans_1d_coremltools(x: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The same optimum from coremltools' vendored compiled solver (its tie-breaking, its rounding)."""
    try:
        from coremltools._deps import _HAS_KMEANS1D, _kmeans1d
    except ImportError:
        return None
    if not _HAS_KMEANS1D:
        return None
    result = _kmeans1d.cluster(x, k, weights=weights)
    return np.asarray(result.clusters, dtype=np.int64), np.asarray(result.centroids, dtype=np.float64)


def _kmeans_1d_numba(x: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """coremltools' solver re-done in numba (`workbench.palettes._kmeans_numba`): the same bits, or None without numba.

    Bit-exact with `coremltools._deps._kmeans1d.cluster(x, k, weights=weights)` whenever the points are
    distinct (as distinct float16 values are); coremltools' `std::sort` may order equal points either way.
    """
    kernels = _jit_kernels()
    if kernels is None:
        return None
    x = np.asarray(x, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    order = None if np.all(x[1:] >= x[:-1]) else np.argsort(x, kind="stable")
    if order is None:
        return kernels.cluster_sorted(x, weights, k)
    sorted_labels, centroids = kernels.cluster_sorted(x[order], weights[order], k)
    labels = np.empty_like(sorted_labels)
    labels[order] = sorted_labels
    return labels, centroids


def kmeans_1d(x: np.ndarray, weights: np.ndarray, k: int, solver: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted 1-D k-means of sorted points; see `kmeans_1d_numpy` for the contract.

    Args:
        solver (`str`, defaults to `"auto"`): `"numba"` (coremltools' algorithm compiled by numba: the same
            bits as its solver, faster), `"coremltools"` (the compiled solver coremltools itself uses, so LUTs
            are bit-exact with its packages), `"numpy"`, or `"auto"` (the first of numba, coremltools, numpy
            that is importable).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown k-means solver {solver!r}; valid: {', '.join(map(repr, SOLVERS))}")
    n = len(x)
    if k < 1 or n < 1:
        raise ValueError(f"k-means needs k >= 1 and at least one point, got k={k}, n={n}")
    if len(weights) != n:
        raise ValueError(f"k-means needs one weight per point, got {len(weights)} weights for {n} points")
    k = min(k, n)
    if solver in ("auto", "numba"):
        result = _kmeans_1d_numba(x, weights, k)
        if result is not None:
            return result
        if solver == "numba":
            raise ImportError("the 'numba' k-means solver needs numba (pip install numba), which is not importable")
    if solver in ("auto", "coremltools"):
        result = _kmeans_1d_coremltools(x, weights, k)
        if result is not None:
            return result
        if solver == "coremltools":
            raise ImportError("coremltools' k-means solver (coremltools._deps.kmeans1d) is not importable")
    return kmeans_1d_numpy(x, weights, k)
