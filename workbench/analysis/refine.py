"""The "refined" strategy inside an analysis: each size-aware recipe refined where layers interact
(`workbench.recipes.refine`), its candidates measured through the analysis' executor and stored like every evaluation.

Targets are refined smallest first, within t bits/param (the size measure of every recipe table), from two
starts: the size-aware recipe at t, and the best measured recipe that fits (the reference rule's, the size-aware
ones, the refined recipes of smaller targets); the better result is kept, so a refined recipe is never worse than
any measured recipe of its size or smaller. (The search is local: on the demo model the knapsack's start and the
best start each win at some sizes.) With `data_aware`, the refined recipe is refined once more with each layer
also free to take its width's data-aware palette (`wkmeans<b>`: the same indices and LUT size, so the same bytes,
stored by iOS17), whose isolated distortion is the measured plain one scaled by the ratio of their
importance-weighted weight errors (`palette_distortions`); a second stage, not one search over both, because the
ratio model flatters the data-aware palettes and would steer the first search (measured on the demo model). The
refined recipe is named
`recipe_<bpp>_bit_refined`; how it was found (each round's candidates, predicted and measured) goes to
`run.json` under `refinement`.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(strategies=("apple", "size-aware", "refined")), out_dir="out")
    >>> result.refinement["recipe_4.40_bit_refined"]["steps"]
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.plan import recipe_hash
from workbench.analysis.result import Attempt, RecipeResult, RefinedRecipe, RefinementReport
from workbench.models.layers import get_layer
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import FLOAT_BITS, PaletteConfig, as_config
from workbench.palettes.importance import Importance, collect_importance, palette_error
from workbench.palettes.size import bits_per_param
from workbench.palettes.stash import WeightStash
from workbench.recipes.allocation import Measurements, layer_prompt_distortions
from workbench.recipes.pricing import Pricing
from workbench.recipes.recipe import PlannedRecipe, Recipe, free_recipe_name, recipe_name
from workbench.recipes.refine import OptionSpace, Refinement, RefineSettings, refine_recipe
from workbench.sweep.executor import EvalTask, Executor, LocalExecutor
from workbench.sweep.store import EvaluationRunner


def width_options(numels: Mapping[str, int], widths: Sequence[int], data_aware: bool = False) -> dict[str, dict]:
    """Each layer's options: every swept width (and with `data_aware` its data-aware palette, key `wkmeans<b>`)
    and float16, costing `bits * numel` (the recipes' size measure)."""
    options = {}
    for name, n in numels.items():
        opts = {b: b * n for b in (*sorted(widths), FLOAT_BITS)}
        if data_aware:
            opts.update({PaletteConfig(b, "wkmeans").key: b * n for b in sorted(widths)})
        options[name] = opts
    return options


def palette_distortions(
    unet: torch.nn.Module,
    options: Mapping[str, Mapping],
    measured: Mapping[str, Mapping[int, object]],
    cache: PaletteCache,
    importance: Importance,
) -> dict[str, dict]:
    """Each option's isolated distortion (per prompt if `measured`'s are): measured for per-tensor k-means widths
    (and float16); for any other palette, the measured same-width one times the ratio of their importance-weighted
    weight errors (`palette_error`), the proxy of a layer's output error that data-aware palettes minimise."""
    out = {}
    for name, opts in options.items():
        weight = get_layer(unet, name).weight
        imp = importance.for_weight(name, tuple(weight.shape))
        plain_error: dict[int, float] = {}
        row = {}
        for option in opts:
            config = as_config(option)
            if config is None or option in measured[name]:
                row[option] = measured[name][option if config is not None else FLOAT_BITS]
                continue
            b = config.nbits
            if b not in plain_error:
                plain_error[b] = palette_error(weight, cache.palette(name, weight, PaletteConfig(b)), imp)
            error = palette_error(weight, cache.palette(name, weight, config), imp)
            row[option] = measured[name][b] * error / plain_error[b] if plain_error[b] > 0 else measured[name][b]
        out[name] = row
    return out


def _start(target: float, measured: Sequence[RecipeResult]) -> RecipeResult:
    """The best measured recipe within `target` bits/param (the knapsack's slack of 1e-6 allowed)."""
    return max((r for r in measured if r.bits_per_param <= target + 1e-6), key=lambda r: r.psnr_mean)


@dataclass(frozen=True)
class _Search:
    """What every refined recipe of an analysis is searched with: the probe, the option spaces (widths; and with
    data-aware palettes, `aware`), the pricing (shared by the searches: none of it depends on the recipe), the
    settings, and how candidates are measured."""

    probe: object
    numels: Mapping[str, int]
    widths: OptionSpace
    aware: OptionSpace | None
    pricing: Pricing
    settings: RefineSettings
    runner: EvaluationRunner
    executor: Executor

    def measure(self, name: str):
        """`(candidates, round) -> PSNR per prompt of each`, measured end to end as "refine" evaluations."""

        def measure(candidates, round_):
            self.runner.plan(len(candidates))
            tasks = [
                EvalTask(f"refine/{name}/{round_}/{recipe_hash(c)}", "refine", dict(c),
                         {"config": "refined", "recipe": name, "bits_per_param": bits_per_param(c, self.numels)})
                for c in candidates
            ]  # fmt: skip
            return [e.psnr for e in self.executor.measure_all(tasks, self.runner)]

        return measure

    def refine(self, name: str, start, space: OptionSpace, target: float, start_psnr, share) -> Refinement:
        """One search from `start` within `target` bits/param, measuring `share` candidates at most."""
        total = sum(self.numels.values())
        settings = replace(self.settings, max_evaluations=share)
        return refine_recipe(self.probe, start, space, target * total + 1e-6 * total, self.measure(name),
                             pricing=self.pricing, settings=settings, start_psnr=start_psnr)  # fmt: skip


def search_name(target: float) -> str:
    """The key a refinement within `target` bits/param measures its candidates under (`refine/<key>/...` in the
    store, so a resumed analysis finds them): the refined recipe's name before refined recipes were named after
    their own size; `build_preanalysis` keeps it as the recipe's old name."""
    return recipe_name(target, "refined")


def old_names(recipes: Sequence[RecipeResult]) -> dict[str, str]:
    """Old name -> name of each refined recipe whose name was once its target's (`search_name`) and now differs;
    what `PreAnalysis.renamed` resolves, so `--recipe-name recipe_4.67_bit_refined` still finds the recipe."""
    names = {r.name for r in recipes}
    out = {}
    for r in recipes:
        old = search_name(r.selector)
        if r.strategy == "refined" and old != r.name and old not in names:
            out[old] = r.name
    return out


def _refine_one(
    search: _Search, recipe: RecipeResult, measured: Sequence[RecipeResult], share: int | None = None
) -> RefinedRecipe:
    """Refine one size-aware recipe from itself and, if another measured recipe within its size is better, from
    that too; keep the better; then, with data-aware palettes, refine the kept one again with them. `share`:
    candidates its searches measure at most, split evenly between them."""
    name, target = search_name(recipe.selector), recipe.selector
    # the search in widths starts from recipes of widths only: an earlier target's refined recipe may hold
    # data-aware palettes, which are not options there
    best = _start(target, [r for r in measured if all(isinstance(v, int) for v in r.bits.values())])
    starts = [recipe] if best is recipe else [recipe, best]
    if share is not None:
        share = share // (len(starts) + (search.aware is not None))
    found, origin, attempts = None, None, []
    for start in starts:
        bits = {n: start.bits.get(n, FLOAT_BITS) for n in search.numels}
        attempt = search.refine(name, bits, search.widths, target, start.psnr, share)
        attempts.append(Attempt(start.name, start.psnr_mean, attempt.psnr, attempt.rounds))
        if found is None or attempt.psnr > found.psnr:
            found, origin = attempt, start
    if search.aware is not None:
        aware = search.refine(name, found.recipe, search.aware, target, found.prompt_psnr, share)
        attempts.append(Attempt(f"{name} (widths only)", found.psnr, aware.psnr, aware.rounds, data_aware=True))
        found = aware if aware.psnr > found.psnr else found
    return RefinedRecipe(name, origin.name, found, tuple(attempts))


def refine_recipes(
    probe,
    measurements: Measurements,
    recipes: Sequence[RecipeResult],
    runner: EvaluationRunner,
    executor: Executor,
    cache: PaletteCache,
    config: AnalysisConfig,
    stash: WeightStash | None = None,
) -> tuple[list[RecipeResult], RefinementReport, Importance]:
    """Refine every size-aware recipe (`refine_recipe`) as `config` says (`refine_rounds`, `refine_ks`,
    `refine_min_gain`, `refine_evaluations` shared evenly by the recipes, `data_aware`, `approximate_pricing`);
    return the refined recipes (measured end to end, strategy "refined"), per refined recipe its start, its steps
    and every attempt (`RefinementReport`, for `run.json`), and the importances (input channels' second moments,
    collected with one probe run; data-aware palettes are fitted with them, so an export needs them:
    `Importance.save`). `stash`: where originals wait while a round's recipe is in
    force for its gradient (the executor's, so each original is written to disk once); None = one per round.

    Raises:
        ValueError: `data_aware` with a `cache` that holds other importances.
    """
    unet, numels = probe.pipe.unet, measurements.numels
    importance = collect_importance(unet, {n: get_layer(unet, n) for n in numels}, probe)
    distortion = layer_prompt_distortions(measurements)
    aware = None
    if config.data_aware:
        if cache.importance is not None and cache.importance.digest != importance.digest:
            raise ValueError("the palette cache holds other importances than this analysis' probe gives")
        cache.importance = importance  # data-aware palettes are keyed by its digest; plain ones do not change
        aware_options = width_options(numels, measurements.widths, data_aware=True)
        aware = OptionSpace(aware_options, palette_distortions(unet, aware_options, distortion, cache, importance))
    settings = RefineSettings(rounds=config.refine_rounds, ks=config.refine_ks, min_gain=config.refine_min_gain)
    widths = OptionSpace(width_options(numels, measurements.widths), distortion)
    shared = isinstance(executor, LocalExecutor) and stash is not None and executor.state.stash is stash
    pricing = Pricing(cache, importance, config.approximate_pricing, stash, executor.state if shared else None)
    search = _Search(probe, numels, widths, aware, pricing, settings, runner, executor)
    with _recipe_kept(executor if shared else None):
        refined, reports = _refine_all(search, recipes, config, numels, runner)
    return refined, RefinementReport(tuple(reports)), importance


@contextlib.contextmanager
def _recipe_kept(executor: LocalExecutor | None):
    """With a local executor whose state the pricing shares, leave each measured candidate in force (a round's
    gradient and candidates then change only the layers that differ); restore the UNet at the end."""
    if executor is None:
        yield
        return
    kept, executor.keep_state = executor.keep_state, True
    try:
        yield
    finally:
        executor.keep_state = kept
        executor.state.reset()


def _refine_all(search: _Search, recipes, config: AnalysisConfig, numels, runner):
    """Refine every size-aware recipe, smallest first: (refined recipes, reports)."""
    refined, reports = [], []
    targets = sorted((r for r in recipes if r.strategy == "size-aware"), key=lambda r: r.selector)
    share = None if config.refine_evaluations is None else config.refine_evaluations // max(len(targets), 1)
    for recipe in targets:
        report = _refine_one(search, recipe, [*recipes, *refined], share)
        found = report.refinement
        bpp = bits_per_param(found.recipe, numels)
        # named after its own size, not the target it was refined within (`search_name`, its evaluations' key)
        name = free_recipe_name(bpp, "refined", {r.name for r in refined})
        report = replace(report, name=name)
        runner.plan(1)  # measured end to end already (a candidate, or the start): recorded, not measured again
        evaluation = runner.alias(f"recipe/{name}/{recipe_hash(found.recipe)}", "recipe", found.prompt_psnr,
                                  config="refined", recipe=name, bits_per_param=bpp,
                                  extra={"selector": recipe.selector})  # fmt: skip
        planned = PlannedRecipe(Recipe(name, found.recipe), "refined", recipe.selector, bpp)
        refined.append(RecipeResult(planned, evaluation.psnr))
        reports.append(report)
    return refined, reports
