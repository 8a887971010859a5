"""Quality metrics: the reference's latent PSNR, plain PSNR, SSIM, and the distortion proxy used for allocation.

Every metric is computed in float64 on the CPU, whatever the inputs' dtype: in float16 the reference's
epsilons (1e-5, 1e-10) underflow and "identical outputs" read as inf or NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PSNR_PEAK_EPS = 1e-5  # the reference's epsilon on the peak
PSNR_RMSE_EPS = 1e-10  # the reference's epsilon on the rmse


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def psnr_reference(ref, test, decimals: int | None = 1) -> float:
    """The reference pre-analysis' PSNR of one latent: `20*log10((max|test| + 1e-5) / (rmse + 1e-10))`.

    The peak comes from the *test* tensor (as in apple/ml-stable-diffusion), `rmse = sqrt(mean((ref - test)**2))`,
    all in float64, and the result is rounded to 0.1 dB as the reference does before averaging over prompts.
    Identical tensors give `20*log10((max|test| + 1e-5) / 1e-10)`, about 200 dB: a cap, not a measurement.

    Args:
        ref (`torch.Tensor` or `np.ndarray`): the float model's output, any shape.
        test (`torch.Tensor` or `np.ndarray`): the compressed model's output, same shape.
        decimals (`int` or `None`, defaults to 1): rounding; `None` keeps full precision.

    Returns:
        `float`: PSNR in dB.
    """
    r, t = _as_float64(ref), _as_float64(test)
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch: ref {r.shape} vs test {t.shape}")
    rmse = math.sqrt(float(np.mean((r - t) ** 2)))
    value = 20.0 * math.log10((float(np.abs(t).max()) + PSNR_PEAK_EPS) / (rmse + PSNR_RMSE_EPS))
    return value if decimals is None else round(value, decimals)


def psnr_per_item(ref, test, decimals: int | None = 1) -> list[float]:
    """`psnr_reference` of each item along axis 0 (one latent per prompt), as the reference lists them."""
    r, t = _as_float64(ref), _as_float64(test)
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch: ref {r.shape} vs test {t.shape}")
    return [psnr_reference(a, b, decimals) for a, b in zip(r, t)]


def psnr(ref, test, peak: float = 1.0) -> float:
    """Plain PSNR with a fixed peak: `10*log10(peak**2 / mean((ref - test)**2))`, float64; inf when equal.

    Args:
        ref, test: arrays or tensors of the same shape (images: values in [0, peak]).
        peak (`float`, defaults to 1.0): the signal's full range (1.0 for images in [0, 1], 255 for uint8).
    """
    r, t = _as_float64(ref), _as_float64(test)
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch: ref {r.shape} vs test {t.shape}")
    mse = float(np.mean((r - t) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def image_psnr(reference, test) -> float:
    """Image PSNR, the one definition the workbench reports: uint8 images (values 0-255, as an app shows
    them; `workbench.models.generation.generate_images` makes them), peak 255: `10*log10(255**2 / mse)`, float64;
    inf for identical images. Any layout, same shape for both."""
    return psnr(reference, test, peak=255.0)


def image_ssim(reference, test) -> float:
    """Image SSIM, the one definition the workbench reports: `ssim` of uint8 HWC/NHWC images, data range 255."""
    return ssim(reference, test, data_range=255.0)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(ref, test, data_range: float = 1.0, win_size: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) over the images, Gaussian window, per channel, float64.

    `SSIM = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))` with
    `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`, local statistics from a separable Gaussian window (sigma 1.5, truncated
    to `win_size`), averaged over the valid region (no padding), channels and images.

    Args:
        ref, test: images, HWC, NHWC, or NCHW-free layouts of the same shape: the last two axes before the
            channel axis are spatial when the last axis has size <= 4, else the last two axes are.
        data_range (`float`, defaults to 1.0): L, the value range (1.0 for [0, 1] images).
        win_size (`int`, defaults to 7): window side, odd, at most the image side.
        sigma (`float`, defaults to 1.5): Gaussian window width.

    Returns:
        `float` in [-1, 1]; 1.0 for identical images.
    """
    from scipy.ndimage import correlate1d

    x, y = _as_float64(ref), _as_float64(test)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: ref {x.shape} vs test {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    spatial = (x.ndim - 3, x.ndim - 2) if x.shape[-1] <= 4 else (x.ndim - 2, x.ndim - 1)
    if min(x.shape[a] for a in spatial) < win_size or win_size % 2 == 0:
        raise ValueError(f"win_size={win_size} must be odd and at most the image side; image shape {x.shape}")
    g = _gaussian_window(win_size, sigma)

    def blur(a):
        for axis in spatial:
            a = correlate1d(a, g, axis=axis, mode="reflect")
        # keep only the valid region, where the window lies inside the image
        half = win_size // 2
        index = [slice(None)] * a.ndim
        for axis in spatial:
            index[axis] = slice(half, a.shape[axis] - half)
        return a[tuple(index)]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def distortion_from_psnr(psnr_db) -> float:
    """The allocation's additive distortion proxy: mean over prompts of `10**(-psnr/10)` (noise power / peak^2).

    Errors from different layers add roughly in power, not in dB, so this is what a knapsack sums.
    """
    values = np.atleast_1d(np.asarray(psnr_db, dtype=np.float64))
    return float(np.mean(10.0 ** (-values / 10.0)))


def weight_snr_db(weight: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of a weight: `10 * log10(sum(w**2) / sum((w - q)**2))`, in dB.

    Computed in float64; `inf` when `approx` equals `weight` exactly.
    """
    w, q = np.asarray(weight, np.float64), np.asarray(approx, np.float64)
    noise = float(np.sum((w - q) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(w**2)) / noise)
