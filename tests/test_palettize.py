import threading
from concurrent.futures import wait

import numpy as np
import pytest
import torch
from torch import nn

from workbench.models.layers import LayerNotFoundError, compressible_layers, get_layer
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig, as_config
from workbench.palettes.fit import fit_palette, linear_quantize_tensor, palettize_tensor
from workbench.palettes.size import size_report


def _layers():
    """Two convs and a linear, each under 10,000 weights (scikit-learn's k-means path)."""
    return nn.Conv2d(4, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.Flatten(), nn.Linear(64, 128)


@pytest.fixture
def net(seeded_net):
    return seeded_net(*_layers())


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="unsupported nbits 5.*1, 2, 3, 4, 6, 8"):
        PaletteConfig(nbits=5)
    with pytest.raises(ValueError, match="unknown palettization mode 'median'"):
        PaletteConfig(mode="median")
    with pytest.raises(ValueError, match="group_size"):
        PaletteConfig(granularity="per_grouped_channel")
    cfg = PaletteConfig(4, granularity="per_grouped_channel", group_size=8)
    assert PaletteConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.key == "kmeans4_g8"


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("numel", [3_000, 40_000])  # below and above coremltools' 1-D k-means switch
def test_palette_has_at_most_2_to_the_n_values_and_error_falls_with_bits(nbits, numel):
    w = torch.randn(numel // 100, 100, generator=torch.Generator().manual_seed(nbits))
    pal = fit_palette(w, PaletteConfig(nbits))
    dense = pal.dense()
    assert pal.lut.dtype == np.float16 and pal.indices.dtype == np.uint8
    assert pal.lut.shape == (1, 2**nbits) and dense.shape == tuple(w.shape)
    # float32: numpy's float16 sort (and so np.unique) is wrong on AVX-512 CPUs (numpy 2.2-2.3)
    assert len(np.unique(dense.astype(np.float32))) <= 2**nbits
    assert np.array_equal(dense, pal.lut[0][pal.indices])
    sqnr = 10 * np.log10(w.pow(2).sum().item() / ((w.numpy() - dense.astype(np.float32)) ** 2).sum())
    # Floors: the Lloyd-Max optimum for a Gaussian (4.40, 9.30, 14.62, 20.22 dB at 1-4 bits), which exact
    # k-means reaches on the large tensor; scikit-learn's tol=1e-2 path (small tensors) stops a little short.
    floor = {1: 4.3, 2: 8.8, 3: 14.0, 4: 19.5, 6: 31.0, 8: 43.0}[nbits]
    if numel >= 10_000 and nbits <= 4:
        floor = {1: 4.38, 2: 9.28, 3: 14.6, 4: 20.2}[nbits]
    assert sqnr >= floor, f"SQNR {sqnr:.2f} dB is too low"


def _weights_for_exactness() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    signed_zeros = (rng.standard_normal((120, 100)) * 0.02).astype(np.float16)
    signed_zeros[::7, ::3] = -0.0
    signed_zeros[::5, ::2] = 0.0
    return {
        "student_t": (rng.standard_t(5, (256, 160)) * 0.02).astype(np.float16),
        "signed_zeros": signed_zeros,
        "few_values": rng.choice(np.linspace(-1, 1, 40), (100, 120)).astype(np.float16),  # < 2**8 values
        "float32_conv": (rng.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32),  # cast to float16
    }


@pytest.mark.parametrize("name", ["student_t", "signed_zeros", "few_values", "float32_conv"])
@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_fit_palette_is_bit_exact_with_coremltools_kmeans(name, nbits):
    # a private coremltools name: if an upgrade moves it, this fails (the reference must be found, not skipped)
    from coremltools.models.neural_network import quantization_utils

    weight = _weights_for_exactness()[name]
    lut, indices = quantization_utils._get_kmeans_lookup_table_and_weight(nbits, weight.astype(np.float16))
    palette = fit_palette(weight, PaletteConfig(nbits))
    assert weight.size >= 10_000, "coremltools' exact 1-D k-means path"
    assert np.array_equal(palette.lut[0].view(np.uint16), lut.astype(np.float16).view(np.uint16))
    assert np.array_equal(palette.indices, indices.reshape(weight.shape))


@pytest.mark.parametrize("solver", ["numba", "coremltools", "auto"])
def test_fit_palette_solvers_give_the_same_palette(solver):
    weight = _weights_for_exactness()["student_t"]
    reference = fit_palette(weight, PaletteConfig(8), solver="coremltools")
    palette = fit_palette(weight, PaletteConfig(8), solver=solver)
    assert np.array_equal(palette.lut.view(np.uint16), reference.lut.view(np.uint16))
    assert np.array_equal(palette.indices, reference.indices)


def test_grouped_palette_is_one_lut_per_group_and_beats_per_tensor():
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 2, 64)[:, None]
    per_tensor = fit_palette(w, PaletteConfig(3)).dense().astype(np.float32)
    pal = fit_palette(w, PaletteConfig(3, granularity="per_grouped_channel", group_size=8))
    assert pal.lut.shape == (8, 8)
    for g in range(8):
        assert set(pal.dense()[8 * g : 8 * g + 8].ravel().tolist()) <= set(pal.lut[g])
    err = lambda d: ((w.numpy() - d.astype(np.float32)) ** 2).sum()  # noqa: E731
    assert err(pal.dense()) < 0.85 * err(per_tensor)
    with pytest.raises(ValueError, match="does not divide the 64 output channels"):
        fit_palette(w, PaletteConfig(3, granularity="per_grouped_channel", group_size=7))


def test_uniform_mode_is_evenly_spaced():
    w = torch.linspace(-1, 1, 20_000).reshape(100, 200)
    lut = fit_palette(w, PaletteConfig(4, mode="uniform")).lut[0].astype(np.float64)
    assert np.allclose(np.diff(lut), 2 / 15, rtol=2e-3)


def test_palettized_restores_weights_bitwise_and_uses_no_copy_of_the_model(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    storage_before = {n: m.weight.data_ptr() for n, m in compressible_layers(net, 0).items()}
    recipe = {"0": 2, "2": PaletteConfig(4), "4": 16}
    with palettized(net, recipe) as same:
        assert same is net
        assert not torch.equal(net[0].weight, before["0.weight"])
        assert len(torch.unique(net[2].weight)) <= 16
        assert torch.equal(net[4].weight, before["4.weight"])  # 16 bits: untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert v.view(torch.int32).equal(before[k].view(torch.int32)), f"{k} not bitwise restored"
    for n, m in compressible_layers(net, 0).items():
        assert m.weight.data_ptr() == storage_before[n], "the original storage must come back, not a copy"


def test_palettized_restores_on_error(net):
    before = net[0].weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with palettized(net, {"0": 1}):
            raise RuntimeError("boom")
    assert torch.equal(net[0].weight, before)


def test_cache_fits_once_and_refits_a_changed_weight(net):
    cache = PaletteCache()
    for _ in range(3):
        with palettized(net, {"2": 4}, cache=cache):
            first = net[2].weight.clone()
    assert cache.fits == 1
    with torch.no_grad():
        net[2].weight.mul_(2.0)  # in-place change: the cached palette is stale
    with palettized(net, {"2": 4}, cache=cache):
        assert not torch.equal(net[2].weight, first)
    assert cache.fits == 2


def test_background_fits_equal_foreground_fits_and_never_serve_a_changed_weight(net, monkeypatch):
    recipe = {"0": 2, "2": 4, "4": PaletteConfig(nbits=3, granularity="per_grouped_channel", group_size=4)}
    expected = {}
    for name, spec in recipe.items():
        with palettized(net, {name: spec}):
            expected[name] = net.get_submodule(name).weight.clone()
    original = net[2].weight.detach().clone()
    go, fitted, release = threading.Event(), threading.Event(), threading.Event()
    read, foreground = {}, []
    with PaletteCache() as cache:
        background, fit = cache._fit_in_background, cache._fit

        def gated(name, weight, config, approximate):  # every background fit waits for `go`; layer 2's, once
            assert go.wait(timeout=60)  # fitted, waits for `release` before it is handed back
            read[name] = weight.detach().clone()
            palette = background(name, weight, config, approximate)
            if name == "2":
                fitted.set()
                assert release.wait(timeout=60)
            return palette

        def counted(name, *args):
            if threading.current_thread() is threading.main_thread():
                foreground.append(name)
            return fit(name, *args)

        monkeypatch.setattr(cache, "_fit_in_background", gated)
        monkeypatch.setattr(cache, "_fit", counted)
        cache.prefetch((n, net.get_submodule(n).weight, as_config(s)) for n, s in recipe.items())
        futures = [future for _, future in cache._pending.values()]
        assert len(futures) == 3 and not any(f.done() for f in futures)
        go.set()
        assert fitted.wait(timeout=60)  # layer 2's palette is fitted to its old values and not yet handed back
        with torch.no_grad():
            net[2].weight.add_(1.0)  # changed after its fit: that fit must not be used
        release.set()
        wait(futures, timeout=60)
        assert all(f.done() for f in futures) and torch.equal(read["2"], original)
        for name, spec in recipe.items():
            with palettized(net, {name: spec}, cache=cache):
                got = net.get_submodule(name).weight.clone()
            if name == "2":
                assert not torch.equal(got, expected[name])
                assert torch.equal(got, palettize_tensor(net[2].weight, PaletteConfig(nbits=4)))
            else:
                assert torch.equal(got, expected[name])
        assert foreground == ["2"] and cache.fits == 3  # layers 0 and 4 from the background, layer 2 refitted
    assert cache._executor is None and not cache._pending


def test_palettized_in_place_and_int8_baselines(net):
    w = net[4].weight.detach().clone()
    per_tensor = linear_quantize_tensor(w, per_channel=False)
    per_channel = linear_quantize_tensor(w, per_channel=True)
    assert len(torch.unique(per_tensor)) <= 256
    for c in range(w.shape[0]):
        assert len(torch.unique(per_channel[c])) <= 255
    err_t, err_c = (w - per_tensor).pow(2).sum(), (w - per_channel).pow(2).sum()
    assert err_c <= err_t
    with palettized(net, {"4": 6}):
        assert len(torch.unique(net[4].weight)) <= 64
    assert torch.equal(net[4].weight, w)


def test_unknown_layer_lists_closest_names():
    net = nn.Module()
    net.down = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    with pytest.raises(LayerNotFoundError, match=r"'down\.2'.*closest: down\.0, down\.1|closest: down\.1"):
        get_layer(net, "down.2")
    with pytest.raises(LayerNotFoundError):
        with palettized(net, {"down.7": 4}):
            pass


def test_compressible_layers_threshold_is_strict():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 11), nn.LayerNorm(10))
    assert list(compressible_layers(net, 100)) == ["1"]
    assert list(compressible_layers(net, 99)) == ["0", "1"]


def test_size_report_counts_luts_and_packing(net):
    layers = compressible_layers(net, 0)
    report = size_report(layers, {"0": 4, "2": PaletteConfig(2, granularity="per_grouped_channel", group_size=16)})
    n0, n2, n4 = (layers[k].weight.numel() for k in ("0", "2", "4"))
    assert report.bits_per_param == pytest.approx((4 * n0 + 2 * n2 + 16 * n4) / (n0 + n2 + n4))
    assert report.nbytes == (n0 * 4 + 7) // 8 + 16 * 2 + (n2 * 2 + 7) // 8 + 4 * 4 * 2 + 2 * n4
    assert report.float16_nbytes == 2 * (n0 + n2 + n4)
    assert report.size_reduction_pct == pytest.approx(100 * (1 - report.bits_per_param / 16))
    assert len(report.to_frame()) == 3


def test_small_tensor_palettes_do_not_depend_on_thread_count_or_calling_thread():
    # Below 10,000 weights coremltools (and so fit_palette) uses scikit-learn's KMeans, whose LUT changes
    # in its last bits with the OpenMP thread count unless pinned.
    from threading import Thread

    from threadpoolctl import threadpool_limits

    weight = torch.from_numpy(np.random.default_rng(0).standard_normal((50, 40)) * 0.1)  # differs unpinned
    config = PaletteConfig(nbits=8)
    reference = fit_palette(weight, config)
    fits = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            fits.append(fit_palette(weight, config))
    worker = Thread(target=lambda: fits.append(fit_palette(weight, config)))
    worker.start()
    worker.join()
    assert len(fits) == 3
    for fit in fits:
        assert np.array_equal(fit.lut.view(np.uint16), reference.lut.view(np.uint16))
        assert np.array_equal(fit.indices, reference.indices)


def test_approximate_palettes_are_held_beside_exact_ones_and_only_for_plain_kmeans(net):
    weight = net[2].weight
    with PaletteCache() as cache:
        exact = cache.palette("2", weight, PaletteConfig(nbits=4))
        approximate = cache.palette("2", weight, PaletteConfig(nbits=4), approximate=True)
        assert cache.palette("2", weight, PaletteConfig(nbits=4)) is exact and cache.fits == 2
        assert np.array_equal(approximate.lut, fit_palette(weight, PaletteConfig(nbits=4), solver="binned").lut)
        w = weight.detach().half().float().numpy()
        errors = [float(((p.dense() - w) ** 2).sum()) for p in (exact, approximate)]
        assert errors[1] <= 1.05 * errors[0]  # close to the fit Core ML stores, not that fit
        with pytest.raises(ValueError, match="plain k-means"):
            cache.palette("2", weight, PaletteConfig(nbits=4, mode="uniform"), approximate=True)
    with pytest.raises(ValueError, match="plain k-means palettes only"):
        fit_palette(weight, PaletteConfig(nbits=4, mode="uniform"), solver="binned")


def test_fit_process_gives_fit_palettes_bits_and_reports_failures(net):
    from workbench.palettes.fit_worker import FitProcess, FitProcessError

    small = net[0].weight  # 288 weights: scikit-learn's path, which background fits run in the helper process
    with FitProcess() as process:
        for nbits in (2, 6):
            got, expected = process.fit(small.detach().half().numpy(), PaletteConfig(nbits=nbits)), None
            expected = fit_palette(small, PaletteConfig(nbits=nbits))
            assert np.array_equal(got.lut, expected.lut) and np.array_equal(got.indices, expected.indices)
        with pytest.raises(FitProcessError, match="group_size"):  # raised there, reported here; it keeps serving
            process.fit(small.detach().half().numpy(), PaletteConfig(nbits=4, granularity="per_grouped_channel",
                                                                    group_size=3))  # fmt: skip
        assert process.fit(small.detach().half().numpy(), PaletteConfig(nbits=2)).config == PaletteConfig(nbits=2)
    assert process._process is None


def test_urgent_prefetch_runs_on_its_own_thread_and_gives_the_same_palette(net, monkeypatch):
    config = PaletteConfig(nbits=8)
    started, release, threads = threading.Event(), threading.Event(), {}
    with PaletteCache() as cache:
        background = cache._fit_in_background

        def gated(name, *args):  # layer 2's fit holds the cache's fit thread until released
            threads.setdefault(name, []).append(threading.current_thread().name)
            if name == "2":
                started.set()
                assert release.wait(timeout=60)
            return background(name, *args)

        monkeypatch.setattr(cache, "_fit_in_background", gated)
        cache.prefetch([("2", net[2].weight, config), ("4", net[4].weight, config)])
        assert started.wait(timeout=60)  # layer 4's fit is queued behind layer 2's
        cache.prefetch([("4", net[4].weight, config)], urgent=True)
        ((_, urgent),) = [v for k, v in cache._pending.items() if k[0] == "4"]
        assert np.array_equal(urgent.result(timeout=60).dense(), fit_palette(net[4].weight, config).dense())
        assert not release.is_set() and threads == {"2": ["palette-fit_0"], "4": ["palette-fit-urgent_0"]}
        release.set()
        palette = cache.palette("4", net[4].weight, config)
        assert np.array_equal(palette.dense(), fit_palette(net[4].weight, config).dense())
        assert threads["4"] == ["palette-fit-urgent_0"]  # the queued job moved, it did not run as well
    assert cache._urgent is None and cache._process is None


def test_a_fit_process_that_cannot_start_leaves_the_fits_to_the_thread(net, monkeypatch):
    from workbench.palettes import fit_worker

    monkeypatch.setattr(fit_worker.sys, "executable", "/nonexistent/python")
    with fit_worker.FitProcess() as process:
        for _ in range(2):  # the second call does not try again
            with pytest.raises(fit_worker.FitProcessError, match="failed"):
                process.fit(net[0].weight.detach().half().numpy(), PaletteConfig(nbits=2))
    expected = fit_palette(net[0].weight, PaletteConfig(nbits=2)).dense()
    started, release, threads = threading.Event(), threading.Event(), []
    with PaletteCache() as cache:  # background fits of small tensors fall back to the cache's thread
        fit = cache._fit

        def gated(*args):
            threads.append(threading.current_thread().name)
            started.set()
            assert release.wait(timeout=60)
            return fit(*args)

        monkeypatch.setattr(cache, "_fit", gated)
        cache.prefetch([("0", net[0].weight, PaletteConfig(nbits=2))])
        assert started.wait(timeout=60)  # fitting, held before it can be handed back
        assert threads == ["palette-fit_0"]  # the cache's own thread, the helper process having failed
        _, pending = cache._pending[("0", PaletteConfig(nbits=2), None)]
        release.set()
        assert np.array_equal(pending.result(timeout=60).dense(), expected)
        got = cache.palette("0", net[0].weight, PaletteConfig(nbits=2))
        assert np.array_equal(got.dense(), expected)
        assert cache.fits == 1 and threads == ["palette-fit_0"]  # handed over, not fitted again
