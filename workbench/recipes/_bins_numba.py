"""Numba kernels behind `workbench.recipes.pricing`: sums over a weight's bins in one pass, without index arrays.

A bin is a segment of the flat weight and a float16 bit pattern: `segment_index * 65536 + bits`. Each kernel walks
the weight once, in order, adding float64 terms, so its sums are deterministic; torch's `index_add_` would need an
int64 key per weight (8 bytes each, the UNet's size again on a full-size model) and a float64 copy of every term.
Imported only when pricing asks for them (numba is optional at run time: `pricing` falls back to `np.bincount`).
"""

from __future__ import annotations

import numpy as np

from workbench.palettes._kmeans_numba import _jit

PATTERNS = 1 << 16


@_jit
def bin_stats(bits, w, imp, segment):
    """Per bin: the sum of the importance `imp` (all ones if empty), of `imp * w`, and the first flat position;
    and the sum of `imp * w * w` over the weight. `bits` are the float16 patterns of the float32 weights `w`."""
    n = len(bits)
    size = (n // segment) * PATTERNS
    h, h1 = np.zeros(size), np.zeros(size)
    first = np.full(size, n, dtype=np.int64)
    h2 = 0.0
    weighted = len(imp) > 0
    for start in range(0, n, segment):
        base = (start // segment) * PATTERNS
        for i in range(start, start + segment):
            k = base + bits[i]
            m = np.float64(imp[i]) if weighted else 1.0
            wi = np.float64(w[i])
            h[k] += m
            h1[k] += m * wi
            h2 += m * wi * wi
            if first[k] == n:
                first[k] = i
    return h, h1, first, h2


@_jit
def bin_gradient(bits, w, g, segment):
    """Per bin the sum of the gradient `g`, and `<g, w>` over the weight (float64)."""
    n = len(bits)
    sums = np.zeros((n // segment) * PATTERNS)
    dot = 0.0
    for start in range(0, n, segment):
        base = (start // segment) * PATTERNS
        for i in range(start, start + segment):
            gi = np.float64(g[i])
            sums[base + bits[i]] += gi
            dot += gi * np.float64(w[i])
    return sums, dot
