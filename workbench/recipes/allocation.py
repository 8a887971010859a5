"""Mixed-bit recipes from per-layer measurements: the reference's threshold rule, and a size-aware allocation.

- `threshold_recipes`: the reference's rule. For a PSNR threshold, each layer gets the smallest bit width whose
  *cumulative* curve (layers palettized least-sensitive first) is still above the threshold at that layer's
  position, else 16 (float16). Layer size never enters the choice.
- `size_aware_recipes`: a multiple-choice knapsack over layers x bit widths. Each option's distortion is
  predicted from the *isolated* measurement, `d(l, b) = mean_prompts 10**(-psnr/10) - 10**(-original/10)`
  (noise power over peak^2, assumed additive across layers), its cost is `b * numel(l)` bits; we minimise
  `sum d` subject to `sum b * numel <= target * sum numel`, exactly along the Lagrangian path (each layer's
  lower convex hull, upgrades taken in order of distortion saved per bit) and then greedily in the slack.

Example:
    >>> m = Measurements(numels, isolated, cumulative, original=211.0, linear_8bit=45.2)
    >>> [r.name for r in threshold_recipes(m, 7)]
    >>> size_aware_recipes(m, [4.5])[0].bits
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from workbench.metrics import distortion_from_psnr
from workbench.palettes.config import FLOAT_BITS
from workbench.palettes.size import bits_per_param
from workbench.recipes.recipe import PlannedRecipe, Recipe, recipe_name


@dataclass(frozen=True)
class Measurements:
    """The per-layer measurements recipes are made from (PSNR lists per prompt, as in the reference JSON).

    Args:
        numels: candidate layer -> weight.numel(), in module order.
        isolated: nbits -> layer -> PSNR per prompt with only that layer palettized.
        cumulative: nbits -> layer -> PSNR per prompt with that layer and all less sensitive ones palettized.
        original: mean PSNR of the unmodified model (the harness' noise floor or cap).
        linear_8bit: mean PSNR of the reference's per-tensor int8 baseline.
    """

    numels: Mapping[str, int]
    isolated: Mapping[int, Mapping[str, Sequence[float]]]
    cumulative: Mapping[int, Mapping[str, Sequence[float]]]
    original: float
    linear_8bit: float

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.cumulative or self.isolated))


def unique_recipes(recipes: list[PlannedRecipe], suffix: str) -> list[PlannedRecipe]:
    """Drop exact duplicates; give recipes whose 2-decimal names collide more decimals, never the same name."""
    seen: dict[tuple, PlannedRecipe] = {}
    for r in recipes:
        seen.setdefault(tuple(sorted(r.bits.items())), r)
    unique = list(seen.values())
    out = []
    for r in unique:
        clashes = [o for o in unique if recipe_name(o.bits_per_param, suffix) == recipe_name(r.bits_per_param, suffix)]
        name = recipe_name(r.bits_per_param, suffix)
        if len(clashes) > 1:
            decimals = 3
            while decimals < 8 and len({f"{o.bits_per_param:.{decimals}f}" for o in clashes}) < len(clashes):
                decimals += 1
            name = f"recipe_{r.bits_per_param:.{decimals}f}_bit_{suffix}"
            if name in {o.name for o in out}:
                name = f"{name}_{len(out)}"
        out.append(r.renamed(name))
    return out


def threshold_recipe(m: Measurements, threshold: float) -> dict[str, int]:
    """The reference's rule: per layer, the smallest width whose cumulative mean PSNR at that layer is
    `> threshold`; 16 if none."""
    bits = {}
    for layer in m.numels:
        chosen = FLOAT_BITS
        for b in m.widths:
            if float(np.mean(m.cumulative[b][layer])) > threshold:
                chosen = b
                break
        bits[layer] = chosen
    return bits


def threshold_within(m: Measurements, target_bpp: float) -> float:
    """The highest threshold whose reference-rule recipe is still `<= target_bpp` bits/param, bisected over the
    cumulative curves' values (a higher threshold never gives fewer bits); +inf if none fits (every layer then
    takes the narrowest width, `threshold_recipe_within`)."""
    values = sorted({float(np.mean(v)) for curve in m.cumulative.values() for v in curve.values()})
    lo, hi, best = 0, len(values) - 1, math.inf
    while lo <= hi:
        mid = (lo + hi) // 2
        if bits_per_param(threshold_recipe(m, values[mid] - 1e-6), m.numels) <= target_bpp + 1e-9:
            best, lo = values[mid] - 1e-6, mid + 1
        else:
            hi = mid - 1
    return best


def threshold_recipe_within(m: Measurements, target_bpp: float) -> dict[str, int]:
    """The reference rule's recipe with the most bits/param that is still `<= target_bpp` (`threshold_within`).
    Every layer at the narrowest width if no threshold fits."""
    threshold = threshold_within(m, target_bpp)
    if math.isinf(threshold):
        return dict.fromkeys(m.numels, min(m.widths))
    return threshold_recipe(m, threshold)


def reference_thresholds(m: Measurements, k: int) -> list[float]:
    """The reference's thresholds: `linspace(original - 1, linear_8bit + 5, k)`."""
    return [float(t) for t in np.linspace(m.original - 1, m.linear_8bit + 5, k)]


def curve_thresholds(m: Measurements, k: int) -> list[float]:
    """Thresholds read off the measured cumulative curves, spread so the recipes' sizes spread evenly.

    Candidates are the distinct curve values between `lo` = the lowest curve value and `hi` = the widest
    width's curve at its end (every layer at that width: the most conservative useful recipe). Each candidate
    `v` gives a threshold just below it; of those, the k whose recipes' bits/param lie nearest to k evenly
    spaced sizes from bpp(hi) down to bpp(lo) are kept. Unlike the reference rule this never starts above
    every curve (a deterministic device's "original" is the ~200 dB epsilon cap, not a noise floor), and it
    does not stop at `linear_8bit + 5`, which on small models lies above most of the 4-bit curve.
    """
    values = sorted({float(np.mean(v)) for curve in m.cumulative.values() for v in curve.values()})
    if not values:
        raise ValueError("no cumulative measurements to derive thresholds from")
    widest = m.cumulative[max(m.widths)]
    hi = min(float(np.mean(v)) for v in widest.values())
    lo = values[0]
    candidates = [v - 1e-6 for v in values if lo <= v <= hi] or [hi - 1e-6]
    sizes = [bits_per_param(threshold_recipe(m, t), m.numels) for t in candidates]
    targets = np.linspace(max(sizes), min(sizes), k)
    chosen = []
    for target in targets:
        i = int(np.argmin([abs(s - target) for s in sizes]))
        if candidates[i] not in chosen:
            chosen.append(candidates[i])
    return chosen


def threshold_plan(m: Measurements, bits: Mapping[str, int], threshold: float) -> PlannedRecipe:
    """The threshold rule's recipe `bits` (unnamed) for `threshold`."""
    return PlannedRecipe(Recipe("", bits), "apple", threshold, bits_per_param(bits, m.numels))


def threshold_recipes(m: Measurements, k: int = 7, rule: str = "curves") -> list[PlannedRecipe]:
    """The reference strategy's recipes, named `recipe_<bpp>_bit_mixedpalette`, duplicates dropped.

    Args:
        m (`Measurements`): the sweeps.
        k (`int`, defaults to 7): number of thresholds.
        rule (`str`, defaults to "curves"): "reference" (`reference_thresholds`) or "curves" (`curve_thresholds`).
    """
    if rule == "reference":
        thresholds = reference_thresholds(m, k)
    elif rule == "curves":
        thresholds = curve_thresholds(m, k)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}; valid: curves, reference")
    recipes = []
    for t in thresholds:
        recipes.append(threshold_plan(m, threshold_recipe(m, t), t))
    return unique_recipes(recipes, "mixedpalette")


def layer_distortions(m: Measurements) -> dict[str, dict[int, float]]:
    """Predicted distortion of each (layer, width): `distortion_from_psnr(isolated) - 10**(-original/10)`, >= 0;
    16 bits costs nothing."""
    floor = 10.0 ** (-m.original / 10.0)
    out: dict[str, dict[int, float]] = {}
    for layer in m.numels:
        options = {FLOAT_BITS: 0.0}
        for b, per_layer in m.isolated.items():
            options[int(b)] = max(distortion_from_psnr(per_layer[layer]) - floor, 0.0)
        out[layer] = options
    return out


def layer_prompt_distortions(m: Measurements) -> dict[str, dict[int, np.ndarray]]:
    """`layer_distortions` per prompt: `10**(-isolated_p/10) - 10**(-original/10)` of each (layer, width), not
    clipped (a prompt may measure above the floor; clip what is made of them); 16 bits: 0 for every prompt."""
    floor = 10.0 ** (-m.original / 10.0)
    out: dict[str, dict[int, np.ndarray]] = {}
    for layer in m.numels:
        prompts = len(next(iter(m.isolated.values()))[layer]) if m.isolated else 1
        options = {FLOAT_BITS: np.zeros(prompts)}
        for b, per_layer in m.isolated.items():
            options[int(b)] = 10.0 ** (-np.asarray(per_layer[layer], dtype=np.float64) / 10.0) - floor
        out[layer] = options
    return out


def allocate(
    distortion: Mapping[str, Mapping[int, float]], numels: Mapping[str, int], target_bpp: float
) -> dict[str, int]:
    """Minimise `sum_l d[l][b_l]` subject to `sum_l b_l * numel_l <= target_bpp * sum numel` (`allocate_options`
    with each width's cost `b * numel` bits).

    Raises:
        ValueError: the target is below what the narrowest width gives.
    """
    total = sum(numels.values())
    costs = {layer: {b: b * numels[layer] for b in opts} for layer, opts in distortion.items()}
    try:
        return allocate_options(distortion, costs, target_bpp * total + 1e-6 * total)
    except ValueError:
        narrowest = sum(min(opts) * numels[layer] for layer, opts in distortion.items()) / total
        message = f"target {target_bpp:.3f} bits/param is below the narrowest width ({narrowest:.3f})"
        raise ValueError(message) from None


def allocate_options(
    values: Mapping[str, Mapping[Hashable, float]], costs: Mapping[str, Mapping[Hashable, float]], budget: float
) -> dict[str, Hashable]:
    """The multiple-choice knapsack: per layer one option, minimising `sum_l values[l][o_l]` subject to
    `sum_l costs[l][o_l] <= budget`.

    Start with every layer at its cheapest option (the lower value among equal costs); take the steps along each
    layer's lower convex hull of (cost, value) in order of value saved per unit of cost (the Lagrangian path:
    each prefix is optimal for its own budget); then spend what is left greedily on the best-ratio changes that
    still fit. Values may be negative (a change measured in context can lower the error).

    Args:
        values: layer -> option -> value to minimise (e.g. a predicted distortion).
        costs: layer -> option -> cost (e.g. stored bits); every option of `values` must have one.
        budget: the most the chosen options may cost in all.

    Returns:
        `dict`: layer -> chosen option.

    Raises:
        ValueError: the cheapest options already cost more than `budget`.
    """
    current = {layer: min(opts, key=lambda o, c=costs[layer]: (c[o], opts[o])) for layer, opts in values.items()}
    spent = sum(costs[layer][o] for layer, o in current.items())
    if spent > budget:
        raise ValueError(f"the cheapest options cost {spent:.6g}, more than the budget {budget:.6g}")
    segments = [seg for layer, opts in values.items() for seg in _hull_segments(layer, opts, costs[layer])]
    segments.sort(key=lambda s: -s[0])  # stable: ties keep layer order
    for _, layer, o0, o1 in segments:
        if current[layer] != o0:
            continue  # an earlier segment of this layer was skipped: the chain stops here
        extra = costs[layer][o1] - costs[layer][o0]
        if spent + extra > budget:
            break
        current[layer], spent = o1, spent + extra

    while (best := _best_fitting_change(values, costs, current, spent, budget)) is not None:
        layer, option, extra = best  # greedy fill of the slack, any option that fits
        current[layer], spent = option, spent + extra
    return current


def _lower_hull(opts: Mapping[Hashable, float], costs: Mapping[Hashable, float]) -> list:
    """The options on the lower convex hull of (cost, value), cheapest first, value falling."""
    ordered = sorted(opts, key=lambda o: (costs[o], opts[o]))
    hull = [ordered[0]]
    for o in ordered[1:]:
        if costs[o] <= costs[hull[-1]] or opts[o] >= opts[hull[-1]]:
            continue  # keep only options that cost more and lower the value
        while len(hull) >= 2:  # pop points that fall above the convex chain
            o0, o1 = hull[-2], hull[-1]
            if (opts[o1] - opts[o]) / (costs[o] - costs[o1]) < (opts[o0] - opts[o1]) / (costs[o1] - costs[o0]):
                break
            hull.pop()
        hull.append(o)
    return hull


def _hull_segments(layer: str, opts: Mapping, costs: Mapping) -> list[tuple[float, str, Hashable, Hashable]]:
    """`(value saved per unit of cost, layer, from, to)` for each step along the layer's hull."""
    hull = _lower_hull(opts, costs)
    return [((opts[o0] - opts[o1]) / (costs[o1] - costs[o0]), layer, o0, o1) for o0, o1 in zip(hull, hull[1:])]


def _best_fitting_change(values, costs, current, spent: float, budget: float) -> tuple[str, Hashable, float] | None:
    """`(layer, option, extra cost)` of the change with the best value saved per unit of cost that still fits."""
    best = None
    for layer, opts in values.items():
        for o, v in opts.items():
            extra = costs[layer][o] - costs[layer][current[layer]]
            gain = opts[current[layer]] - v
            if extra > 0 and gain > 0 and spent + extra <= budget and (best is None or gain / extra > best[0]):
                best = (gain / extra, layer, o, extra)
    return None if best is None else best[1:]


def predicted_psnr(distortion: Mapping[str, Mapping[int, float]], bits: Mapping[str, int], original: float) -> float:
    """`-10 log10(10**(-original/10) + sum_l d[l][bits_l])`: the additive model's PSNR prediction."""
    total = 10.0 ** (-original / 10.0) + sum(distortion[layer][b] for layer, b in bits.items())
    return -10.0 * math.log10(total) if total > 0 else math.inf


def size_aware_recipes(m: Measurements, targets: Sequence[float]) -> list[PlannedRecipe]:
    """One knapsack recipe per bits/param target, named `recipe_<bpp>_bit_sizeaware` (duplicates dropped)."""
    distortion = layer_distortions(m)
    recipes = []
    for target in sorted({float(t) for t in targets}, reverse=True):
        bits = allocate(distortion, m.numels, target)
        predicted = predicted_psnr(distortion, bits, m.original)
        recipes.append(
            PlannedRecipe(Recipe("", bits), "size-aware", target, bits_per_param(bits, m.numels), predicted)
        )
    return unique_recipes(recipes, "sizeaware")
