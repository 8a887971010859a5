"""On an accelerator (cuda or mps): float16 by default, float64 metrics, palettes bit-exact with the CPU's.
Skipped where there is none (no GPU on the CI machines); run with `pytest -m gpu` on a GPU box."""

import math

import numpy as np
import pytest
import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.run import run_analysis
from workbench.models.loader import load_pipeline, model_dtype, pick_device
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette

ACCELERATOR = pick_device(None).type != "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ACCELERATOR, reason="needs a cuda or mps device")]


def test_the_default_device_is_the_accelerator_in_float16():
    device = pick_device(None)
    assert device.type in ("cuda", "mps") and model_dtype(device) == torch.float16
    pipe = load_pipeline("tiny-sd", device=device, dtype=model_dtype(device), progress=False)
    assert pipe.unet.device.type == device.type and pipe.unet.dtype == torch.float16


def test_palettes_of_gpu_weights_equal_the_cpu_ones():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for nbits in (2, 4, 8):
        cpu = fit_palette(weight, PaletteConfig(nbits=nbits))
        gpu = fit_palette(weight.to(pick_device(None), torch.float16), PaletteConfig(nbits=nbits))
        assert np.array_equal(cpu.lut.view(np.uint16), gpu.lut.view(np.uint16))
        assert np.array_equal(cpu.indices, gpu.indices)


def test_a_float16_analysis_on_the_accelerator_gives_finite_float64_metrics():
    device = pick_device(None)
    pipe = load_pipeline("tiny-sd", device=device, dtype=model_dtype(device), progress=False)
    config = AnalysisConfig(nbits=(2, 8), min_numel=30_000, prompts=("a red circle",), num_recipes=2)
    result = run_analysis(pipe, config, progress=False)
    assert all(math.isfinite(v) for v in result.preanalysis.baselines.values())
    assert result.preanalysis.baselines["original"] > result.preanalysis.baselines["linear_8bit"]
