"""Numba kernels behind `workbench.palettes.kmeans`: coremltools' 1-D k-means, re-done operation for operation.

Imported only when a fit asks for them (never by `import workbench.palettes.kmeans`), since it imports numba.

`cluster_sorted` computes what coremltools 9's vendored kmeans1d (`deps/kmeans1d/kmeans1d/_core.cpp`,
Daniel Steinberg's, `cluster_with_weights`) computes, with every floating-point operation on the same
operands in the same order, so its labels and centroids are the same bits:

- prefix sums `cumw[i+1] = w + cumw[i]`, `cumsum[i+1] = w*x + cumsum[i]`, `cumsum2[i+1] = w*x*x + cumsum2[i]`;
- the cost of points i..j: `w = cumw[j+1] - cumw[i]`, `mu = (cumsum[j+1] - cumsum[i]) / w`,
  `r = cumsum2[j+1] - cumsum2[i]`, `r += w*(mu*mu)`, `r -= (2*mu)*(cumsum[j+1] - cumsum[i])`, 0 if j < i;
- each DP row's minima by the same SMAWK (reduce keeps the earlier column on a tie, interpolation takes the
  first strict minimum) on the same n x n matrix `C(i, j) = D[m-1][col] + cost(j, i)`, where
  `col = i if i < j - 1 else j - 1` on an unsigned type, so column 0 reads `D[m-1][i]`;
- the backtracking with its running-mean centroid `c += (x[i] - c) * weight(i, i) / weight(t, i)`.

The recursion is unrolled: the rows of SMAWK's depth d are `(m + 1) * 2**d - 1`, so one pass down runs every
REDUCE and one pass up every INTERPOLATE, in preallocated buffers. The compiled code keeps strict IEEE
semantics (no fastmath: no FMA contraction, no reassociation) and C's division by zero (`error_model="numpy"`).
It releases the GIL, as coremltools' ctypes call does, so palette fits can run in background threads.
"""

from __future__ import annotations

import numba
import numpy as np


def _jit(function):
    """`numba.njit`, its machine code cached on disk when numba finds a writable place for it.

    numba caches beside this file (`workbench/__pycache__`) or, where that is read-only (a system
    site-packages), in its user-wide directory (`~/.cache/numba`, or `$NUMBA_CACHE_DIR`). Where neither is
    writable `cache=True` raises at decoration; then compile once per process instead.
    """
    options = {"nogil": True, "error_model": "numpy"}  # no fastmath: IEEE operations in source order
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, **options)(function)


@_jit
def _cost(cumw, cumsum, cumsum2, i, j):
    """`WeightedCostCalculator::calc(i, j)`: weighted squared deviation of points i..j from their mean."""
    if j < i:
        return 0.0
    w = cumw[j + 1] - cumw[i]
    mu = (cumsum[j + 1] - cumsum[i]) / w
    result = cumsum2[j + 1] - cumsum2[i]
    result += w * (mu * mu)
    result -= (2.0 * mu) * (cumsum[j + 1] - cumsum[i])
    return result


@_jit
def _lookup(dprev, cumw, cumsum, cumsum2, i, j):
    """`C(i, j)` of the DP row: `D[m-1][col] + cost(j, i)`, with the C++ `col` (j = 0 wraps to i)."""
    col = i if (j == 0 or i < j - 1) else j - 1
    return dprev[col] + _cost(cumw, cumsum, cumsum2, j, i)


@_jit
def _reduce(n_rows, depth, src, src_len, dst, kept_values, dprev, cumw, cumsum, cumsum2):
    """SMAWK's REDUCE on the rows `(m + 1) * 2**depth - 1`: the surviving columns of `src` into `dst`.

    `kept_values[p]` holds `C(rows[p], dst[p])`, the value each comparison at stack depth p reads again.
    """
    top = 0
    for c in range(src_len):
        col = src[c]
        while top > 0:
            if _lookup(dprev, cumw, cumsum, cumsum2, (top << depth) - 1, col) >= kept_values[top - 1]:
                break
            top -= 1
        if top < n_rows:
            dst[top] = col
            kept_values[top] = _lookup(dprev, cumw, cumsum, cumsum2, ((top + 1) << depth) - 1, col)
            top += 1
    return top


@_jit
def _interpolate(n_rows, depth, cols, n_cols, position, argmins, dcur, dprev, cumw, cumsum, cumsum2):
    """SMAWK's INTERPOLATE: the even rows of this depth, between the argmins of the odd rows around them."""
    for idx in range(n_cols):
        position[cols[idx]] = idx
    start = 0
    for r in range(0, n_rows, 2):
        row = ((r + 1) << depth) - 1
        stop = n_cols - 1
        if r < n_rows - 1:
            stop = position[argmins[((r + 2) << depth) - 1]]
        argmin = cols[start]
        best = _lookup(dprev, cumw, cumsum, cumsum2, row, argmin)
        for c in range(start + 1, stop + 1):
            value = _lookup(dprev, cumw, cumsum, cumsum2, row, cols[c])
            if value < best:
                argmin = cols[c]
                best = value
        argmins[row] = argmin
        dcur[row] = best
        start = stop


@_jit
def _smawk_row(dprev, dcur, argmins, cumw, cumsum, cumsum2, cols, offsets, position, kept_values):
    """One DP row: `argmins[i]`, `dcur[i]` = SMAWK's argmin and minimum of `C(i, .)` over all n columns."""
    n = len(dprev)
    depth = 0
    while (n >> depth) > 0:  # down: REDUCE at each depth; the columns of depth d+1 are the survivors of d
        src = cols[offsets[depth] : offsets[depth + 1]]
        dst = cols[offsets[depth + 1] :]
        kept = _reduce(n >> depth, depth, src, len(src), dst, kept_values, dprev, cumw, cumsum, cumsum2)
        offsets[depth + 2] = offsets[depth + 1] + kept
        depth += 1
    for d in range(depth - 1, -1, -1):  # up: INTERPOLATE, deepest first
        survivors = cols[offsets[d + 1] : offsets[d + 2]]
        _interpolate(n >> d, d, survivors, len(survivors), position, argmins, dcur, dprev, cumw, cumsum, cumsum2)


@_jit
def cluster_sorted(x, w, k):
    """`cluster_with_weights` on points already in ascending order: labels (int64) and k centroids."""
    n = len(x)
    cumw, cumsum, cumsum2 = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1)
    for i in range(n):
        cumw[i + 1] = w[i] + cumw[i]
        cumsum[i + 1] = w[i] * x[i] + cumsum[i]
        cumsum2[i + 1] = w[i] * x[i] * x[i] + cumsum2[i]
    argmins = np.zeros((k, n), dtype=np.int32)  # T in the C++: first point of the last cluster
    dprev, dcur = np.empty(n), np.empty(n)
    for i in range(n):
        dprev[i] = _cost(cumw, cumsum, cumsum2, 0, i)
    n_levels = 1
    while (n >> n_levels) > 0:
        n_levels += 1
    cols = np.empty(3 * n, dtype=np.int32)  # depth 0's columns 0..n-1, then each depth's survivors
    cols[:n] = np.arange(n)
    offsets = np.zeros(n_levels + 2, dtype=np.int64)
    offsets[1] = n
    position = np.zeros(n, dtype=np.int32)
    kept_values = np.empty(n)
    for m in range(1, k):
        _smawk_row(dprev, dcur, argmins[m], cumw, cumsum, cumsum2, cols, offsets, position, kept_values)
        dprev, dcur = dcur, dprev
    return _backtrack(x, cumw, argmins)


@_jit
def _backtrack(x, cumw, argmins):
    """Labels from the argmin table, and each cluster's running weighted mean, as the C++ computes them."""
    k, n = argmins.shape
    labels = np.zeros(n, dtype=np.int64)
    centroids = np.zeros(k)
    t, m, end = n, k - 1, n - 1
    while True:
        stop = t
        t = argmins[m, end]
        centroid = 0.0
        for i in range(t, stop):
            labels[i] = m
            centroid += (x[i] - centroid) * (cumw[i + 1] - cumw[i]) / (cumw[i + 1] - cumw[t])
        centroids[m] = centroid
        m -= 1
        end = t - 1
        if t <= 0:
            return labels, centroids


@_jit
def histogram_uint16(bits):
    """Occurrences of each of the 65,536 values of a flat uint16 array (np.bincount without its intp copy)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for b in bits:
        counts[b] += 1
    return counts


@_jit
def weighted_histogram_uint16(bits, weights):
    """The sum of `weights[i]` over the elements `i` of each of the 65,536 values of a flat uint16 array."""
    sums = np.zeros(1 << 16)
    for i in range(len(bits)):
        sums[bits[i]] += weights[i]
    return sums


@_jit
def gather_uint8(table, bits):
    """`table[bits]` for a uint8 table of 65,536 entries and a flat uint16 array, without an intp index."""
    out = np.empty(len(bits), dtype=np.uint8)
    for i in range(len(bits)):
        out[i] = table[bits[i]]
    return out
