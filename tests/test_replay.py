"""Upstream replay: evaluations that skip the float model's computation before the first changed layer are bitwise
the full forward's, on SD and SDXL UNets, and never replay what they must not."""

from __future__ import annotations

import pytest
import torch

from workbench.models.layers import compressible_layers
from workbench.models.tiny import tiny_sdxl_pipeline
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.sweep.executor import EvalTask, LocalExecutor
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.replay import UpstreamReplay, replay_units
from workbench.sweep.store import EvaluationRunner
from workbench.threads import torch_threads

PROMPTS = ("a red circle", "a blue square")


def _every_layer_is_bitwise_the_full_forward(pipe):
    probe = OneStepProbe(pipe, PROMPTS, height=32, width=32)
    names = list(compressible_layers(pipe.unet, min_numel=0))
    assert torch.equal(probe(changed=()), probe.reference)  # the recording: the float model, whole
    assert probe.replay.nbytes > 0 and probe.replay.skipped == 0
    for name in names:
        with palettized(pipe.unet, {name: 2}):
            full = probe()
            assert torch.equal(probe(changed=[name]), full), name
    assert probe.replay.skipped == len(names)  # something upstream of every layer was replayed (the time embedding)
    assert torch.equal(probe(changed=()), probe.reference)  # the recorded outputs were not modified by any forward


def test_every_layer_of_an_sd_unet_replays_bitwise(pipe):
    _every_layer_is_bitwise_the_full_forward(pipe)


def test_every_layer_of_an_sdxl_unet_replays_bitwise():
    with torch_threads(1):
        pipe = tiny_sdxl_pipeline()
        pipe.set_progress_bar_config(disable=True)
        _every_layer_is_bitwise_the_full_forward(pipe)


def test_a_first_call_with_changed_layers_records_only_upstream_of_them(pipe):
    probe = OneStepProbe(pipe, PROMPTS, height=32, width=32)
    names = list(compressible_layers(pipe.unet, min_numel=0))
    late, early = names[-1], names[len(names) // 3]
    with palettized(pipe.unet, {late: 2}):
        full = probe()
        assert torch.equal(probe(changed=[late]), full)  # the recording call
        recorded = probe.replay.nbytes
        assert torch.equal(probe(changed=[late]), full)
    with palettized(pipe.unet, {early: 4, late: 2}):
        assert torch.equal(probe(changed=[early, late]), probe())
    assert torch.equal(probe(changed=()), probe.reference)
    assert 0 < recorded == probe.replay.nbytes  # recorded once, at the first call


def test_the_budget_bounds_the_recording_and_measures_the_same(pipe):
    names = list(compressible_layers(pipe.unet, min_numel=0))
    full = OneStepProbe(pipe, PROMPTS, height=32, width=32)
    full(changed=())
    for budget in (0, full.replay.nbytes // 3):
        probe = OneStepProbe(pipe, PROMPTS, height=32, width=32)
        probe.replay_memory = budget
        probe(changed=())
        assert probe.replay.nbytes <= budget
        for name in names[::5]:
            with palettized(pipe.unet, {name: 2}):
                assert torch.equal(probe(changed=[name]), probe())
        assert (probe.replay.skipped > 0) == (budget > 0)
    with pytest.raises(ValueError, match="not modules of the UNet"):
        with probe.replay.skipping(["down_blocks.9.nothing"]):
            pass


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shared, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.shared(self.shared(self.a(x))))


def test_modules_called_twice_are_never_replayed():
    torch.manual_seed(0)
    model, x = _Shared(), torch.randn(3, 4)
    assert list(replay_units(model)) == ["a", "shared", "b"]
    replay = UpstreamReplay(model)
    with torch.no_grad():
        with replay.skipping(()):
            float_out = model(x)
        model.b.weight.add_(1.0)  # b changed: a is replayed, the shared layer (called twice) runs
        with replay.skipping(["b"]):
            assert "forward" in vars(model.a) and "forward" not in vars(model.shared)
            assert torch.equal(model(x), model.b(model.shared(model.shared(model.a(x)))))
        assert "forward" not in vars(model.a)  # restored
        model.b.weight.sub_(1.0)
        with replay.skipping(()):  # nothing changed: a and b replayed, the shared layer still runs
            assert torch.equal(model(x), float_out)
    assert replay.skipped == 2


def test_the_executor_measures_the_same_with_and_without_replay(pipe):
    probe = OneStepProbe(pipe, PROMPTS, height=32, width=32)
    names = list(compressible_layers(pipe.unet, min_numel=0))
    tasks = [EvalTask("float", "baseline", {})]
    tasks += [EvalTask(f"i{i}", "isolated", {n: 2}) for i, n in enumerate(names[::7])]
    tasks += [EvalTask("curve", "cumulative", dict.fromkeys(names[-5:], 4))]
    cache = PaletteCache()
    plain = LocalExecutor(pipe.unet, cache, replay=False).measure_all(tasks, EvaluationRunner(probe, None, False))
    assert probe.replay is None
    replayed = LocalExecutor(pipe.unet, cache).measure_all(tasks, EvaluationRunner(probe, None, False))
    assert [e.psnr for e in replayed] == [e.psnr for e in plain]
    assert probe.replay.skipped == len(tasks) - 1  # every task but the recording
    with palettized(pipe.unet, {names[0]: 1}):  # these checks can fail: a wrong `changed` gives other latents
        assert not torch.equal(probe(changed=[names[-1]]), probe())
