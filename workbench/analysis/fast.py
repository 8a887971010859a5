"""The fast sweep inside an analysis: `workbench.sweep.prediction`'s measurements and predictions in place of phases
3-6 of
`workbench.analysis.run.run_analysis`, its recipes' selection, and its predicted points as evaluations.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(sweep="fast"), out_dir="out")  # calls `fast_phases`
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.plan import plan_recipes, sweep_measurements
from workbench.analysis.result import RecipeResult
from workbench.palettes.config import PaletteConfig
from workbench.palettes.size import bits_per_param
from workbench.recipes.allocation import layer_distortions, predicted_psnr, threshold_recipe_within
from workbench.recipes.recipe import PlannedRecipe, Recipe, recipe_name
from workbench.sweep.executor import Executor
from workbench.sweep.phases import (
    Baselines,
    Candidates,
    CumulativeCurve,
    CumulativeCurves,
    IsolatedSweep,
    sensitivity_order,
)
from workbench.sweep.prediction import FastReport, FastSweep, check_points, fast_sweep, run_checks
from workbench.sweep.store import Evaluation, EvaluationRunner


@dataclass(frozen=True)
class FastPhases:
    """What the fast sweep hands on: the measured-or-predicted isolated sweep, the model's cumulative curves, the
    recipes planned after the checks, and the sweep itself with its report."""

    sweep: FastSweep
    isolated: IsolatedSweep
    curves: CumulativeCurves
    planned: tuple[PlannedRecipe, ...]

    @property
    def report(self) -> FastReport:
        return self.sweep.report

    def finish(self, recipes: Sequence[RecipeResult], curves: CumulativeCurves, candidates: Candidates):
        """Record every re-measured recipe's prediction error in the report (kept and dropped ones) and return the
        predicted points as evaluations (`predicted_evaluations`)."""
        measured = [*recipes, *self.report.alternatives]
        self.report.recipe_errors_db.update(
            {r.name: r.predicted_psnr - r.psnr_mean for r in measured if r.predicted_psnr is not None}
        )
        return predicted_evaluations(self.sweep, curves, candidates)


def fast_phases(
    candidates: Candidates,
    config: AnalysisConfig,
    baselines: Baselines,
    runner: EvaluationRunner,
    executor: Executor,
    workers: int = 1,
) -> FastPhases:
    """The fast sweep (`workbench.sweep.prediction`) in place of phases 3-6: measure and predict, plan, check the
    plan's most
    influential predicted points, plan again on the corrected table."""
    settings = config.fast
    sweep = fast_sweep(candidates, config.nbits, runner, executor, baselines.original.psnr, settings, workers)

    def plan() -> tuple[IsolatedSweep, CumulativeCurves, tuple[PlannedRecipe, ...]]:
        isolated = IsolatedSweep(sweep.isolated())
        order = sensitivity_order(isolated)
        curves = CumulativeCurves(
            per_tensor={
                b: CumulativeCurve(PaletteConfig(nbits=b), order.layers[b], psnr)
                for b, psnr in sweep.cumulative(order.layers).items()
            },
            grouped={},
        )
        return isolated, curves, plan_recipes(sweep_measurements(candidates, isolated, curves, baselines), config)

    for _ in range(settings.check_rounds if settings.checks else 0):
        _, _, planned = plan()
        points = check_points(sweep, [r.bits for r in planned], settings.checks_per_round(len(candidates.layers)))
        if not points:
            break  # every option the recipes use is measured
        run_checks(sweep, points, candidates, runner, executor)
    isolated, curves, planned = plan()
    if "refined" not in config.strategies:  # the refinement corrects the knapsack's recipes better (measured)
        planned += rule_alternatives(planned, candidates, isolated, curves, baselines)
    return FastPhases(sweep, isolated, curves, planned)


def rule_alternatives(
    planned: Sequence[PlannedRecipe],
    candidates: Candidates,
    isolated: IsolatedSweep,
    curves: CumulativeCurves,
    baselines: Baselines,
) -> tuple[PlannedRecipe, ...]:
    """For each size-aware recipe, the reference rule's recipe on the same (fast) curves with the most bits/param
    that still fits its target, named `recipe_<bpp>_bit_fastrule`: both are re-measured and the better one kept
    (`keep_best_per_target`). The additive model behind the knapsack misjudges layers that interact; the rule
    reads the cumulative curves, which sum along one order, and measuring both costs one evaluation per target."""
    m = sweep_measurements(candidates, isolated, curves, baselines)
    distortion = layer_distortions(m)
    out = []
    for r in planned:
        if r.strategy == "size-aware":
            bits = threshold_recipe_within(m, r.selector)
            if bits != dict(r.bits):
                bpp = bits_per_param(bits, candidates.numels)
                recipe = Recipe(recipe_name(bpp, "fastrule"), bits)
                predicted = predicted_psnr(distortion, bits, m.original)
                out.append(PlannedRecipe(recipe, "size-aware", r.selector, bpp, predicted))
    return tuple(out)


def keep_best_per_target(recipes: Sequence[RecipeResult]) -> tuple[list[RecipeResult], list[RecipeResult]]:
    """The size-aware recipes grouped by target: the best re-measured one of each group kept (ties: the knapsack's,
    listed first), the others returned apart; other strategies' recipes kept as they are."""
    best: dict[float, RecipeResult] = {}
    for r in recipes:
        if r.strategy == "size-aware" and (r.selector not in best or r.psnr_mean > best[r.selector].psnr_mean):
            best[r.selector] = r
    kept = [r for r in recipes if r.strategy != "size-aware" or best[r.selector] is r]
    return kept, [r for r in recipes if r not in kept]


def predicted_evaluations(sweep: FastSweep, curves: CumulativeCurves, candidates: Candidates) -> list[Evaluation]:
    """The fast sweep's predicted isolated points and its cumulative curves as evaluations marked
    `extra={"predicted": True}` (not in the store: nothing was measured), for the tables and the figure."""
    out = []
    for b in sweep.widths:
        key = PaletteConfig(nbits=b).key
        for name in sweep.layers:
            if sweep.is_predicted(name, b):
                out.append(Evaluation(f"isolated/{key}/{name}", "isolated", sweep.psnr(name, b), key, b, name,
                                      bits_per_param=bits_per_param({name: b}, candidates.numels),
                                      extra={"predicted": True}))  # fmt: skip
        curve = curves.per_tensor[b]
        for position, name in enumerate(curve.order):
            prefix = dict.fromkeys(curve.order[: position + 1], b)
            out.append(Evaluation(f"cumulative/{key}/{position}/{name}", "cumulative", curve.psnr[name], key, b, name,
                                  position, bits_per_param=bits_per_param(prefix, candidates.numels),
                                  extra={"predicted": True}))  # fmt: skip
    return out
