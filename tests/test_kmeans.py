import itertools
import subprocess
import sys

import numpy as np
import pytest

from workbench.palettes import kmeans
from workbench.palettes.kmeans import kmeans_1d, kmeans_1d_numpy, kmeans_float16, unique_float16


def _coremltools_cluster():
    """coremltools' compiled 1-D k-means, the reference of the bit-exact checks: a required dependency, reached by a
    private name, so an upgrade that moves it fails these tests rather than skipping them."""
    from coremltools import _deps

    assert _deps._HAS_KMEANS1D, "coremltools' compiled kmeans1d is not importable: the bit-exact reference is gone"
    return _deps._kmeans1d.cluster


def _needs_numba():
    """numba is a required dependency (pyproject.toml): its absence fails the numba solver's tests."""
    import numba  # noqa: F401


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


def _points(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Distinct points (float64) and positive weights of one of the shapes the solvers must agree on."""
    if kind == "float16_counts":  # what fit_palette clusters: distinct float16 values and their counts
        x = np.unique(rng.standard_t(4, 4 * n).astype(np.float16))[:n].astype(np.float64)
        return x, rng.geometric(0.01, len(x)).astype(np.float64)
    if kind == "equal_spacing_equal_weights":  # every split point ties in exact arithmetic
        return np.arange(n, dtype=np.float64), np.ones(n)
    if kind == "adjacent_float16":  # consecutive bit patterns: values one float16 ulp apart
        start = int(rng.integers(0x3000, 0x3800))
        return np.arange(start, start + n, dtype=np.uint16).view(np.float16).astype(np.float64), np.ones(n)
    if kind == "adjacent_float64":  # one float64 ulp apart, with weights over six orders of magnitude
        x = np.nextafter(0.5, 1.0) + np.arange(n) * np.spacing(0.5)
        return x, 10.0 ** rng.uniform(0, 6, n)
    if kind == "clumps":  # a few tight clusters of near-duplicates, heavy weights on some
        centres = rng.standard_normal(5)
        x = np.unique(centres[rng.integers(0, 5, n)] + rng.integers(-3, 4, n) * 1e-12)
        return x, rng.choice([1.0, 1.0, 1e4], len(x))
    raise ValueError(kind)


KINDS = ["float16_counts", "equal_spacing_equal_weights", "adjacent_float16", "adjacent_float64", "clumps"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 4, 8, 16, 64, 256])
def test_numba_solver_is_bit_exact_with_coremltools(kind, k):
    cluster = _coremltools_cluster()
    _needs_numba()
    rng = np.random.default_rng(k)
    for n in [1, 2, 3, k - 1, k, k + 1, 2 * k + 3, 300, int(rng.integers(1, 700))]:
        x, w = _points(kind, max(n, 1), rng)
        expected = cluster(x, k, weights=w)
        labels, centroids = kmeans_1d(x, w, k, solver="numba")
        assert np.array_equal(labels, np.asarray(expected.clusters)), (kind, k, len(x))
        assert np.array_equal(centroids.view(np.uint64), np.asarray(expected.centroids).view(np.uint64)), (kind, k)


@pytest.mark.parametrize("k", [16, 256])
def test_numba_solver_is_bit_exact_at_layer_scale_and_in_any_input_order(k):
    cluster = _coremltools_cluster()
    _needs_numba()
    rng = np.random.default_rng(5)
    u = unique_float16((rng.standard_t(5, 400_000) * 0.02).astype(np.float16))
    expected = cluster(u.values, k, weights=u.counts)
    labels, centroids = kmeans_1d(u.values, u.counts, k, solver="numba")
    assert len(u.values) > 5_000
    assert np.array_equal(labels, np.asarray(expected.clusters))
    assert np.array_equal(centroids.view(np.uint64), np.asarray(expected.centroids).view(np.uint64))
    shuffle = rng.permutation(len(u.values))  # coremltools sorts its input; so does the numba solver
    labels, centroids = kmeans_1d(u.values[shuffle], u.counts[shuffle], k, solver="numba")
    assert np.array_equal(labels, np.asarray(expected.clusters)[shuffle])
    assert np.array_equal(centroids.view(np.uint64), np.asarray(expected.centroids).view(np.uint64))


def test_kmeans_float16_equals_coremltools_unique_cluster_gather():
    cluster = _coremltools_cluster()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 70)) * 0.05).astype(np.float16)
    x[0, :3] = [0.0, -0.0, -0.0]  # np.unique counts -0.0 as +0.0; so must the bit-pattern table
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    expected = cluster(values, 64, weights=counts)
    got = kmeans_float16(x, 64)
    assert got.labels.dtype == np.uint8 and got.labels.shape == (x.size,)
    assert np.array_equal(got.labels, np.asarray(expected.clusters)[inverse.reshape(-1)])
    assert np.array_equal(got.centroids.view(np.uint64), np.asarray(expected.centroids).view(np.uint64))
    with pytest.raises(ValueError, match="1 <= k <= 256; got k=512"):
        kmeans_float16(x, 512)


def test_without_numba_auto_falls_back_to_coremltools_and_numba_solver_says_what_is_missing(monkeypatch):
    cluster = _coremltools_cluster()
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((200, 60)) * 0.05).astype(np.float16)
    with_numba = kmeans_float16(x, 16)
    monkeypatch.setattr(kmeans, "_jit_kernels", lambda: None)
    without = kmeans_float16(x, 16)  # np.bincount, coremltools' solver, table[bits]
    u = unique_float16(x)
    expected = cluster(u.values, 16, weights=u.counts)
    assert np.array_equal(without.labels, np.asarray(expected.clusters)[u.inverse])
    assert np.array_equal(without.labels, with_numba.labels)
    assert np.array_equal(without.centroids, with_numba.centroids)
    with pytest.raises(ImportError, match="needs numba"):
        kmeans_1d(u.values, u.counts, 16, solver="numba")
    with pytest.raises(ValueError, match="unknown k-means solver 'fast'.*'numba'"):
        kmeans_1d(u.values, u.counts, 16, solver="fast")


def test_importing_workbench_kmeans_does_not_import_numba():
    code = "import sys, workbench.palettes.kmeans; assert 'numba' not in sys.modules, 'numba imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _weighted_sse(x, w, labels):
    """Weighted SSE of an element labelling, each cluster at its weighted mean (float64)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    total = 0.0
    for c in np.unique(labels):
        m = labels == c
        if w[m].sum() > 0:
            mean = np.sum(w[m] * x[m]) / np.sum(w[m])
            total += np.sum(w[m] * (x[m] - mean) ** 2)
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weighted_kmeans_float16_is_optimal_over_every_labelling(seed, k):
    rng = np.random.default_rng(seed)
    x = rng.choice(np.linspace(-1, 1, 5), 8).astype(np.float16)  # repeated values: their weights must add up
    w = rng.uniform(0.0, 3.0, 8) * (rng.random(8) > 0.2)  # some weights 0
    got = kmeans_float16(x, k, weights=w)
    best = min(_weighted_sse(x, w, np.array(labels)) for labels in itertools.product(range(k), repeat=len(x)))
    assert _weighted_sse(x, w, got.labels) == pytest.approx(best, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("solver", ["numpy", "numba", "coremltools"])
def test_weighted_kmeans_float16_equals_the_numpy_dp_on_summed_weights(solver):
    if solver == "coremltools":
        _coremltools_cluster()
    if solver == "numba":
        _needs_numba()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((40, 50)) * 0.05).astype(np.float16)
    w = rng.gamma(0.5, 1.0, (1, 50)) * np.ones((40, 1))  # per input channel, as data-aware palettes weight
    u = unique_float16(x)
    summed = np.bincount(u.inverse, weights=w.reshape(-1), minlength=len(u.values))
    labels, centroids = kmeans_1d_numpy(u.values.astype(np.float64), summed, 16)
    got = kmeans_float16(x, 16, solver=solver, weights=w)
    assert _weighted_sse(x.reshape(-1), w.reshape(-1), got.labels) == pytest.approx(
        _weighted_sse(u.values, summed, labels), rel=1e-9
    )
    np.testing.assert_allclose(got.centroids, centroids, rtol=1e-9)


def test_uniform_weights_give_the_plain_kmeans_bit_for_bit():
    rng = np.random.default_rng(8)
    x = (rng.standard_t(4, (300, 70)) * 0.05).astype(np.float16)
    x[0, :3] = [0.0, -0.0, -0.0]
    plain = kmeans_float16(x, 16)
    for weights in (np.ones(x.shape), np.full(x.shape, 2.0)):  # power-of-two scaling is exact
        got = kmeans_float16(x, 16, weights=weights)
        assert np.array_equal(got.labels, plain.labels)
        assert np.array_equal(got.centroids.view(np.uint64), plain.centroids.view(np.uint64))


def test_weights_move_centroids_towards_the_important_values_and_are_checked():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0] * 10, dtype=np.float16)
    w = np.where(x > 0.75, 100.0, 1.0)
    weighted, plain = kmeans_float16(x, 3, weights=w).centroids, kmeans_float16(x, 3).centroids
    assert np.abs(weighted - 1.0).min() < 0.01 and np.abs(plain - 1.0).min() >= 0.5  # resolution where weight is
    assert 2.0 in weighted
    all_zero = kmeans_float16(x, 3, weights=np.zeros(x.shape))
    assert np.array_equal(all_zero.centroids, kmeans_float16(x, 3).centroids)  # no information: plain k-means
    with pytest.raises(ValueError, match="one weight per element"):
        kmeans_float16(x, 3, weights=np.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        kmeans_float16(x, 3, weights=-np.ones(x.shape))


@pytest.mark.parametrize("k", [4, 64, 256])
def test_binned_kmeans_is_close_to_the_optimum_in_the_tails_too(k):
    """Equal-weight bins alone starved the tails (an 8-bit clustering of a Student-t tensor was 130x the optimum);
    `merge_bins` adds equal-width edges. A binned labelling is a real clustering, so never below the optimum."""
    rng = np.random.default_rng(k)
    for tails, x in ((False, rng.standard_normal(200_000)), (True, rng.standard_t(3, 200_000))):
        x = x.astype(np.float16)
        u = unique_float16(x)
        values, counts = u.values.astype(np.float64), u.counts.astype(np.float64)
        optimum = _cost(values, counts, kmeans_1d(values, counts, k)[0])
        _, bound = kmeans.kmeans_1d_binned(values, counts, k)  # 2,048 bins: what the fast sweep's errors use
        assert optimum * (1 - 1e-9) <= bound <= 1.05 * optimum
        palette = kmeans_float16(x, k, binned=True)  # fewer bins, faster: within 5 %, 30 % on heavy tails at k=256
        centroids, _ = kmeans.kmeans_1d_binned(values, counts, k, max_bins=kmeans.BINNED_PALETTE_BINS)
        assert np.array_equal(palette.centroids, centroids)
        error = float(((x.astype(np.float64) - palette.centroids[palette.labels]) ** 2).sum())
        assert optimum * (1 - 1e-9) <= error <= (1.3 if tails and k == 256 else 1.05) * optimum
    with pytest.raises(ValueError, match="plain k-means only"):
        kmeans_float16(x, k, binned=True, weights=np.ones(x.size))
