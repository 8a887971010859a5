"""PaletteCache: k-means once per layer and width, within a memory budget, spilling to disk, never stale."""

from concurrent.futures import wait

import numpy as np
import torch

from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette


def _weights(n=6):
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(64 + 8 * i, 64, generator=generator) for i in range(n)}


def _palette_bytes(weight, nbits):
    palette = fit_palette(weight, PaletteConfig(nbits=nbits))
    return palette.indices.nbytes + palette.lut.nbytes


def test_budget_holds_and_spilled_palettes_come_back_bit_identical(tmp_path):
    weights = _weights()
    budget = 2 * max(_palette_bytes(w, 4) for w in weights.values())
    cache = PaletteCache(max_bytes=budget, spill_dir=tmp_path / "spill")
    first = {name: cache.palette(name, w, PaletteConfig(nbits=4)) for name, w in weights.items()}
    assert cache.fits == 6 and cache.spills >= 4 and cache.peak_nbytes <= budget and cache.nbytes <= budget
    again = {name: cache.palette(name, w, PaletteConfig(nbits=4)) for name, w in weights.items()}
    assert cache.fits == 6, "a spilled palette was refitted instead of read back"
    assert cache.reloads >= 4 and cache.peak_nbytes <= budget
    for name in weights:
        assert np.array_equal(first[name].indices, again[name].indices)
        assert np.array_equal(first[name].lut.view(np.uint16), again[name].lut.view(np.uint16))
    assert len(cache) == 6


def test_without_a_spill_folder_evicted_palettes_are_refitted_not_served_stale():
    weights = _weights(3)
    budget = max(_palette_bytes(w, 2) for w in weights.values())
    cache = PaletteCache(max_bytes=budget)
    for name, w in weights.items():
        cache.get(name, w, PaletteConfig(nbits=2))
    assert cache.fits == 3 and cache.spills == 0 and len(cache) == 1
    dense = cache.get("layer0", weights["layer0"], PaletteConfig(nbits=2))
    assert cache.fits == 4
    assert torch.equal(dense, torch.from_numpy(fit_palette(weights["layer0"], PaletteConfig(nbits=2)).dense()).float())


def test_background_fits_count_against_the_budget(tmp_path):
    weights = _weights()
    budget = 2 * max(_palette_bytes(w, 8) for w in weights.values())
    with PaletteCache(max_bytes=budget, spill_dir=tmp_path) as cache:
        cache.prefetch((name, w, PaletteConfig(nbits=b)) for b in (8, 6) for name, w in weights.items())
        wait([future for _, future in list(cache._pending.values())])
        cache.close()  # the last callbacks run in the worker threads, which close() joins
        assert cache.peak_nbytes <= budget and not cache._pending
        assert cache.fits == 12 and len(cache) == 12
        for name, w in weights.items():  # every palette is served, none refitted
            assert np.array_equal(
                cache.palette(name, w, PaletteConfig(nbits=6)).indices,
                fit_palette(w, PaletteConfig(nbits=6)).indices,
            )
        assert cache.fits == 12


def test_several_fit_threads_give_the_same_palettes():
    weights = _weights()
    with PaletteCache() as cache:
        cache.prefetch(((name, w, PaletteConfig(nbits=b)) for b in (8, 4) for name, w in weights.items()), workers=3)
        for b in (8, 4):
            for name, w in weights.items():
                got = cache.palette(name, w, PaletteConfig(nbits=b))
                want = fit_palette(w, PaletteConfig(nbits=b))
                assert np.array_equal(got.indices, want.indices) and np.array_equal(
                    got.lut.view(np.uint16), want.lut.view(np.uint16)
                )
        assert cache.fits == 12


def test_a_palette_fitted_elsewhere_is_served_without_a_fit():
    """What a Ray worker receives from another worker (`PaletteCache.add`) is what its lookups find: no refit."""
    weight = torch.randn(64, 48)
    config = PaletteConfig(nbits=4)
    fitted = fit_palette(weight, config)
    cache = PaletteCache()
    cache.add("layer", weight, fitted)
    assert cache.palette("layer", weight, config) is fitted
    assert cache.fits == 0
    assert cache.palette("layer", weight, PaletteConfig(nbits=2)) is not fitted and cache.fits == 1
