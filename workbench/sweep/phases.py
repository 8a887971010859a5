"""The sweeps of the pre-analysis: the UNet measured with its layers palettized alone, then one after another.

- `candidate_layers`: the layers measured (Linear/Conv2d over `min_numel` weights);
- `measure_baselines`: the original model, per-tensor int8 on every weight, per-channel int8;
- `isolated_sweep`: each candidate palettized alone at each width, restored after each;
- `sensitivity_order`: per width, the candidates least sensitive first;
- `cumulative_curves`: the candidates palettized one after another in that order, never restored in between,
  per palette of `sweep_palettes` (per-tensor k-means at each width, and grouped k-means with a group size).

Each phase builds its `EvalTask`s (`baseline_tasks`, `isolated_tasks`, `curve_tasks`) and hands them to an
executor (`workbench.sweep.executor`: in this process, or sharded over Ray workers), which reads each back from the
runner's store (`workbench.sweep.store.EvaluationRunner`) or measures it with the one-step probe.
`workbench.analysis.run.run_analysis` runs these, then builds and re-measures recipes.

Example:
    >>> candidates = candidate_layers(pipe.unet, min_numel=2048)
    >>> executor = LocalExecutor(pipe.unet, PaletteCache())
    >>> isolated = isolated_sweep(candidates, (2, 4), runner, executor)
    >>> curves = cumulative_curves(candidates, sensitivity_order(isolated), sweep_palettes((2, 4)), runner, executor)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers, select_layers
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig
from workbench.palettes.size import bits_per_param, recipe_nbytes
from workbench.sweep.executor import EvalTask, Executor, LayerPrefix
from workbench.sweep.store import Evaluation, EvaluationRunner


@dataclass(frozen=True)
class Candidates:
    """The layers an analysis measures, in module order.

    Attributes:
        layers: name -> module, `compressible_layers(unet, min_numel)`.
        numels: name -> `weight.numel()`, what bits/param is measured over.
        out_channels: name -> `weight.shape[0]` (grouped palettes hold one LUT per group of output channels).
    """

    layers: Mapping[str, torch.nn.Module]
    numels: Mapping[str, int]
    out_channels: Mapping[str, int]


def candidate_layers(
    unet: torch.nn.Module,
    min_numel: int,
    group_size: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Candidates:
    """The UNet's Linear/Conv2d layers with more than `min_numel` weights (those matching `include` globs, if any,
    and no `exclude` glob: `workbench.models.layers.select_layers`).

    Args:
        unet: the model.
        min_numel (`int`): candidates have `weight.numel() > min_numel`.
        group_size (`int`, defaults to 0): > 0: grouped palettes of this many output channels will be swept, so it
            must divide every candidate's output channels.

    Raises:
        InvalidValueError: no such layer (the message gives the largest layer's size), or `group_size` does not
            divide a candidate's output channels (the message lists the channel counts it does not divide).
    """
    layers = compressible_layers(unet, min_numel)
    if not layers:
        raise InvalidValueError(
            f"no Linear/Conv2d layer of the UNet has more than min_numel={min_numel} weights; lower it "
            f"(the largest layer has {max(m.weight.numel() for m in compressible_layers(unet, 0).values())})"
        )
    if include or exclude:
        layers = select_layers(layers, include, exclude)
    misfits = sorted({m.weight.shape[0] for m in layers.values() if group_size and m.weight.shape[0] % group_size})
    if misfits:
        raise InvalidValueError(
            f"group_size={group_size} does not divide the output channels {', '.join(map(str, misfits))} of the "
            "candidate layers"
        )
    return Candidates(
        layers=layers,
        numels={name: layer.weight.numel() for name, layer in layers.items()},
        out_channels={name: layer.weight.shape[0] for name, layer in layers.items()},
    )


@dataclass(frozen=True)
class Baselines:
    """The reference's baselines: the original model, per-tensor int8 on every weight, per-channel int8."""

    original: Evaluation
    linear_8bit: Evaluation
    linear_8bit_per_channel: Evaluation

    def psnr_means(self) -> dict[str, float]:
        """Baseline name -> mean PSNR over prompts (the first entries of the reference's `baselines`)."""
        return {
            "original": self.original.psnr_mean,
            "linear_8bit": self.linear_8bit.psnr_mean,
            "linear_8bit_per_channel": self.linear_8bit_per_channel.psnr_mean,
        }


def _linear8_recipe(unet: torch.nn.Module) -> dict[str, str]:
    """Per-tensor int8 on every module that has a weight tensor (norms included), as the reference."""
    return {
        name: "linear8"
        for name, module in unet.named_modules()
        if name and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.numel() > 0
    }


def _linear8_per_channel_recipe(unet: torch.nn.Module) -> dict[str, str]:
    """Per-channel int8 on every Linear and Conv2d layer (the stronger baseline)."""
    return {
        name: "linear8_per_channel"
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def baseline_tasks(unet: torch.nn.Module) -> list[EvalTask]:
    """The original model, then per-tensor int8 on every weight, then per-channel int8 (16 / 8 / 8 bits)."""
    return [
        EvalTask("baseline/original", "baseline", {}, {"config": "original", "bits_per_param": 16.0}),
        EvalTask("baseline/linear_8bit", "baseline", _linear8_recipe(unet),
                 {"config": "linear_8bit", "bits_per_param": 8.0}),
        EvalTask("baseline/linear_8bit_per_channel", "baseline", _linear8_per_channel_recipe(unet),
                 {"config": "linear_8bit_per_channel", "bits_per_param": 8.0}),
    ]  # fmt: skip


def measure_baselines(unet: torch.nn.Module, runner: EvaluationRunner, executor: Executor) -> Baselines:
    """Measure the `baseline_tasks`."""
    return Baselines(*executor.measure_all(baseline_tasks(unet), runner))


def sweep_palettes(nbits: Sequence[int], group_size: int = 0) -> list[PaletteConfig]:
    """The palettes of the cumulative curves: per-tensor k-means at each width, then, with `group_size` > 0, grouped
    k-means (`group_size` output channels per LUT) at each width."""
    palettes = [PaletteConfig(nbits=b) for b in nbits]
    if group_size:
        palettes += [PaletteConfig(nbits=b, granularity="per_grouped_channel", group_size=group_size) for b in nbits]
    return palettes


def prefetch_palettes(
    cache: PaletteCache,
    candidates: Candidates,
    palettes: Sequence[PaletteConfig],
    workers: int = 1,
    approximate: bool = False,
) -> None:
    """Fit every candidate's `palettes` in the background (`PaletteCache.prefetch`, `workers` threads), per-tensor
    before grouped and widest (slowest k-means) first, while the sweeps start at the narrowest; the same palettes as
    fitted on demand (`approximate`: the approximate ones, of the plain k-means `palettes`)."""
    ordered = sorted(palettes, key=lambda p: (p.granularity != "per_tensor", -p.nbits))
    if approximate:
        ordered = [p for p in ordered if p.mode == "kmeans"]
    jobs = [(name, layer.weight, p) for p in ordered for name, layer in candidates.layers.items()]
    cache.prefetch(jobs, workers=workers, approximate=approximate)


def prefetch_sweep_palettes(
    cache: PaletteCache,
    candidates: Candidates,
    palettes: Sequence[PaletteConfig],
    workers: int = 1,
    *,
    reference: int | None = None,
    approximate: bool = False,
) -> None:
    """A sweep's background fits (`prefetch_palettes`). The exhaustive sweep (`reference` None) needs every palette.

    A fast sweep measures every layer at its `reference` width first, so those palettes are queued first; then,
    with `approximate`, every palette's approximate one (what the refinement prices options with); then the exact
    palettes of the other widths but the widest, narrowest first, for the recipes. The widest are the slowest fits
    (8 bits: two thirds of the demo model's k-means time) and recipes give that width to the fewest layers: they are
    fitted when a measurement needs them (`workbench.sweep.executor.LocalExecutor` queues each call's own palettes).
    """
    if reference is None:
        prefetch_palettes(cache, candidates, palettes, workers=workers)
        return
    ahead = [PaletteConfig(nbits=reference)]
    prefetch_palettes(cache, candidates, ahead, workers=workers)
    if approximate:
        prefetch_palettes(cache, candidates, palettes, workers=workers, approximate=True)
    widest = max(p.nbits for p in palettes)
    rest = sorted((p for p in palettes if p not in ahead and p.nbits < widest), key=lambda p: p.nbits)
    cache.prefetch([(name, layer.weight, p) for p in rest for name, layer in candidates.layers.items()], workers)


@dataclass(frozen=True)
class IsolatedSweep:
    """nbits -> layer -> PSNR per prompt with only that layer palettized (per-tensor k-means), in module order."""

    psnr: Mapping[int, Mapping[str, tuple[float, ...]]]


def sweep_bits_per_param(recipe: Mapping[str, PaletteConfig], candidates: Candidates) -> float:
    """The candidates' bits/param with `recipe`'s layers palettized and the rest float16.

    Per-tensor palettes: the reference's measure, `workbench.palettes.size.bits_per_param` (LUTs not counted). Grouped
    palettes, whose LUTs grow with the number of groups: the stored bits, `8 * recipe_nbytes / numel` (LUTs counted).
    """
    if any(config.granularity == "per_grouped_channel" for config in recipe.values()):
        total = sum(candidates.numels.values())
        return 8 * recipe_nbytes(recipe, candidates.numels, candidates.out_channels) / total
    return bits_per_param(recipe, candidates.numels)


def isolated_point_tasks(candidates: Candidates, points: Sequence[tuple[str, int]]) -> list[EvalTask]:
    """Each (layer, width) of `points` palettized alone (per-tensor k-means), in the order given."""
    tasks = []
    for name, b in points:
        config = PaletteConfig(nbits=b)
        tasks.append(EvalTask(
            f"isolated/{config.key}/{name}", "isolated", {name: config},
            {"config": config.key, "nbits": b, "layer": name,
             "bits_per_param": sweep_bits_per_param({name: config}, candidates)},
        ))  # fmt: skip
    return tasks


def isolated_tasks(candidates: Candidates, nbits: Sequence[int]) -> list[EvalTask]:
    """Each candidate palettized alone (per-tensor k-means), per width, widths in the order given."""
    return isolated_point_tasks(candidates, [(name, b) for b in nbits for name in candidates.layers])


def isolated_points(
    candidates: Candidates, points: Sequence[tuple[str, int]], runner: EvaluationRunner, executor: Executor
) -> dict[tuple[str, int], tuple[float, ...]]:
    """Measure each (layer, width) of `points` alone (`isolated_point_tasks`): (layer, width) -> PSNR per prompt.
    The caller plans these evaluations on the runner's progress bar."""
    evaluations = executor.measure_all(isolated_point_tasks(candidates, points), runner)
    return {(e.layer, e.nbits): e.psnr for e in evaluations}


def isolated_sweep(
    candidates: Candidates, nbits: Sequence[int], runner: EvaluationRunner, executor: Executor
) -> IsolatedSweep:
    """Measure the `isolated_tasks`: each candidate palettized alone at each width, restored after each."""
    evaluations = iter(executor.measure_all(isolated_tasks(candidates, nbits), runner))
    return IsolatedSweep({b: {name: next(evaluations).psnr for name in candidates.layers} for b in nbits})


@dataclass(frozen=True)
class SensitivityOrder:
    """nbits -> the candidates, least sensitive first (highest mean isolated PSNR; module order breaks ties)."""

    layers: Mapping[int, tuple[str, ...]]


def sensitivity_order(isolated: IsolatedSweep) -> SensitivityOrder:
    """The order in which the cumulative curves add layers at each width."""

    def order(psnr: Mapping[str, tuple[float, ...]]) -> tuple[str, ...]:
        return tuple(sorted(psnr, key=lambda name: -float(np.mean(psnr[name]))))  # sorted() is stable

    return SensitivityOrder({b: order(psnr) for b, psnr in isolated.psnr.items()})


@dataclass(frozen=True)
class CumulativeCurve:
    """One cumulative sweep: the layers of `order` palettized one after another with `config`, never restored in
    between.

    Attributes:
        config: the palette every layer gets.
        order: the layers in the order they were added.
        psnr: layer -> PSNR per prompt with it and every layer before it palettized, in `order`.
    """

    config: PaletteConfig
    order: tuple[str, ...]
    psnr: Mapping[str, tuple[float, ...]]


@dataclass(frozen=True)
class CumulativeCurves:
    """nbits -> the per-tensor curve, and nbits -> the grouped curve (empty without `group_size`)."""

    per_tensor: Mapping[int, CumulativeCurve]
    grouped: Mapping[int, CumulativeCurve]


def curve_tasks(candidates: Candidates, config: PaletteConfig, order: Sequence[str]) -> list[EvalTask]:
    """The points of one cumulative curve: the first k layers of `order` palettized with `config`, k = 1..n, each
    a `LayerPrefix` of the same order (so an executor palettizes only the layer each point adds)."""
    tasks = []
    for position, (name, recipe) in enumerate(zip(order, LayerPrefix.points(order, config))):
        tasks.append(EvalTask(
            f"cumulative/{config.key}/{position}/{name}", "cumulative", recipe,
            {"config": config.key, "nbits": config.nbits, "layer": name, "position": position,
             "bits_per_param": sweep_bits_per_param(recipe, candidates)},
        ))  # fmt: skip
    return tasks


def cumulative_curves(
    candidates: Candidates,
    order: SensitivityOrder,
    palettes: Sequence[PaletteConfig],
    runner: EvaluationRunner,
    executor: Executor,
) -> CumulativeCurves:
    """One cumulative curve per palette of `palettes` (`sweep_palettes`), in that order, each adding the layers in
    the per-tensor sensitivity order of its width; all their points go to the executor at once."""
    tasks = [curve_tasks(candidates, p, order.layers[p.nbits]) for p in palettes]
    evaluations = iter(executor.measure_all([t for curve in tasks for t in curve], runner))
    curves = [
        CumulativeCurve(p, tuple(order.layers[p.nbits]), {t.fields["layer"]: next(evaluations).psnr for t in curve})
        for p, curve in zip(palettes, tasks)
    ]
    return CumulativeCurves(
        per_tensor={c.config.nbits: c for c in curves if c.config.granularity == "per_tensor"},
        grouped={c.config.nbits: c for c in curves if c.config.granularity == "per_grouped_channel"},
    )
