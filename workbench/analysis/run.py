"""The mixed-bit pre-analysis: per-layer PSNR sweeps, cumulative curves, baselines and re-measured recipes.

`run_analysis` runs these phases in order, each a function with typed inputs and results:

1. `candidate_layers` (`workbench.sweep.phases`) and `probe_pipeline`: the layers to measure; the pipeline's one
   denoising step recorded once (`workbench.sweep.probe.OneStepProbe`) and the resumable store its evaluations go to
   (`workbench.sweep.store`);
2. `measure_baselines`: the original model, linear 8-bit per tensor on every weight, per-channel int8;
3. `isolated_sweep`: each candidate palettized alone, per bit width, restored after each;
4. `sensitivity_order`: per bit width, the candidates least sensitive first;
5. `cumulative_curves`: per bit width (per-tensor palettes, and grouped ones with `group_size`), the candidates
   palettized one after another in that order, not restored between additions (2-5: `workbench.sweep.phases`);
6. `plan_recipes`: each strategy's recipes (`PlannedRecipe`) from those measurements;
7. `measure_recipes`: each recipe re-measured end to end (`recipe_tasks`, `RecipeResult`);
8. the refined strategy (`workbench.analysis.refine.refine_recipes`): the size-aware recipes refined where layers
   interact;
9. `workbench.analysis.trajectory.recipe_trajectories` (optional): full-trajectory images of each recipe against the
float
   model's.

Each phase builds its evaluations as tasks (`workbench.sweep.executor.EvalTask`: an id and the recipe in force) and
hands
them to one executor's `measure_all`: a `LocalExecutor` in this process (the default), or a
`workbench.sweep.ray_executor.RayExecutor` that shards them over Ray workers with the same results.

Every measurement is appended to an append-only JSONL store keyed by a hash of everything that determines it, so
an interrupted analysis resumes where it stopped and a changed one starts afresh.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(nbits=(2, 4, 6, 8), min_numel=2048), out_dir="out")
    >>> result.to_frame().head()
    >>> result.recipes_frame()
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.fast import fast_phases, keep_best_per_target
from workbench.analysis.plan import (
    analysis_identity,
    build_preanalysis,
    measure_recipes,
    plan_recipes,
    sweep_measurements,
)
from workbench.analysis.refine import old_names, refine_recipes
from workbench.analysis.result import AnalysisResult, RefinementReport, Timing
from workbench.analysis.trajectory import recipe_trajectories
from workbench.errors import InvalidValueError
from workbench.palettes.cache import DEFAULT_PALETTE_MEMORY, PaletteCache
from workbench.palettes.config import PaletteConfig
from workbench.palettes.importance import IMPORTANCE_FILE
from workbench.palettes.stash import WeightStash
from workbench.sweep.executor import Executor, LocalExecutor
from workbench.sweep.phases import (
    Baselines,
    Candidates,
    candidate_layers,
    cumulative_curves,
    isolated_sweep,
    measure_baselines,
    prefetch_sweep_palettes,
    sensitivity_order,
    sweep_palettes,
)
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import Evaluation, EvaluationRunner, EvaluationStore, model_version, open_store


@dataclass(frozen=True)
class ProbedPipeline:
    """The pipeline's recorded one-step run and where its evaluations go.

    Attributes:
        probe: replays the recorded step for the UNet's current weights.
        identity: everything the measurements depend on (`workbench.analysis.plan.analysis_identity`).
        store: the resumable store in `out_dir/store/`, or None (in memory).
        runner: reads each evaluation back from the store or measures it.
    """

    probe: OneStepProbe
    identity: dict
    store: EvaluationStore | None
    runner: EvaluationRunner


def probe_pipeline(
    pipe,
    config: AnalysisConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[Evaluation], None] | None = None,
) -> ProbedPipeline:
    """Record the pipeline's one-step run (`OneStepProbe`) and open the store of its identity in `out_dir`."""
    probe = OneStepProbe(pipe, config.prompts, config.seed, config.height, config.width)
    identity = analysis_identity(pipe, config, probe)
    store = None if out_dir is None else open_store(out_dir, identity, resume=resume)
    return ProbedPipeline(probe, identity, store, EvaluationRunner(probe, store, progress, callback))


def sweep_evaluations(config: AnalysisConfig, num_layers: int) -> int:
    """Evaluations before the recipes: 3 baselines, the isolated sweep, the per-tensor and grouped curves (the
    fast sweep plans its own)."""
    if config.sweep == "fast":
        return 3
    return 3 + len(config.nbits) * num_layers * (3 if config.group_size else 2)


def fit_workers(device: torch.device) -> int:
    """Background palette-fit threads that leave the UNet its cores: every core but one when the UNet runs on an
    accelerator, else the cores torch's own threads do not use (0: none free). The fits run in numpy and the numba
    solver without the GIL, so threads use the cores as processes would, without copying weights."""
    cores = os.cpu_count() or 1
    return cores - 1 if torch.device(device).type != "cpu" else cores - torch.get_num_threads()


def sweep_and_plan(
    candidates: Candidates,
    config: AnalysisConfig,
    baselines: Baselines,
    palettes: Sequence[PaletteConfig],
    runner: EvaluationRunner,
    executor: Executor,
    workers: int,
):
    """Phases 3-7: the sweeps (exhaustive, or the fast sweep's `workbench.analysis.fast.fast_phases`), the recipes
    planned on them and re-measured. Returns `(isolated, curves, recipes, fast)`, `fast` the fast sweep's phases or
    None; of the fast sweep's alternatives at a size only the best measured is kept (the others go to its report)."""
    fast = None
    if config.sweep == "fast":
        fast = fast_phases(candidates, config, baselines, runner, executor, workers)
        isolated, curves, planned = fast.isolated, fast.curves, fast.planned
    else:
        isolated = isolated_sweep(candidates, config.nbits, runner, executor)
        curves = cumulative_curves(candidates, sensitivity_order(isolated), palettes, runner, executor)
        planned = plan_recipes(sweep_measurements(candidates, isolated, curves, baselines), config)
    recipes = measure_recipes(planned, runner, executor)
    if fast is not None:
        recipes, dropped = keep_best_per_target(recipes)
        fast.report.alternatives.extend(dropped)
    return isolated, curves, recipes, fast


# --------------------------------------------------------------------------------------------------------------
# The analysis.


@torch.no_grad()
def run_analysis(
    pipe,
    config: AnalysisConfig = AnalysisConfig(),
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[Evaluation], None] | None = None,
    cache: PaletteCache | None = None,
    executor: Executor | None = None,
) -> AnalysisResult:
    """Run the pre-analysis (the phases of this module, in order) on `pipe`, a diffusers SD-1.x/2.x or SDXL pipeline.
    With `out_dir`, each evaluation is appended to `out_dir/store/<key>.jsonl` as soon as it is measured (resumable);
    the result files are written only at the end (`AnalysisResult.save`).

    Args:
        pipe: the pipeline; its UNet is palettized in place during evaluations and restored exactly.
        config (`AnalysisConfig`): what to measure.
        out_dir (`str` or `os.PathLike`, *optional*): where the store and the results go; None keeps it in memory.
        resume (`bool`, defaults to True): reuse a store with the same key; False starts it afresh.
        progress (`bool`, defaults to True): a tqdm bar (notebook-aware) with done/left and ETA.
        callback (`Callable[[Evaluation], None]`, *optional*): called after each newly measured evaluation.
        cache (`PaletteCache`, *optional*): palettes to reuse (k-means runs once per layer and config); None = a
            cache holding `DEFAULT_PALETTE_MEMORY` of palettes, the rest waiting until needed again in a private
            folder under the system's temp dir (never in `out_dir`), deleted at the end, or by the next analysis
            if this one is killed.
        executor (`Executor`, *optional*): what measures the sweeps' and recipes' tasks; None = a `LocalExecutor`
            in this process, fitting palettes in the background (`prefetch_palettes`, on `fit_workers` threads)
            where a CPU core is free. A `workbench.sweep.ray_executor.RayExecutor` shards them over Ray workers
            (the same results on CPU; this process alone writes the store, so either resumes the other's).
            Trajectories always run here.

    Returns:
        `AnalysisResult`.

    Raises:
        InvalidValueError: no candidate layers at `config.min_numel`, or a group size that does not divide one.
    """
    start = time.perf_counter()
    candidates = candidate_layers(pipe.unet, config.min_numel, config.group_size, config.layers, config.exclude)
    if cache is None:  # palettes over the budget wait on disk, so memory does not grow with the number of widths
        cache = PaletteCache(max_bytes=DEFAULT_PALETTE_MEMORY, spill_dir=True)
    with contextlib.ExitStack() as stack:
        probed = probe_pipeline(pipe, config, out_dir, resume=resume, progress=progress, callback=callback)
        stack.callback(cache.close)  # stops background fits, deletes a private spill folder; held palettes stay
        stack.callback(probed.runner.close)
        # one stash for the whole analysis: each original over its memory budget is written to disk once, not once
        # per recipe put in force (`WeightStash`)
        stash = stack.enter_context(WeightStash())
        phases = _measure(pipe, config, candidates, probed, cache, executor, stash)
    return _finish(pipe, config, candidates, probed, phases, cache, start, out_dir)


@dataclass
class _Phases:
    """What `run_analysis`'s phases measured, before the result is assembled."""

    executor: Executor
    local: bool
    isolated: object
    curves: object
    baselines: Baselines
    recipes: list
    fast: object = None
    refinement: RefinementReport = RefinementReport()
    importance: object = None
    trajectory: list = field(default_factory=list)


def _measure(pipe, config: AnalysisConfig, candidates: Candidates, probed: ProbedPipeline, cache, executor,
             stash: WeightStash) -> _Phases:  # fmt: skip
    """Phases 2-9: baselines, sweeps, recipes, refinement, trajectories; originals wait in `stash`."""
    unet, runner = pipe.unet, probed.runner
    runner.plan(sweep_evaluations(config, len(candidates.layers)))
    palettes = sweep_palettes(config.nbits, config.group_size)
    workers = fit_workers(unet.device)
    background = executor is None and workers > 0  # background fits where this function makes the executor
    if executor is None:
        executor = LocalExecutor(unet, cache, prefetch=max(1, workers) if background else 0, stash=stash)
    local = isinstance(executor, LocalExecutor)  # measures in this process (a given one too)
    if config.data_aware and not local:
        raise InvalidValueError("data_aware refinement fits palettes with this process' importances: run it in one "
                                "process (no --workers)")  # fmt: skip
    baselines = measure_baselines(unet, runner, executor)
    if background:
        reference = config.fast.reference_bits if config.sweep == "fast" else None
        prefetch_sweep_palettes(cache, candidates, palettes, max(1, workers), reference=reference,
                                approximate=config.approximate_pricing)  # fmt: skip
    isolated, curves, recipes, fast = sweep_and_plan(candidates, config, baselines, palettes, runner, executor,
                                                     max(1, workers))  # fmt: skip
    phases = _Phases(executor, local, isolated, curves, baselines, recipes, fast)
    if "refined" in config.strategies:
        measurements = sweep_measurements(candidates, isolated, curves, baselines)
        refined, phases.refinement, phases.importance = refine_recipes(probed.probe, measurements, recipes, runner,
                                                                       executor, cache, config, stash)  # fmt: skip
        phases.recipes = [*recipes, *refined]
    if config.trajectory:
        phases.trajectory = recipe_trajectories(pipe, config, phases.recipes, runner, cache)
    return phases


def _finish(pipe, config, candidates, probed: ProbedPipeline, phases: _Phases, cache, start, out_dir):
    """The `AnalysisResult` of the phases, saved to `out_dir` (with the importances of a data-aware analysis)."""
    preanalysis = build_preanalysis(model_version(pipe), phases.isolated, phases.curves, phases.baselines,
                                    phases.recipes, old_names(phases.recipes))  # fmt: skip
    execution = phases.executor.summary()
    timing = Timing.of(start, probed.probe, probed.runner, cache, None if phases.local else execution)
    evaluations = list(probed.runner.evaluations)
    if phases.fast is not None:
        evaluations += phases.fast.finish(phases.recipes, phases.curves, candidates)
    result = AnalysisResult(
        config=config, identity=probed.identity, layers=dict(candidates.numels), evaluations=evaluations,
        recipes=phases.recipes, preanalysis=preanalysis, timing=timing, trajectory=phases.trajectory,
        fast=None if phases.fast is None else phases.fast.report, execution=execution, refinement=phases.refinement,
    )  # fmt: skip
    if out_dir is not None:
        result.save(out_dir)
        if config.data_aware:  # what `workbench export --importance` fits the data-aware palettes with
            phases.importance.save(Path(out_dir) / IMPORTANCE_FILE)
        probed.store.mark_complete()
    return result
