"""PaletteCache: k-means once per layer and width, within a memory budget, spilling to disk, never stale."""

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.palettes.cache import SPILL_PREFIX, PaletteCache, SpillFolder, remove_abandoned_spills
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


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The system temp dir, for this test: a folder of its own (spill folders go there)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_private_spill_folder_is_in_the_temp_dir_and_deleted_on_close(temp_root):
    weights = _weights()
    budget = 2 * max(_palette_bytes(w, 4) for w in weights.values())
    with PaletteCache(max_bytes=budget, spill_dir=True) as cache:
        assert cache.spill_dir is None  # nothing spilled, nothing created
        first = {name: cache.palette(name, w, PaletteConfig(nbits=4)) for name, w in weights.items()}
        spill = cache.spill_dir
        assert spill.parent == temp_root and spill.name.startswith(f"{SPILL_PREFIX}{os.getpid()}-")
        assert cache.spills >= 4 and len(list(spill.glob("*.npz"))) == cache.spills
        cache.palette("layer0", weights["layer0"], PaletteConfig(nbits=4))
        assert cache.reloads == 1 and cache.fits == 6  # read back while open
    assert not spill.exists() and list(temp_root.iterdir()) == []
    # closed: its spilled palettes are gone, so they are refitted (the same), and a new folder takes the new spills
    again = {name: cache.palette(name, w, PaletteConfig(nbits=4)) for name, w in weights.items()}
    assert cache.fits > 6 and cache.spill_dir is not None and cache.spill_dir != spill
    for name in weights:
        assert np.array_equal(first[name].indices, again[name].indices)
    cache.close()
    assert list(temp_root.iterdir()) == []


def test_only_abandoned_spill_folders_are_removed(temp_root):
    live = SpillFolder()
    foreign = temp_root / f"{SPILL_PREFIX}123-notours"  # no lock file: not a spill folder we made
    foreign.mkdir()
    assert remove_abandoned_spills() == [] and live.path.exists() and foreign.exists()
    live.remove()
    assert not live.path.exists() and foreign.exists()


KILLED_ANALYSIS = """
import os, signal, sys, tempfile
from pathlib import Path

import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.run import run_analysis
from workbench.models.tiny import tiny_sd_pipeline
from workbench.palettes.cache import PaletteCache
from workbench.sweep.executor import LocalExecutor

torch.set_num_threads(1)
pipe = tiny_sd_pipeline()
pipe.set_progress_bar_config(disable=True)


def kill_once_spilled(evaluation):
    if any(Path(tempfile.gettempdir()).glob("workbench-palettes-*/*.npz")):
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: what an OOM kill or kill -9 does


config = AnalysisConfig(nbits=(2,), min_numel=30_000, prompts=("a red circle",), num_recipes=3)
cache = PaletteCache(max_bytes=1, spill_dir=True)  # what run_analysis makes, with a budget that spills at once
run_analysis(pipe, config, out_dir=sys.argv[1], progress=False, callback=kill_once_spilled, cache=cache,
             executor=LocalExecutor(pipe.unet, cache, prefetch=0))
"""


def test_an_analysis_killed_mid_run_leaves_no_palettes_in_its_output_folder(tmp_path):
    root, out = tmp_path / "tmp", tmp_path / "out"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(root)}
    proc = subprocess.run([sys.executable, "-c", KILLED_ANALYSIS, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (abandoned,) = root.glob(f"{SPILL_PREFIX}*")  # it was killed with palettes on disk...
    assert any(abandoned.glob("*.npz"))
    assert [p.name for p in out.iterdir()] == ["store"]  # ...none of them in the output folder
    assert not any(out.rglob("*.npz")) and not any(out.rglob("palettes-*"))
    # the next spill cleans up after the killed process
    next_one = SpillFolder(root)
    assert not abandoned.exists() and list(root.glob(f"{SPILL_PREFIX}*")) == [next_one.path]
    next_one.remove()
