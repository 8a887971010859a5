import math

import numpy as np
import pytest
import torch

from workbench.metrics import distortion_from_psnr, psnr, psnr_per_item, psnr_reference, ssim


def test_psnr_reference_formula_peak_from_test_and_rounding():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8, 8))
    test = ref + 0.01 * rng.standard_normal(ref.shape)
    rmse = math.sqrt(np.mean((ref - test) ** 2))
    expected = 20 * math.log10((np.abs(test).max() + 1e-5) / (rmse + 1e-10))
    assert psnr_reference(ref, test, decimals=None) == pytest.approx(expected, abs=1e-12)
    assert psnr_reference(ref, test) == round(expected, 1)
    # the peak is the *test* tensor's: scaling ref alone moves only the rmse term
    scaled = test.copy()
    scaled[0, 0, 0] = 100.0
    assert psnr_reference(ref, scaled, None) > 20 * math.log10(100.0 / math.sqrt(np.mean((ref - scaled) ** 2))) - 1e-9


def test_psnr_reference_float16_inputs_are_computed_in_float64():
    x = torch.randn(2, 4, 8, 8).half()
    # identical float16 tensors: the epsilon cap (~200 dB), not inf/NaN as in float16 arithmetic
    value = psnr_reference(x, x)
    assert 190 < value < 230 and math.isfinite(value)
    assert psnr_per_item(x, x) == [psnr_reference(a, a) for a in x]


def test_psnr_and_ssim():
    rng = np.random.default_rng(1)
    img = rng.random((16, 16, 3))
    assert psnr(img, img) == math.inf
    noisy = np.clip(img + 0.1 * rng.standard_normal(img.shape), 0, 1)
    mse = np.mean((img - noisy) ** 2)
    assert psnr(img, noisy) == pytest.approx(10 * math.log10(1 / mse))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, noisy) < 0.95
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(img, img[:8])


def test_distortion_from_psnr():
    assert distortion_from_psnr([20.0, 30.0]) == pytest.approx((1e-2 + 1e-3) / 2)
