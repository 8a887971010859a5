"""WeightStash: palettized weights over the memory budget go in place, originals to disk, restored bitwise."""

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


def _net():
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Linear(96, 32))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return net


RECIPE = {"0": 2, "2": 4, "3": "linear8"}


def test_over_the_budget_the_weights_are_overwritten_in_place_and_restored_bitwise():
    net, reference = _net(), _net()
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


def test_restore_on_error_and_a_split_budget():
    net = _net()
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


def test_a_queued_background_fit_never_reads_a_weight_overwritten_in_place():
    net = _net()
    config = PaletteConfig(nbits=6)
    expected = palettize_tensor(net[3].weight, config)
    with PaletteCache() as cache, WeightStash(memory_bytes=0) as stash:
        cache.prefetch([("0", net[0].weight, PaletteConfig(nbits=8)), ("3", net[3].weight, config)])
        with palettized(net, {"3": 2}, cache, stash):  # overwrites layer 3 while its 6-bit fit may be queued
            pass
        with palettized(net, {"3": config}, cache):
            assert torch.equal(net[3].weight, expected)


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
