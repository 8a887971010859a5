import itertools

import numpy as np
import pytest

from workbench.kmeans import kmeans_1d, kmeans_1d_numpy, unique_float16


def _cost(x, w, labels):
    total = 0.0
    for c in np.unique(labels):
        m = labels == c
        mean = np.sum(w[m] * x[m]) / np.sum(w[m])
        total += np.sum(w[m] * (x[m] - mean) ** 2)
    return total


def _brute_force(x, w, k):
    """Least cost over every assignment of n points to k labels (not only contiguous runs)."""
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        best = min(best, _cost(x, w, np.array(labels)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kmeans_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    n = 7
    x = np.sort(rng.standard_normal(n))
    w = rng.integers(1, 5, n).astype(float)
    labels, centroids = kmeans_1d_numpy(x, w, k)
    assert _cost(x, w, labels) == pytest.approx(_brute_force(x, w, k), rel=1e-12, abs=1e-12)
    assert np.all(np.diff(labels) >= 0), "clusters of sorted points must be contiguous runs"
    assert len(centroids) == k


@pytest.mark.parametrize("k", [2, 16, 64])
def test_numpy_solver_agrees_with_coremltools_solver(k):
    rng = np.random.default_rng(1)
    u = unique_float16((rng.standard_normal(50_000) * 0.02).astype(np.float16))
    l_np, c_np = kmeans_1d(u.values, u.counts, k, solver="numpy")
    l_ct, c_ct = kmeans_1d(u.values, u.counts, k, solver="coremltools")
    assert np.array_equal(l_np, l_ct)
    assert np.array_equal(c_np.astype(np.float16), c_ct.astype(np.float16))


def test_unique_float16_equals_np_unique():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 33)) * 0.1).astype(np.float16)
    x[0, :4] = [0.0, -0.0, np.inf, -np.inf]
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    u = unique_float16(x)
    assert np.array_equal(u.values, values)
    assert np.array_equal(u.counts, counts)
    assert np.array_equal(u.inverse, inverse.reshape(-1))


def test_unique_float16_rejects_nan_and_wrong_dtype():
    with pytest.raises(ValueError, match="NaN"):
        unique_float16(np.array([1.0, np.nan], dtype=np.float16))
    with pytest.raises(TypeError, match="float16"):
        unique_float16(np.zeros(3, dtype=np.float32))


def test_more_clusters_than_points_gives_every_point_its_own_cluster():
    x = np.array([0.0, 1.0, 2.5])
    labels, centroids = kmeans_1d_numpy(x, np.ones(3), 8)
    assert labels.tolist() == [0, 1, 2]
    assert np.array_equal(centroids, x)
