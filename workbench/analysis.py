"""The mixed-bit pre-analysis: per-layer PSNR sweeps, cumulative curves, baselines and re-measured recipes.

`run_analysis` runs these phases in order, each a function with typed inputs and results:

1. `candidate_layers` (`workbench.sweeps`) and `probe_pipeline`: the layers to measure; the pipeline's one
   denoising step recorded once (`workbench.probe.OneStepProbe`) and the resumable store its evaluations go to
   (`workbench.store`);
2. `measure_baselines`: the original model, linear 8-bit per tensor on every weight, per-channel int8;
3. `isolated_sweep`: each candidate palettized alone, per bit width, restored after each;
4. `sensitivity_order`: per bit width, the candidates least sensitive first;
5. `cumulative_curves`: per bit width (per-tensor palettes, and grouped ones with `group_size`), the candidates
   palettized one after another in that order, not restored between additions (2-5: `workbench.sweeps`);
6. `plan_recipes`: each strategy's recipes (`PlannedRecipe`) from those measurements;
7. `measure_recipes`: each recipe re-measured end to end (`recipe_tasks`, `RecipeResult`);
8. the refined strategy (`workbench.refine_analysis.refine_recipes`): the size-aware recipes refined where layers
   interact;
9. `workbench.trajectory.recipe_trajectories` (optional): full-trajectory images of each recipe against the float
   model's.

Each phase builds its evaluations as tasks (`workbench.executor.EvalTask`: an id and the recipe in force) and hands
them to one executor's `measure_all`: a `LocalExecutor` in this process (the default), or a
`workbench.ray_executor.RayExecutor` that shards them over Ray workers with the same results.

Every measurement is appended to an append-only JSONL store keyed by a hash of everything that determines it, so
an interrupted analysis resumes where it stopped and a changed one starts afresh.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(nbits=(2, 4, 6, 8), min_numel=2048), out_dir="out")
    >>> result.to_frame().head()
    >>> result.recipes_frame()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.allocation import (
    AllocatedRecipe,
    Measurements,
    size_aware_recipes,
    threshold_recipe_within,
    threshold_recipes,
    threshold_within,
    unique_recipes,
)
from workbench.analysis_result import AnalysisResult, RecipeResult, Timing
from workbench.errors import InvalidValueError
from workbench.executor import EvalTask, Executor, LocalExecutor
from workbench.fast import FastSettings
from workbench.importance import IMPORTANCE_FILE
from workbench.palettize import SUPPORTED_NBITS, PaletteCache, PaletteConfig
from workbench.probe import OneStepProbe
from workbench.recipes import PreAnalysis
from workbench.refine import DEFAULT_KS
from workbench.size import bits_per_param
from workbench.store import Evaluation, EvaluationRunner, EvaluationStore, analysis_identity, model_version, open_store
from workbench.sweeps import (
    Baselines,
    Candidates,
    CumulativeCurves,
    IsolatedSweep,
    candidate_layers,
    cumulative_curves,
    isolated_sweep,
    measure_baselines,
    prefetch_sweep_palettes,
    sensitivity_order,
    sweep_palettes,
)

if TYPE_CHECKING:
    pass

STRATEGIES = ("apple", "size-aware", "refined")
SWEEPS = ("exhaustive", "fast")
DEFAULT_PALETTE_MEMORY = 512 << 20  # bytes of palettes an analysis holds in memory; the rest are spilled to disk
THRESHOLD_RULES = ("curves", "reference")

# COCO-caption-style prompts, as the reference uses (8 prompts, CFG batch 16).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a wooden table next to a window",
    "a red double decker bus driving down a city street",
    "a plate of food with broccoli, rice and a piece of chicken",
    "a man riding a wave on top of a surfboard in the ocean",
    "a living room with a couch, a lamp and a flat screen television",
    "two giraffes standing in a grassy field under a blue sky",
    "a kitchen with white cabinets, a stove and a large window",
    "a small boat floating on a lake with mountains in the background",
)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)`, then put the previous value back (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that decides an analysis' measurements (and so its store key).

    Args:
        nbits (`tuple[int, ...]`, defaults to (1, 2, 4, 6, 8)): palette widths swept, as the reference.
        min_numel (`int`, defaults to 100,000): candidate layers have `weight.numel() > min_numel`; tiny models
            need ~2048 (coremltools' default `weight_threshold`).
        prompts (`tuple[str, ...]`, defaults to `DEFAULT_PROMPTS`): the evaluation prompts (negative prompt "").
        seed (`int`, defaults to 0): the one generator state restored before every run.
        height, width (`int`, *optional*): image size; None = the pipeline's default.
        num_recipes (`int`, defaults to 7): K, recipes per strategy (the reference's thresholds count).
        strategies (`tuple[str, ...]`, defaults to ("apple", "size-aware", "refined")): recipe strategies to run:
            the reference's threshold rule, the size-aware knapsack, and the knapsack's recipes refined where layers
            interact by the latent error's gradient and measured steps (`workbench.refine`; needs "size-aware").
        threshold_rule (`str`, defaults to "curves"): "reference" = `linspace(original - 1, linear_8bit + 5, K)`
            exactly; "curves" = K thresholds read off the measured cumulative curves so that the recipes'
            bits/param spread evenly (the reference rule breaks where "original" is the ~200 dB cap of a
            deterministic device).
        group_size (`int`, defaults to 0): > 0 adds cumulative sweeps with `per_grouped_channel` palettes of
            this many output channels per LUT (ordered by the per-tensor isolated sensitivity).
        size_aware_targets (`tuple[float, ...]`, defaults to ()): extra bits/param targets for the size-aware
            strategy; it always also targets every apple recipe's bits/param.
        trajectory (`bool`, defaults to False): also generate full trajectories for every recipe and compare
            decoded images with the float model's (see `workbench.trajectory`).
        trajectory_steps (`int`, *optional*): steps of the full trajectories; None = the pipeline's default.
        trajectory_prompts (`tuple[str, ...]`, *optional*): None = `prompts`.
        layers (`tuple[str, ...]`, defaults to ()): glob patterns (`fnmatch`, `*` spans dots) of the candidates to
            measure, e.g. `("mid_block.*",)`; empty = every candidate. Layers left out stay float16 in recipes.
        exclude (`tuple[str, ...]`, defaults to ()): glob patterns of candidates to leave out.
        sweep (`str`, defaults to "exhaustive"): "exhaustive" measures every candidate at every width and the
            cumulative curves (the reference's method); "fast" measures every candidate at `fast_reference_bits`,
            a calibration subset at every width, predicts the rest and checks it (`workbench.fast`).
        fast_reference_bits (`int`, defaults to 2): the width the fast sweep measures every candidate at.
        fast_calibration (`float`, defaults to 0.03): fraction of candidates the fast sweep measures at every
            width.
        fast_checks (`float`, defaults to 0.05): predicted points of the planned recipes measured (in 4 rounds of
            plan, check, refit), as a fraction of the number of candidates.
        refine_rounds (`int`, defaults to 4): the "refined" strategy's linearisations per recipe at most (each one
            backward pass and up to 4 measured candidates, 2 in a fast analysis; it stops early when a round finds
            nothing better).
        data_aware (`bool`, defaults to False): the refined recipes may give a layer its width's data-aware palette
            (`wkmeans<b>`, the same bytes, iOS17); the importances they are fitted with are saved beside the
            results as `importance.npz`, which `workbench export --importance` needs. One process only (no Ray).
    """

    nbits: tuple[int, ...] = (1, 2, 4, 6, 8)
    min_numel: int = 100_000
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_recipes: int = 7
    strategies: tuple[str, ...] = STRATEGIES
    threshold_rule: str = "curves"
    group_size: int = 0
    size_aware_targets: tuple[float, ...] = ()
    trajectory: bool = False
    trajectory_steps: int | None = None
    trajectory_prompts: tuple[str, ...] | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sweep: str = "exhaustive"
    fast_reference_bits: int = 2
    fast_calibration: float = 0.03
    fast_checks: float = 0.05
    refine_rounds: int = 4
    data_aware: bool = False

    def __post_init__(self):
        nbits = tuple(sorted({int(b) for b in self.nbits}))
        bad = [b for b in nbits if b not in SUPPORTED_NBITS]
        if bad or not nbits:
            raise InvalidValueError(
                f"unsupported bit width(s) {bad or list(self.nbits)}; valid: {list(SUPPORTED_NBITS)}"
            )
        object.__setattr__(self, "nbits", nbits)
        if self.min_numel < 0:
            raise InvalidValueError(f"min_numel must be >= 0, got {self.min_numel}")
        prompts = tuple(str(p) for p in self.prompts)
        if not prompts:
            raise InvalidValueError("prompts must hold at least one prompt")
        object.__setattr__(self, "prompts", prompts)
        if self.num_recipes < 1:
            raise InvalidValueError(f"num_recipes must be >= 1, got {self.num_recipes}")
        strategies = tuple(self.strategies)
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise InvalidValueError(f"unknown strategy {unknown or strategies}; valid: {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategies", strategies)
        self._check_refined()
        if self.threshold_rule not in THRESHOLD_RULES:
            raise InvalidValueError(
                f"unknown threshold_rule {self.threshold_rule!r}; valid: {', '.join(THRESHOLD_RULES)}"
            )
        if self.group_size < 0:
            raise InvalidValueError(f"group_size must be >= 0 (0 = per-tensor only), got {self.group_size}")
        object.__setattr__(self, "size_aware_targets", tuple(float(t) for t in self.size_aware_targets))
        if any(not 1 <= t <= 16 for t in self.size_aware_targets):
            raise InvalidValueError(
                f"size_aware_targets must lie in [1, 16] bits/param, got {self.size_aware_targets}"
            )
        if self.trajectory_prompts is not None:
            object.__setattr__(self, "trajectory_prompts", tuple(str(p) for p in self.trajectory_prompts))
        object.__setattr__(self, "layers", tuple(str(p) for p in self.layers))
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude))
        self._check_sweep()

    def _check_refined(self) -> None:
        if "refined" in self.strategies and "size-aware" not in self.strategies:
            raise InvalidValueError("strategy 'refined' refines the size-aware recipes: add 'size-aware' too")
        if self.data_aware and "refined" not in self.strategies:
            raise InvalidValueError("data_aware palettes are chosen by the 'refined' strategy: add it to strategies")
        if self.refine_rounds < 1:
            raise InvalidValueError(f"refine_rounds must be >= 1, got {self.refine_rounds}")

    def _check_sweep(self) -> None:
        if self.sweep not in SWEEPS:
            raise InvalidValueError(f"unknown sweep {self.sweep!r}; valid: {', '.join(SWEEPS)}")
        if self.sweep != "fast":
            return
        if self.fast_reference_bits not in self.nbits:
            raise InvalidValueError(
                f"fast_reference_bits={self.fast_reference_bits} is not one of the swept widths {list(self.nbits)}"
            )
        for name in ("fast_calibration", "fast_checks"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidValueError(f"{name} must lie in [0, 1] (a fraction of the candidates), got {value}")
        if self.group_size:
            raise InvalidValueError("group_size > 0 (grouped cumulative curves) needs sweep='exhaustive'")

    @property
    def fast_settings(self) -> FastSettings:
        return FastSettings(self.fast_reference_bits, self.fast_calibration, self.fast_checks)

    @property
    def refine_ks(self) -> tuple[int, ...]:
        """Layer changes per candidate the refinement measures each round: fewer in a fast analysis."""
        return tuple(self.fast_settings.refine_ks if self.sweep == "fast" else DEFAULT_KS)

    @property
    def approximate_pricing(self) -> bool:
        """Whether the refinement prices options with approximate palettes: in a fast analysis (which fits exactly
        only what it measures)."""
        return self.sweep == "fast" and "refined" in self.strategies

    def to_dict(self) -> dict:
        """The fields as JSON values; an exhaustive sweep's dict leaves out the fast sweep's settings, which decide
        nothing there, so stores written before they existed keep their keys."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.sweep == "exhaustive":
            for name in ("sweep", "fast_reference_bits", "fast_calibration", "fast_checks"):
                del d[name]
        if "refined" not in self.strategies:
            del d["refine_rounds"]
        if not self.data_aware:
            del d["data_aware"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AnalysisConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidValueError(f"unknown AnalysisConfig keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------------------------
# The recorded one-step run and where its evaluations go. The sweeps are in `workbench.sweeps`.


@dataclass(frozen=True)
class ProbedPipeline:
    """The pipeline's recorded one-step run and where its evaluations go.

    Attributes:
        probe: replays the recorded step for the UNet's current weights.
        identity: everything the measurements depend on (`workbench.store.analysis_identity`).
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


# --------------------------------------------------------------------------------------------------------------
# Recipes, their re-measurement, their full trajectories.


@dataclass(frozen=True)
class PlannedRecipe:
    """A recipe a strategy chose, before it is re-measured.

    Attributes:
        name: e.g. `recipe_4.50_bit_mixedpalette` (apple) or `recipe_4.50_bit_sizeaware`.
        strategy: "apple" or "size-aware".
        bits: layer -> bit width (16 = float16).
        selector: the PSNR threshold (apple) or the bits/param target (size-aware).
        predicted_psnr: the size-aware allocation's predicted PSNR; None for apple.
    """

    name: str
    strategy: str
    bits: Mapping[str, int]
    selector: float
    predicted_psnr: float | None = None


def sweep_measurements(
    candidates: Candidates, isolated: IsolatedSweep, curves: CumulativeCurves, baselines: Baselines
) -> Measurements:
    """What the strategies allocate from: the isolated sweep, the per-tensor curves and two baselines."""
    return Measurements(
        numels=dict(candidates.numels),
        isolated={b: {n: list(v) for n, v in d.items()} for b, d in isolated.psnr.items()},
        cumulative={b: {n: list(v) for n, v in c.psnr.items()} for b, c in curves.per_tensor.items()},
        original=baselines.original.psnr_mean,
        linear_8bit=baselines.linear_8bit.psnr_mean,
    )


def size_aware_targets(
    apple: Sequence[PlannedRecipe], numels: Mapping[str, int], config: AnalysisConfig
) -> list[float]:
    """Every apple recipe's bits/param below 16 (those include the rule's recipe within each of
    `config.size_aware_targets`), else `config.size_aware_targets`; with neither, `config.num_recipes` targets
    evenly from 3 to 6 bits/param."""
    targets = sorted({round(bits_per_param(r.bits, numels), 6) for r in apple})
    targets = [t for t in targets if t < 16] or list(config.size_aware_targets)
    return targets or list(np.linspace(3.0, 6.0, config.num_recipes))


def plan_recipes(measurements: Measurements, config: AnalysisConfig) -> tuple[PlannedRecipe, ...]:
    """The recipes of `config.strategies`: the threshold rule's ("apple": its K thresholds, and its largest recipe
    within each of `config.size_aware_targets`, so the other strategies are compared at its exact sizes), then the
    size-aware allocation's at `size_aware_targets`."""
    planned: list[PlannedRecipe] = []
    if "apple" in config.strategies:
        rule = threshold_recipes(measurements, config.num_recipes, rule=config.threshold_rule)
        for t in config.size_aware_targets:
            threshold = threshold_within(measurements, t)
            bits = threshold_recipe_within(measurements, t)
            rule.append(AllocatedRecipe("", bits, bits_per_param(bits, measurements.numels), threshold=threshold))
        for r in unique_recipes(rule, "mixedpalette"):
            planned.append(PlannedRecipe(r.name, "apple", r.bits, r.threshold))
    if "size-aware" in config.strategies:
        for r in size_aware_recipes(measurements, size_aware_targets(planned, measurements.numels, config)):
            planned.append(PlannedRecipe(r.name, "size-aware", r.bits, r.target, r.predicted_psnr))
    return tuple(planned)


def recipe_hash(bits: Mapping[str, int]) -> str:
    """A short stable digest of a recipe (its store task ids)."""
    return hashlib.sha256(json.dumps(dict(sorted(bits.items()))).encode()).hexdigest()[:10]


def recipe_tasks(planned: Sequence[PlannedRecipe], numels: Mapping[str, int]) -> list[EvalTask]:
    """Each planned recipe end to end: all its layers palettized at once."""
    return [
        EvalTask(
            f"recipe/{r.name}/{recipe_hash(r.bits)}",
            "recipe",
            dict(r.bits),
            {
                "config": r.strategy,
                "recipe": r.name,
                "bits_per_param": bits_per_param(r.bits, numels),
                "extra": {"selector": r.selector},
            },
        )  # fmt: skip
        for r in planned
    ]


def measure_recipes(
    planned: Sequence[PlannedRecipe], numels: Mapping[str, int], runner: EvaluationRunner, executor: Executor
) -> list[RecipeResult]:
    """Re-measure each planned recipe end to end (`recipe_tasks`)."""
    runner.plan(len(planned))
    tasks = recipe_tasks(planned, numels)
    return [
        RecipeResult(r.name, r.strategy, r.bits, t.fields["bits_per_param"], e.psnr, r.selector, r.predicted_psnr)
        for r, t, e in zip(planned, tasks, executor.measure_all(tasks, runner))
    ]


def build_preanalysis(
    version: str,
    isolated: IsolatedSweep,
    curves: CumulativeCurves,
    baselines: Baselines,
    recipes: Sequence[RecipeResult],
) -> PreAnalysis:
    """The reference's JSON content: single_layer, cumulative (per-tensor curves), baselines, recipes."""
    return PreAnalysis(
        model_version=version,
        single_layer={str(b): {n: list(v) for n, v in d.items()} for b, d in isolated.psnr.items()},
        cumulative={
            str(b): {"metadata": {"sorted_layers": list(c.order)}, **{n: list(v) for n, v in c.psnr.items()}}
            for b, c in curves.per_tensor.items()
        },
        baselines={**baselines.psnr_means(), **{r.name: r.psnr_mean for r in recipes}},
        recipes={r.name: dict(r.bits) for r in recipes},
        _order=("model_version", "single_layer", "cumulative", "baselines", "recipes"),
    )


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
    """Phases 3-7: the sweeps (exhaustive, or the fast sweep's `workbench.fast_analysis.fast_phases`), the recipes
    planned on them and re-measured. Returns `(isolated, curves, recipes, fast)`, `fast` the fast sweep's phases or
    None; of the fast sweep's alternatives at a size only the best measured is kept (the others go to its report)."""
    fast = None
    if config.sweep == "fast":
        from workbench.fast_analysis import fast_phases

        fast = fast_phases(candidates, config, baselines, runner, executor, workers)
        isolated, curves, planned = fast.isolated, fast.curves, fast.planned
    else:
        isolated = isolated_sweep(candidates, config.nbits, runner, executor)
        curves = cumulative_curves(candidates, sensitivity_order(isolated), palettes, runner, executor)
        planned = plan_recipes(sweep_measurements(candidates, isolated, curves, baselines), config)
    recipes = measure_recipes(planned, candidates.numels, runner, executor)
    if fast is not None:
        from workbench.fast_analysis import keep_best_per_target

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
    background_fits: bool | None = None,
    palette_memory: int | None = DEFAULT_PALETTE_MEMORY,
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
        cache (`PaletteCache`, *optional*): palettes to reuse (k-means runs once per layer and config).
        background_fits (`bool`, *optional*): `prefetch_palettes` while the UNet runs, on `fit_workers` threads;
            default: if a CPU core is free.
        palette_memory (`int`, *optional*, defaults to 512 MiB): bytes of fitted palettes held in memory when no
            `cache` is given; the rest wait in a temporary folder (under `out_dir` if given) until needed again.
            None = no limit (a full-size SDXL sweep at 5 widths holds about 13 GB of palettes).
        executor (`Executor`, *optional*): what measures the sweeps' and recipes' tasks; None = a
            `LocalExecutor` in this process. A `workbench.ray_executor.RayExecutor` shards them over Ray workers
            (the same results on CPU; this process alone writes the store, so either resumes the other's).
            Trajectories always run here.

    Returns:
        `AnalysisResult`.

    Raises:
        ValueError: no candidate layers at `config.min_numel`, or a group size that does not divide a layer.
    """
    start = time.perf_counter()
    unet = pipe.unet
    candidates = candidate_layers(unet, config.min_numel, config.group_size, config.layers, config.exclude)
    spill = contextlib.ExitStack()
    if cache is None:  # palettes over the budget wait on disk, so memory does not grow with the number of widths
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        spill_dir = spill.enter_context(tempfile.TemporaryDirectory(prefix="palettes-", dir=out_dir))
        cache = PaletteCache(max_bytes=palette_memory, spill_dir=spill_dir)
    probed = probe_pipeline(pipe, config, out_dir, resume=resume, progress=progress, callback=callback)
    runner = probed.runner
    runner.plan(sweep_evaluations(config, len(candidates.layers)))
    trajectory = []
    palettes = sweep_palettes(config.nbits, config.group_size)
    workers = fit_workers(unet.device)
    background = executor is None and (background_fits or (background_fits is None and workers > 0))
    local = LocalExecutor(unet, cache, prefetch=max(1, workers) if background else 0)
    executor = local if executor is None else executor
    if config.data_aware and executor is not local:
        raise InvalidValueError("data_aware refinement fits palettes with this process' importances: run it in one "
                                "process (no --workers)")  # fmt: skip
    try:
        baselines = measure_baselines(unet, runner, executor)
        if background:
            reference = config.fast_reference_bits if config.sweep == "fast" else None
            prefetch_sweep_palettes(cache, candidates, palettes, max(1, workers), reference=reference,
                                    approximate=config.approximate_pricing)  # fmt: skip
        isolated, curves, recipes, fast = sweep_and_plan(candidates, config, baselines, palettes, runner, executor,
                                                         max(1, workers))  # fmt: skip
        refinement, importance = {}, None
        if "refined" in config.strategies:
            from workbench.refine_analysis import refine_recipes

            measurements = sweep_measurements(candidates, isolated, curves, baselines)
            refined, refinement, importance = refine_recipes(probed.probe, unet, measurements, recipes, runner,
                                                             executor, cache, config)  # fmt: skip
            recipes = [*recipes, *refined]
        if config.trajectory:
            from workbench.trajectory import recipe_trajectories

            trajectory = recipe_trajectories(pipe, config, recipes, runner, cache)
    finally:
        runner.close()
        cache.close()  # stops background fits; the fitted palettes stay cached
        spill.close()  # deletes the spilled palettes (they are only valid in this process)
    preanalysis = build_preanalysis(model_version(pipe), isolated, curves, baselines, recipes)
    execution = executor.summary()
    timing = Timing.of(start, probed.probe, runner, cache, execution if executor is not local else None)
    evaluations = list(runner.evaluations)
    if fast is not None:
        evaluations += fast.finish(recipes, curves, candidates)
    result = AnalysisResult(config, probed.identity, dict(candidates.numels), evaluations, recipes, preanalysis,
                            timing, trajectory, None if fast is None else fast.report, execution,
                            refinement)  # fmt: skip
    if out_dir is not None:
        result.save(out_dir)
        if config.data_aware:  # what `workbench export --importance` fits the data-aware palettes with
            importance.save(Path(out_dir) / IMPORTANCE_FILE)
        probed.store.mark_complete()
    return result
