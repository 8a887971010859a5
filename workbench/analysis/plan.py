"""From measurements to recipes: the store identity of an analysis, each strategy's planned recipes, their
re-measurement end to end, and the reference-format JSON that carries them (phases 6-7 of
`workbench.analysis.run.run_analysis`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.result import RecipeResult
from workbench.recipes.allocation import (
    Measurements,
    size_aware_recipes,
    threshold_plan,
    threshold_recipe_within,
    threshold_recipes,
    threshold_within,
    unique_recipes,
)
from workbench.recipes.recipe import RENAMED_KEY, PlannedRecipe, PreAnalysis
from workbench.sweep.executor import EvalTask, Executor
from workbench.sweep.phases import (
    Baselines,
    Candidates,
    CumulativeCurves,
    IsolatedSweep,
)
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import (
    SCHEMA_VERSION,
    EvaluationRunner,
    model_version,
    pipeline_fingerprint,
    scheduler_settings,
)


def analysis_identity(pipe, config: AnalysisConfig, probe: OneStepProbe | None = None) -> dict:
    """Everything a measurement depends on: config, model (incl. a weights fingerprint), scheduler, device.

    The same inputs give the same identity in every process, so a killed analysis resumes from its store."""
    return {
        "schema": SCHEMA_VERSION,
        "config": config.to_dict(),
        "model_version": model_version(pipe),
        "pipeline_class": type(pipe).__name__,
        "weights": pipeline_fingerprint(pipe),
        "scheduler": scheduler_settings(pipe.scheduler),
        "dtype": str(pipe.unet.dtype),
        "device": pipe.unet.device.type,
        "latent_shape": None if probe is None else list(probe.reference.shape),
    }


# --------------------------------------------------------------------------------------------------------------
# Recipes, their re-measurement, their full trajectories.


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
    targets = sorted({round(r.bits_per_param, 6) for r in apple})
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
            bits = threshold_recipe_within(measurements, t)
            rule.append(threshold_plan(measurements, bits, threshold_within(measurements, t)))
        planned.extend(unique_recipes(rule, "mixedpalette"))
    if "size-aware" in config.strategies:
        planned.extend(size_aware_recipes(measurements, size_aware_targets(planned, measurements.numels, config)))
    return tuple(planned)


def recipe_hash(bits: Mapping[str, int]) -> str:
    """A short stable digest of a recipe (its store task ids)."""
    return hashlib.sha256(json.dumps(dict(sorted(bits.items()))).encode()).hexdigest()[:10]


def recipe_tasks(planned: Sequence[PlannedRecipe]) -> list[EvalTask]:
    """Each planned recipe end to end: all its layers palettized at once."""
    return [
        EvalTask(
            f"recipe/{r.name}/{recipe_hash(r.bits)}",
            "recipe",
            dict(r.bits),
            {
                "config": r.strategy,
                "recipe": r.name,
                "bits_per_param": r.bits_per_param,
                "extra": {"selector": r.selector},
            },
        )  # fmt: skip
        for r in planned
    ]


def measure_recipes(
    planned: Sequence[PlannedRecipe], runner: EvaluationRunner, executor: Executor
) -> list[RecipeResult]:
    """Re-measure each planned recipe end to end (`recipe_tasks`)."""
    runner.plan(len(planned))
    evaluations = executor.measure_all(recipe_tasks(planned), runner)
    return [RecipeResult(r, tuple(e.psnr)) for r, e in zip(planned, evaluations)]


def build_preanalysis(
    version: str,
    isolated: IsolatedSweep,
    curves: CumulativeCurves,
    baselines: Baselines,
    recipes: Sequence[RecipeResult],
    renamed: Mapping[str, str] | None = None,
) -> PreAnalysis:
    """The reference's JSON content: single_layer, cumulative (per-tensor curves), baselines, recipes; and, if
    `renamed` (old recipe name -> new), our `renamed` key (`PreAnalysis.renamed`)."""
    return PreAnalysis(
        model_version=version,
        single_layer={str(b): {n: list(v) for n, v in d.items()} for b, d in isolated.psnr.items()},
        cumulative={
            str(b): {"metadata": {"sorted_layers": list(c.order)}, **{n: list(v) for n, v in c.psnr.items()}}
            for b, c in curves.per_tensor.items()
        },
        baselines={**baselines.psnr_means(), **{r.name: r.psnr_mean for r in recipes}},
        recipes={r.name: dict(r.bits) for r in recipes},
        extra={RENAMED_KEY: dict(renamed)} if renamed else {},
        _order=("model_version", "single_layer", "cumulative", "baselines", "recipes"),
    )
