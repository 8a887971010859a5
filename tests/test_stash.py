"""WeightStash: palettized weights over the memory budget go in place, originals to disk, restored bitwise."""

import threading
from concurrent.futures import wait

import pytest
import torch
from torch import nn

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.run import run_analysis
from workbench.models.tiny import tiny_sd_pipeline
from workbench.palettes import stash as stash_module
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import palettize_tensor
from workbench.palettes.stash import WeightStash
from workbench.threads import torch_threads


def _layers():
    return nn.Linear(64, 96), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Linear(96, 32)


@pytest.fixture
def net(seeded_net):
    return seeded_net(*_layers(), scale=1.0)


RECIPE = {"0": 2, "2": 4, "3": "linear8"}


def test_over_the_budget_the_weights_are_overwritten_in_place_and_restored_bitwise(net, seeded_net):
    reference = seeded_net(*_layers(), scale=1.0)
    before = {n: (p.data_ptr(), p._version, p.detach().clone()) for n, p in net.named_parameters()}
    with palettized(reference, RECIPE) as expected:  # the plain in-memory path
        expected = {n: p.detach().clone() for n, p in expected.named_parameters()}
    with WeightStash(memory_bytes=0) as stash:
        with palettized(net, RECIPE, stash=stash):
            assert stash.on_disk_bytes == sum(net.get_submodule(n).weight.numel() * 4 for n in RECIPE)
            for name, param in net.named_parameters():
                assert param.data_ptr() == before[name][0], "not in place"
                assert torch.equal(param, expected[name])
        for name, param in net.named_parameters():
            ptr, version, values = before[name]
            assert param.data_ptr() == ptr and param._version == version and torch.equal(param, values)


def test_restore_on_error_and_a_split_budget(net):
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    budget = net[0].weight.numel() * 4  # the first layer stays in memory, the rest go to disk
    with WeightStash(memory_bytes=budget) as stash:
        try:
            with palettized(net, RECIPE, stash=stash):
                assert len(stash) == 3 and stash.on_disk_bytes == (net[2].weight.numel() + net[3].weight.numel()) * 4
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert len(stash) == 0
    assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())


def test_an_original_is_written_once_and_read_back_without_a_restore(net):
    """A stash that outlives its `with` blocks writes each original once: a second block on unchanged weights
    writes nothing, and `original` reads a replaced weight's values back without restoring it."""
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    with WeightStash(memory_bytes=0) as stash:
        for repeat in range(3):
            with palettized(net, RECIPE, stash=stash):
                assert torch.equal(stash.original("2", net[2].weight), values["2.weight"])
                assert not torch.equal(net[2].weight, values["2.weight"])
            assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())
        written = sum(net.get_submodule(n).weight.numel() * 4 for n in RECIPE)
        assert stash.on_disk_bytes == written and stash.reused == 2 * len(RECIPE)
        with torch.no_grad():
            net[0].weight.mul_(2.0)  # changed through autograd: its version moves, so it is written again
        with palettized(net, RECIPE, stash=stash):
            pass
        assert stash.on_disk_bytes == written + net[0].weight.numel() * 4
        assert torch.equal(net[0].weight, values["0.weight"] * 2.0)
    assert torch.equal(stash.original("0", net[0].weight), net[0].weight)  # not replaced: the weight itself


def _gated_background_fits(monkeypatch, cache, hold: str):
    """Make `cache`'s background fits of layer `hold` wait for the returned `release` event (after `started` is
    set), and record the values every background fit read: {layer: [weight as read, ...]}."""
    started, release, read = threading.Event(), threading.Event(), {}
    fit = cache._fit_in_background

    def gated(name, weight, config, approximate):
        if name == hold:
            started.set()
            assert release.wait(timeout=60), "the test never released the fit"
        read.setdefault(name, []).append(weight.detach().clone())
        return fit(name, weight, config, approximate)

    monkeypatch.setattr(cache, "_fit_in_background", gated)
    return started, release, read


def test_a_queued_background_fit_never_reads_a_weight_overwritten_in_place(net, monkeypatch):
    config = PaletteConfig(nbits=6)
    original = net[3].weight.detach().clone()
    expected = palettize_tensor(original, config)
    with PaletteCache() as cache, WeightStash(memory_bytes=0) as stash:
        started, release, read = _gated_background_fits(monkeypatch, cache, hold="0")
        cache.prefetch([("0", net[0].weight, PaletteConfig(nbits=8)), ("3", net[3].weight, config)])
        assert started.wait(timeout=60)  # the one fit thread is busy with layer 0: layer 3's fit is queued
        ((_, queued),) = [v for k, v in cache._pending.items() if k[0] == "3"]
        assert queued.running() is False and not queued.done()
        with palettized(net, {"3": 2}, cache, stash):  # overwrites layer 3 in place (the same storage and version)
            assert not torch.equal(net[3].weight, original)
            release.set()  # the thread is free: a fit of layer 3 still queued would run now, on the 2-bit values
            wait([queued], timeout=60)
            assert queued.cancelled(), "the queued fit of the overwritten weight was left to run"
        with palettized(net, {"3": config}, cache):
            assert torch.equal(net[3].weight, expected)
    assert all(torch.equal(w, original) for w in read.get("3", []))


def test_a_running_background_fit_finishes_before_its_weight_is_overwritten(net, monkeypatch):
    config = PaletteConfig(nbits=6)
    original = net[3].weight.detach().clone()
    with PaletteCache() as cache, WeightStash(memory_bytes=0) as stash:
        started, release, read = _gated_background_fits(monkeypatch, cache, hold="3")
        cache.prefetch([("3", net[3].weight, config)])
        assert started.wait(timeout=60)  # layer 3's fit has started and waits before reading the weight
        overwritten = threading.Event()

        def overwrite():
            with palettized(net, {"3": 2}, cache, stash):
                overwritten.set()

        worker = threading.Thread(target=overwrite)
        worker.start()
        # the stash waits for the running fit: the weight is not overwritten while the fit holds it
        assert not overwritten.wait(timeout=1.0), "the weight was overwritten under a running fit"
        release.set()
        worker.join(timeout=60)
        assert overwritten.is_set() and not worker.is_alive()
        assert [torch.equal(w, original) for w in read["3"]] == [True]
        with palettized(net, {"3": config}, cache):
            assert torch.equal(net[3].weight, palettize_tensor(original, config))
        assert cache.fits == 2  # the 2-bit palette and the background 6-bit one, not refitted


def test_the_analysis_is_the_same_with_every_original_on_disk(monkeypatch):
    config = AnalysisConfig(nbits=(2, 4), min_numel=30_000, prompts=("a red circle",), height=32, width=32,
                            num_recipes=2)  # fmt: skip
    with torch_threads(1):
        pipe = tiny_sd_pipeline()
        pipe.set_progress_bar_config(disable=True)
        in_memory = run_analysis(pipe, config, progress=False)
        monkeypatch.setattr(stash_module, "STASH_MEMORY_BYTES", 0)
        written = []
        write = WeightStash._write
        monkeypatch.setattr(WeightStash, "_write", lambda self, name, w: (written.append(name), write(self, name, w)))
        on_disk = run_analysis(pipe, config, progress=False)
    assert len(written) > 3 * len(on_disk.layers)  # baselines, curves and recipes all went through the disk
    assert on_disk.preanalysis.to_dict() == in_memory.preanalysis.to_dict()
