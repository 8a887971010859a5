"""Exact 1-D k-means on float16 weights.

A float16 tensor has at most 65,536 distinct bit patterns, so clustering its values is clustering a
short sorted list of distinct values weighted by how often each occurs. Optimal 1-D k-means on sorted
points splits them into contiguous runs, which dynamic programming finds exactly (Gronlund et al. 2017,
"Fast Exact k-Means, k-Medians and Bregman Divergence Clustering in 1D").

Two things here make it fast where the reference is slow:

- `unique_float16` counts values with a histogram over the uint16 view (one linear pass) instead of
  `np.unique`'s sort, which is almost all the time the reference spends on a large layer;
- the dynamic program runs on the distinct values only (at most 65,536), in coremltools' own compiled
  SMAWK solver when it is importable, else in `kmeans_1d_numpy` (vectorised divide and conquer).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_N_PATTERNS = 1 << 16


class UniqueValues(NamedTuple):
    values: np.ndarray  # sorted distinct values, float16
    counts: np.ndarray  # occurrences of each value, int64
    inverse: np.ndarray  # index into `values` for every input element, flat, intp


def unique_float16(x: np.ndarray) -> UniqueValues:
    """`np.unique(x, return_inverse=True, return_counts=True)` for float16, in linear time.

    Like `np.unique`, -0.0 and +0.0 are one value. NaNs are rejected: a weight with NaNs has no palette.

    Args:
        x (`np.ndarray`): float16 array of any shape.

    Returns:
        `UniqueValues`: sorted distinct values, their counts, and the flat inverse index.
    """
    if x.dtype != np.float16:
        raise TypeError(f"unique_float16 needs a float16 array, got {x.dtype}")
    bits = x.reshape(-1).view(np.uint16)
    bits = np.where(bits == 0x8000, np.uint16(0), bits)  # fold -0.0 into +0.0, as np.unique does
    counts = np.bincount(bits, minlength=_N_PATTERNS)
    present = np.flatnonzero(counts).astype(np.uint16)
    values = present.view(np.float16)
    if np.isnan(values).any():
        raise ValueError("cannot palettize a tensor that contains NaN")
    order = np.argsort(values, kind="stable")
    values, present = values[order], present[order]
    rank = np.empty(_N_PATTERNS, dtype=np.intp)
    rank[present] = np.arange(len(present))
    return UniqueValues(values, counts[present].astype(np.int64), rank[bits])


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


def kmeans_1d(x: np.ndarray, weights: np.ndarray, k: int, solver: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Optimal weighted 1-D k-means of sorted points; see `kmeans_1d_numpy` for the contract.

    Args:
        solver (`str`, defaults to `"auto"`): `"coremltools"` (the compiled solver coremltools itself
            uses, so LUTs are bit-exact with its packages), `"numpy"`, or `"auto"` (coremltools when
            importable, else numpy).
    """
    if solver not in ("auto", "coremltools", "numpy"):
        raise ValueError(f"unknown k-means solver {solver!r}; valid: 'auto', 'coremltools', 'numpy'")
    if solver != "numpy":
        result = _kmeans_1d_coremltools(x, weights, min(k, len(x)))
        if result is not None:
            return result
        if solver == "coremltools":
            raise ImportError("coremltools' k-means solver (coremltools._deps.kmeans1d) is not importable")
    return kmeans_1d_numpy(x, weights, k)
