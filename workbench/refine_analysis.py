"""The "refined" strategy inside an analysis: each size-aware recipe refined where layers interact
(`workbench.refine`), its candidates measured through the analysis' executor and stored like every evaluation.

Targets are refined smallest first, within t bits/param (the size measure of every recipe table), from two
starts: the size-aware recipe at t, and the best measured recipe that fits (the reference rule's, the size-aware
ones, the refined recipes of smaller targets); the better result is kept, so a refined recipe is never worse than
any measured recipe of its size or smaller. (The search is local: on the demo model the knapsack's start and the
best start each win at some sizes.) The refined recipe is named
`recipe_<bpp>_bit_refined`; how it was found (each round's candidates, predicted and measured) goes to
`run.json` under `refinement`.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(strategies=("apple", "size-aware", "refined")), out_dir="out")
    >>> result.refinement["recipe_4.40_bit_refined"]["steps"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workbench.allocation import Measurements, layer_distortions
from workbench.analysis import recipe_hash
from workbench.analysis_result import RecipeResult
from workbench.executor import EvalTask, Executor
from workbench.importance import collect_importance
from workbench.layers import get_layer
from workbench.palettize import FLOAT_BITS, PaletteCache
from workbench.recipes import recipe_name
from workbench.refine import refine_recipe
from workbench.size import bits_per_param
from workbench.store import EvaluationRunner


def width_options(numels: Mapping[str, int], widths: Sequence[int]) -> dict[str, dict]:
    """Each layer's options: every swept width and float16, costing `bits * numel` (the recipes' size measure)."""
    return {name: {b: b * n for b in (*sorted(widths), FLOAT_BITS)} for name, n in numels.items()}


def _start(target: float, measured: Sequence[RecipeResult]) -> RecipeResult:
    """The best measured recipe within `target` bits/param (the knapsack's slack of 1e-6 allowed)."""
    return max((r for r in measured if r.bits_per_param <= target + 1e-6), key=lambda r: r.psnr_mean)


def refine_recipes(
    probe,
    unet: torch.nn.Module,
    measurements: Measurements,
    recipes: Sequence[RecipeResult],
    runner: EvaluationRunner,
    executor: Executor,
    cache: PaletteCache,
    rounds: int,
) -> tuple[list[RecipeResult], dict]:
    """Refine every size-aware recipe (`refine_recipe`); return the refined recipes (measured end to end, strategy
    "refined") and, per refined recipe, its start, its steps and every attempt (start, result, rounds) for
    `run.json`. The importance of the weight errors is collected with one probe run."""
    numels = measurements.numels
    total = sum(numels.values())
    options = width_options(numels, measurements.widths)
    distortion = layer_distortions(measurements)
    importance = collect_importance(unet, {n: get_layer(unet, n) for n in numels}, probe)
    refined, report = [], {}
    for recipe in sorted((r for r in recipes if r.strategy == "size-aware"), key=lambda r: r.selector):
        name = recipe_name(recipe.selector, "refined")

        def measure(candidates, round_, name=name):
            runner.plan(len(candidates))
            tasks = [
                EvalTask(f"refine/{name}/{round_}/{recipe_hash(c)}", "refine", dict(c),
                         {"config": "refined", "recipe": name, "bits_per_param": bits_per_param(c, numels)})
                for c in candidates
            ]  # fmt: skip
            return [e.psnr for e in executor.measure_all(tasks, runner)]

        found, origin, attempts = None, None, []
        best = _start(recipe.selector, [*recipes, *refined])
        for start in [recipe] if best is recipe else [recipe, best]:
            attempt = refine_recipe(probe, unet, {n: start.bits.get(n, FLOAT_BITS) for n in numels}, options,
                                    distortion, recipe.selector * total + 1e-6 * total, measure, cache=cache,
                                    importance=importance, rounds=rounds, start_psnr=start.psnr)  # fmt: skip
            attempts.append({"start": start.name, "start_psnr": start.psnr_mean, "psnr": attempt.psnr,
                             "rounds": attempt.rounds})  # fmt: skip
            if found is None or attempt.psnr > found.psnr:
                found, origin = attempt, start
        bpp = bits_per_param(found.recipe, numels)
        task = EvalTask(f"recipe/{name}/{recipe_hash(found.recipe)}", "recipe", dict(found.recipe),
                        {"config": "refined", "recipe": name, "bits_per_param": bpp,
                         "extra": {"selector": recipe.selector}})  # fmt: skip
        runner.plan(1)
        (evaluation,) = executor.measure_all([task], runner)
        refined.append(RecipeResult(name, "refined", dict(found.recipe), bpp, evaluation.psnr, recipe.selector))
        report[name] = {"start": origin.name, **found.to_dict(), "attempts": attempts}
    return refined, report
