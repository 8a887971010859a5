"""coremltools' `SKMPalettizer` as a measured baseline: sensitivity-weighted k-means palettes on the UNet.

`SKMPalettizer` (`coremltools.optimize.torch.palettization`, SqueezeLLM's "sensitive k-means") weights each
weight's squared error in k-means by a diagonal Fisher estimate: the squared gradients of a loss, summed over
calibration samples (`SKMPalettizer.compute_sensitivity` squares each sample's gradient with a hook before it
accumulates). Here:

- calibration samples (`calibration_samples` of a `Calibration`): the UNet's inputs along the float pipeline's
  own trajectories for the analysis' prompts, with the workbench's seeding rule (`workbench.models.generation`), at
  evenly spread timesteps: one sample is one prompt's guidance pair (unconditional and text rows) at one step;
- loss (`output_fisher_loss`): the squared error between the UNet's output and the float UNet's output, whose
  target is the float output plus a fixed standard-normal draw `z`. At the float weights the plain error and its
  gradient are zero, so its Fisher would be empty; with `z` the gradient is `-J^T z` (`J`: the output's Jacobian
  in the weights) and `E[(J^T z)^2] = diag(J^T J)`, the diagonal of the Gauss-Newton matrix, which is the exact
  Hessian of that squared error at the float weights. This is the Monte-Carlo "true Fisher" of a Gaussian output
  (Martens, "New insights and perspectives on the natural gradient method", 2020, sec. 9; BackPACK's
  `DiagGGNMC`), one draw per sample; SqueezeLLM and coremltools' docstring example take the gradient of a data
  loss (`mse_loss(model(inp), target)`) instead, which needs training targets the analysis does not have.
- palettes: per-tensor LUTs of `nbits` on every candidate layer (`workbench.sweep.phases.candidate_layers`), fitted
  by coremltools' weighted exact 1-D k-means (`kmeans1d`, deterministic) on the float32 weights; the result is cast to
  float16, as Core ML stores the LUT.

`compare_with_skm` measures SKM's palettes and the workbench's plain per-tensor k-means at the same widths on the
same layers (so the same size) with the analysis' one-step probe.

Example:
    >>> weights = skm_palettize(pipe, 4, Calibration(DEFAULT_PROMPTS, seed=0), min_numel=2048)
    >>> with swapped_weights(pipe.unet, weights):
    ...     latents = probe()
    >>> compare_with_skm(pipe, (4, 6), AnalysisConfig(min_numel=2048)).to_frame()
"""

from __future__ import annotations

import copy
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig
from workbench.errors import InvalidValueError
from workbench.models.generation import generate_images
from workbench.models.layers import REFERENCE_MIN_NUMEL, get_layer
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import SUPPORTED_NBITS
from workbench.palettes.size import bits_per_param
from workbench.palettes.stash import WeightStash
from workbench.sweep.phases import candidate_layers
from workbench.sweep.probe import OneStepProbe

DEFAULT_CALIBRATION_SAMPLES = 128  # coremltools' `calibration_nsamples` default
_DIRECTION_SEED_OFFSET = 1_000_003  # the loss' random directions: a stream apart from the latents' seeds


@dataclass(frozen=True)
class Calibration:
    """SKM's calibration set: the float pipeline's trajectories it is read from, and how many samples it keeps.

    Attributes:
        prompts (`tuple[str, ...]`, defaults to `DEFAULT_PROMPTS`): the analysis' prompts.
        seed (`int`, defaults to 0): the first prompt's seed; the loss' directions come from `seed` too.
        num_samples (`int`, defaults to 128): samples kept (coremltools' `calibration_nsamples` default), one
            prompt at one step each.
        height, width (`int`, *optional*): image size; None = the pipeline's default.
    """

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    num_samples: int = DEFAULT_CALIBRATION_SAMPLES
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise InvalidValueError("calibration needs at least one prompt")
        if self.num_samples < 1:
            raise InvalidValueError(f"num_samples must be >= 1, got {self.num_samples}")


@dataclass(frozen=True)
class CalibrationSample:
    """One UNet call of a calibration set: one prompt's rows of the pipeline's call at one step.

    Attributes:
        args, kwargs: the UNet's positional and keyword arguments (tensors on the CPU, batch = the prompt's
            guidance pair, or its one row without guidance).
        direction (`torch.Tensor`): standard-normal, the shape of the UNet's output: the loss' random target offset.
    """

    args: tuple
    kwargs: dict
    direction: torch.Tensor


def _take_rows(value, rows: torch.Tensor, batch: int):
    """`value` with every tensor whose first axis is the call's batch cut to `rows` (copies), recursively."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.detach()[rows].cpu()
        return value.detach().clone().cpu()
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, rows, batch) for v in value)
    return value


def _to_model(value, device: torch.device, dtype: torch.dtype):
    """`value` with every tensor in it (nested in dicts, lists, tuples) on `device`, floating ones as `dtype` (a
    float16 pipeline's inputs for the float32 copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _to_model(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_model(v, device, dtype) for v in value)
    return value


def _split_call(args: tuple, kwargs: dict, n_prompts: int) -> list[tuple[tuple, dict]]:
    """One recorded UNet call of `n_prompts` prompts as one (args, kwargs) per prompt."""
    sample = args[0] if args else kwargs["sample"]
    batch = int(sample.shape[0])
    if batch not in (n_prompts, 2 * n_prompts):
        raise RuntimeError(f"the UNet was called on a batch of {batch} for {n_prompts} prompts; expected n or 2n")
    per_prompt = []
    for i in range(n_prompts):
        # diffusers stacks the guidance batch as [unconditional rows; text rows]
        rows = torch.tensor([i, n_prompts + i] if batch == 2 * n_prompts else [i])
        per_prompt.append((_take_rows(args, rows, batch), _take_rows(kwargs, rows, batch)))
    return per_prompt


def calibration_samples(pipe, calibration: Calibration = Calibration()) -> list[CalibrationSample]:
    """The UNet's inputs along the float pipeline's trajectories: `calibration.num_samples` (prompt, step) pairs.

    The pipeline generates every prompt (negative prompt "", image `i` from seed `seed + i`: `generate_images`) in
    `steps = ceil(num_samples / len(prompts))` steps and its UNet calls are recorded; `steps` of the calls, evenly
    spread over the trajectory (all of them where the scheduler calls the UNet once a step), give one sample per
    prompt each, in call-major order, the first `num_samples` kept.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline (its UNet is only called, not changed).
        calibration (`Calibration`, defaults to `Calibration()`): prompts, seed, samples and image size.

    Returns:
        `list[CalibrationSample]`, CPU tensors.
    """
    prompts, seed, num_samples = list(calibration.prompts), calibration.seed, calibration.num_samples
    steps = math.ceil(num_samples / len(prompts))
    calls: list[list[tuple[tuple, dict]]] = []  # per UNet call, one (args, kwargs) per prompt

    def record(module, args, kwargs):
        calls.append(_split_call(args, kwargs, len(prompts)))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_images(pipe, prompts, seed=seed, steps=steps, height=calibration.height, width=calibration.width)
    finally:
        handle.remove()
    # a scheduler may call the UNet more than once a step (PNDM's warm-up): keep `steps` calls spread evenly
    keep = np.unique(np.linspace(0, len(calls) - 1, steps).round().astype(int))
    chosen = [pair for index in keep for pair in calls[index]][:num_samples]
    generator = torch.Generator("cpu").manual_seed(seed + _DIRECTION_SEED_OFFSET)
    samples = []
    for args, kwargs in chosen:
        sample = args[0] if args else kwargs["sample"]
        direction = torch.randn(sample.shape, generator=generator, dtype=torch.float32)
        samples.append(CalibrationSample(args, kwargs, direction))
    return samples


def output_fisher_loss(model: torch.nn.Module, sample: CalibrationSample) -> torch.Tensor:
    """SKM's `loss_fn`: `0.5 * sum((out - target)^2)` with `target = out_float + direction` (module docstring).

    `out` is the UNet's output on the sample; `out_float`, the float UNet's, is `out` itself held constant
    (SKM takes gradients at the float weights), so the gradient in the weights is `-J^T direction`.
    """
    weight = next(model.parameters())  # SKM moves the model to CUDA where there is one
    out = model(
        *_to_model(sample.args, weight.device, weight.dtype), **_to_model(sample.kwargs, weight.device, weight.dtype)
    )
    out = out[0] if isinstance(out, tuple) else out.sample
    target = out.detach() + sample.direction.to(out.device, out.dtype)
    return 0.5 * torch.nn.functional.mse_loss(out, target, reduction="sum")


@contextmanager
def _coremltools_log_level(level: int) -> Iterator[None]:
    """coremltools.optimize.torch's logger (INFO by default, with its own handler) at `level` for the body."""
    logger = logging.getLogger("coremltools.optimize.torch")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _check_nbits(nbits: int) -> None:
    if nbits not in SUPPORTED_NBITS:
        raise InvalidValueError(f"unsupported bit width {nbits!r}; valid: {list(SUPPORTED_NBITS)}")


def _float_copy(unet: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """A float32 CPU copy of `unet` in eval mode whose only trainable parameters are the weights of `names`."""
    copied = copy.deepcopy(unet).eval()
    if copied.dtype != torch.float32 or copied.device.type != "cpu":
        copied = copied.to("cpu", torch.float32)
    copied.requires_grad_(False)
    for name in names:  # SKM reads a gradient for every trainable parameter: the candidates' only
        get_layer(copied, name).weight.requires_grad_(True)
    return copied


def _skm_config(names: Sequence[str], nbits: int, num_samples: int):
    """coremltools' config: a per-tensor LUT of `nbits` on each of `names` (by exact name), nothing else."""
    from coremltools.optimize.torch.palettization import ModuleSKMPalettizerConfig, SKMPalettizerConfig

    module_config = ModuleSKMPalettizerConfig(n_bits=nbits, granularity="per_tensor")
    return SKMPalettizerConfig(
        module_name_configs={re.escape(name): module_config for name in names},  # keys are regexes
        calibration_nsamples=num_samples,
    )


def skm_sensitivity(
    pipe,
    calibration: Calibration = Calibration(),
    *,
    min_numel: int = REFERENCE_MIN_NUMEL,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """SKM's sensitivities of the candidate weights: `SKMPalettizer.compute_sensitivity` with `output_fisher_loss`
    over `calibration_samples`, on a float32 CPU copy of `pipe.unet` (the pipeline's own is not changed).

    They do not depend on the palette width, so one result serves `skm_palettize` at every width. Arguments as
    `skm_palettize`'s.

    Returns:
        `dict[str, torch.Tensor]`: `"<layer>.weight"` -> the squared gradients summed over the samples, scaled by
        coremltools to a maximum of 1 per tensor and clipped below at 1e-12 (its `_process_sensitivity`).
    """
    from coremltools.optimize.torch.palettization import SKMPalettizer

    names = list(candidate_layers(pipe.unet, min_numel).layers)
    samples = calibration_samples(pipe, calibration)
    palettizer = SKMPalettizer(_float_copy(pipe.unet, names), _skm_config(names, 4, len(samples)))  # width unused
    with torch.enable_grad(), _coremltools_log_level(logging.INFO if progress else logging.WARNING):
        return palettizer.compute_sensitivity(samples, output_fisher_loss)


def skm_palettize(
    pipe,
    nbits: int,
    calibration: Calibration = Calibration(),
    *,
    min_numel: int = REFERENCE_MIN_NUMEL,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Palettize a float32 CPU copy of `pipe.unet` with coremltools' `SKMPalettizer`; return its weights.

    Every candidate layer (`candidate_layers(unet, min_numel)`) gets a per-tensor LUT of `2**nbits` entries,
    fitted by coremltools' exact 1-D k-means on the float32 weights weighted by `skm_sensitivity` (the Fisher
    estimate of `output_fisher_loss` over `calibration_samples`). The pipeline's own UNet is left as it was.
    Deterministic: the same arguments give bit-identical weights (with the same torch thread count, which decides
    the order of the gradients' sums).

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline.
        nbits (`int`): palette width, one of 1, 2, 3, 4, 6, 8.
        calibration (`Calibration`, defaults to `Calibration()`): the calibration set (prompts, seeds of the
            trajectories and of the loss' directions, samples, image size); unused when `sensitivity` is given.
        min_numel (`int`, defaults to 100,000): candidates have `weight.numel() > min_numel`
            (`workbench.models.loader.default_min_numel` gives the model's).
        sensitivity (`Mapping[str, torch.Tensor]`, *optional*): `skm_sensitivity`'s result, to reuse across
            widths; None = computed here from the arguments above.
        progress (`bool`, defaults to False): keep coremltools' INFO log lines (one per sample and layer).

    Returns:
        `dict[str, torch.Tensor]`: candidate layer -> palettized weight, float16 on the CPU, the layer's shape;
        each takes at most `2**nbits` distinct values.
    """
    from coremltools.optimize.torch.palettization import SKMPalettizer

    _check_nbits(nbits)
    names = list(candidate_layers(pipe.unet, min_numel).layers)
    if sensitivity is None:
        sensitivity = skm_sensitivity(pipe, calibration, min_numel=min_numel, progress=progress)
    missing = [name for name in names if f"{name}.weight" not in sensitivity]
    if missing:
        raise InvalidValueError(f"sensitivity lacks {len(missing)} candidate weight(s), e.g. {missing[:3]}")
    unet = _float_copy(pipe.unet, names)
    with (
        tempfile.TemporaryDirectory(prefix="skm-") as folder,
        _coremltools_log_level(logging.INFO if progress else logging.WARNING),
    ):
        path = str(Path(folder) / "sensitivity.pt")  # SKM's `compress` reads sensitivities from a file only
        torch.save({f"{name}.weight": sensitivity[f"{name}.weight"] for name in names}, path)
        config = _skm_config(names, nbits, num_samples=1)  # no calibration here: the sensitivities are given
        compressed = SKMPalettizer(unet, config).compress(sensitivity_path=path, inplace=True)
    return {name: get_layer(compressed, name).weight.detach().to("cpu", torch.float16) for name in names}


@contextmanager
@torch.no_grad()
def swapped_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Give `model`'s layers the `weights` (layer name -> tensor of its shape) for the duration of a `with` block,
    then restore the originals bitwise (`workbench.palettes.stash.WeightStash`), also on error.

    Values are cast to each weight's dtype and device, so float16 palettes run in a float32 model unchanged.
    """
    replaced: list[str] = []
    with WeightStash() as stash:
        try:
            for name, value in weights.items():
                weight = get_layer(model, name).weight
                if tuple(value.shape) != tuple(weight.shape):
                    raise InvalidValueError(f"{name}: replacement shape {tuple(value.shape)} != {tuple(weight.shape)}")
                stash.swap(name, weight, value.to(weight.device, weight.dtype))
                replaced.append(name)
            yield model
        finally:
            for name in reversed(replaced):
                stash.restore(name, get_layer(model, name).weight)


@dataclass(frozen=True)
class SKMComparison:
    """SKM and the workbench's plain k-means at one width, per-tensor LUTs on the same layers (the same size).

    Attributes:
        nbits: palette width.
        bits_per_param: the recipe's size over the candidates (`workbench.palettes.size.bits_per_param`, LUTs not
            counted).
        skm_psnr, ours_psnr: mean one-step latent PSNR over the prompts (dB, the analysis' probe).
        skm_seconds: wall time of `skm_palettize` given the sensitivities (coremltools' weighted k-means).
    """

    nbits: int
    bits_per_param: float
    skm_psnr: float
    ours_psnr: float
    skm_seconds: float

    @property
    def delta(self) -> float:
        """Ours minus SKM, dB."""
        return self.ours_psnr - self.skm_psnr


@dataclass(frozen=True)
class SKMBaseline:
    """`compare_with_skm`'s result: one `SKMComparison` per width, the calibration samples, the number of candidate
    layers and the wall time of `skm_sensitivity` (calibration trajectories and gradients, shared by the widths)."""

    comparisons: tuple[SKMComparison, ...]
    num_calibration: int
    layers: int
    sensitivity_seconds: float

    def delta(self, nbits: int) -> float:
        """Ours minus SKM at `nbits`, dB."""
        return next(c.delta for c in self.comparisons if c.nbits == nbits)

    def to_frame(self):
        import pandas as pd

        rows = [{**c.__dict__, "delta": c.delta} for c in self.comparisons]
        return pd.DataFrame(rows, columns=["nbits", "bits_per_param", "skm_psnr", "ours_psnr", "delta", "skm_seconds"])


def compare_with_skm(
    pipe,
    nbits: Sequence[int] = (4, 6),
    config: AnalysisConfig = AnalysisConfig(),
    *,
    num_calibration: int = DEFAULT_CALIBRATION_SAMPLES,
) -> SKMBaseline:
    """One-step latent PSNR of SKM's palettes and of the workbench's per-tensor k-means (`{layer: nbits}` for every
    candidate) at each width, measured with the analysis' probe (`OneStepProbe` on `config`'s prompts, seed and
    size) on `config`'s candidates (`min_numel`; its `layers`/`exclude` globs are not applied).

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline; its UNet is changed during measurements, restored exactly.
        nbits (`Sequence[int]`, defaults to (4, 6)): widths compared.
        config (`AnalysisConfig`): prompts, seed, image size, `min_numel`, as the analysis would use them.
        num_calibration (`int`, defaults to 128): SKM's calibration samples.

    Returns:
        `SKMBaseline`.
    """
    for b in nbits:
        _check_nbits(b)
    candidates = candidate_layers(pipe.unet, config.min_numel)
    probe = OneStepProbe(pipe, config.prompts, config.seed, config.height, config.width)
    calibration = Calibration(config.prompts, config.seed, num_calibration, config.height, config.width)
    start = time.perf_counter()
    sensitivity = skm_sensitivity(pipe, calibration, min_numel=config.min_numel)
    sensitivity_seconds = time.perf_counter() - start
    comparisons = []
    for b in nbits:
        recipe = dict.fromkeys(candidates.layers, b)
        start = time.perf_counter()
        weights = skm_palettize(pipe, b, min_numel=config.min_numel, sensitivity=sensitivity)
        seconds = time.perf_counter() - start
        with swapped_weights(pipe.unet, weights):
            skm = float(np.mean(probe.psnr()))
        with palettized(pipe.unet, recipe, PaletteCache()):
            ours = float(np.mean(probe.psnr()))
        comparisons.append(SKMComparison(b, bits_per_param(recipe, candidates.numels), skm, ours, seconds))
    return SKMBaseline(tuple(comparisons), num_calibration, len(candidates.layers), sensitivity_seconds)
