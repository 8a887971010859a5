"""coremltools' SKMPalettizer on the tiny pipeline: runs, n-bit palettes on every candidate, deterministic."""

import pytest
import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.skm import (
    Calibration,
    calibration_samples,
    compare_with_skm,
    skm_palettize,
    skm_sensitivity,
    swapped_weights,
)
from workbench.errors import InvalidValueError
from workbench.sweep.phases import candidate_layers

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("a red circle", "a blue square")
MIN_NUMEL = 40_000  # the tiny UNet's 3 largest layers, to keep the test fast


def test_calibration_samples_are_prompt_pairs_at_spread_steps(pipe):
    samples = calibration_samples(pipe, Calibration(PROMPTS, seed=0, num_samples=4))
    assert len(samples) == 4
    # 2 prompts x 2 steps, step-major: each prompt's guidance pair (unconditional row, text row) at both steps
    assert [int(s.args[1]) for s in samples] == [int(samples[0].args[1])] * 2 + [int(samples[2].args[1])] * 2
    assert int(samples[0].args[1]) > int(samples[2].args[1])
    for s in samples:
        assert s.args[0].shape == (2, 4, 32, 32) == s.direction.shape
        assert s.kwargs["encoder_hidden_states"].shape[0] == 2
    assert not torch.equal(samples[0].kwargs["encoder_hidden_states"], samples[1].kwargs["encoder_hidden_states"])


def test_skm_palettizes_every_candidate_to_n_bits_deterministically(pipe):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    calibration = Calibration(PROMPTS, seed=0, num_samples=2)
    first = skm_palettize(pipe, 2, calibration, min_numel=MIN_NUMEL)
    sensitivity = skm_sensitivity(
        pipe, calibration, min_numel=MIN_NUMEL
    )  # a second run, and the path that reuses the sensitivities
    second = skm_palettize(pipe, 2, min_numel=MIN_NUMEL, sensitivity=sensitivity)
    candidates = candidate_layers(pipe.unet, MIN_NUMEL)
    assert list(first) == list(candidates.layers) and len(first) >= 3
    for name, weight in first.items():
        assert weight.dtype == torch.float16 and weight.shape == candidates.layers[name].weight.shape
        assert 1 < torch.unique(weight).numel() <= 4, name
        assert torch.equal(weight, second[name]), f"{name} differs between two runs"
    for name, param in pipe.unet.named_parameters():  # the pipeline's own UNet is untouched
        assert torch.equal(param, before[name])
    with swapped_weights(pipe.unet, first):
        for name, weight in first.items():
            assert torch.equal(candidates.layers[name].weight, weight.float())
    for name, param in pipe.unet.named_parameters():
        assert torch.equal(param, before[name])


def test_bad_width_calibration_and_missing_sensitivities_are_user_errors(pipe):
    with pytest.raises(InvalidValueError, match="unsupported bit width 5"):
        skm_palettize(pipe, 5, Calibration(PROMPTS), min_numel=MIN_NUMEL)
    with pytest.raises(InvalidValueError, match="sensitivity lacks 3 candidate weight"):
        skm_palettize(pipe, 4, min_numel=MIN_NUMEL, sensitivity={})
    with pytest.raises(InvalidValueError, match="at least one prompt"):
        Calibration(prompts=())
    with pytest.raises(InvalidValueError, match="num_samples must be >= 1, got 0"):
        Calibration(PROMPTS, num_samples=0)


def test_compare_with_skm_measures_both_at_the_same_size_and_restores_the_unet(pipe):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    config = AnalysisConfig(prompts=PROMPTS, min_numel=MIN_NUMEL)
    result = compare_with_skm(pipe, (2,), config, num_calibration=2)
    (row,) = result.comparisons
    assert row.nbits == 2 and row.bits_per_param == 2.0 and result.layers == 3
    assert 0 < row.skm_psnr < 150 and 0 < row.ours_psnr < 150  # palettized: below the ~200 dB identical-output cap
    assert result.delta(2) == row.ours_psnr - row.skm_psnr
    assert list(result.to_frame().columns[:5]) == ["nbits", "bits_per_param", "skm_psnr", "ours_psnr", "delta"]
    for name, param in pipe.unet.named_parameters():
        assert torch.equal(param, before[name])
