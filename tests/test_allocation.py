import itertools

import numpy as np
import pytest

from workbench.palettes.size import bits_per_param
from workbench.recipes.allocation import (
    Measurements,
    allocate,
    layer_distortions,
    reference_thresholds,
    size_aware_recipes,
    threshold_recipe,
    threshold_recipes,
)


def _measurements(original=211.0):
    numels = {"a": 1000, "b": 4000, "c": 16000, "d": 500}
    # isolated PSNR: b is fragile, c is robust and large
    iso = {
        2: {"a": 50.0, "b": 40.0, "c": 70.0, "d": 45.0},
        4: {"a": 62.0, "b": 52.0, "c": 82.0, "d": 57.0},
        8: {"a": 86.0, "b": 76.0, "c": 106.0, "d": 81.0},
    }
    cum = {}
    for b, per in iso.items():
        order = sorted(per, key=lambda n: -per[n])
        d = 0.0
        cum[b] = {}
        for n in order:
            d += 10 ** (-per[n] / 10)
            cum[b][n] = [round(-10 * np.log10(d), 1)] * 2
    return Measurements(numels, {b: {n: [v] * 2 for n, v in p.items()} for b, p in iso.items()}, cum, original, 60.0)


def test_threshold_rule_picks_smallest_width_above_threshold():
    m = _measurements()
    bits = threshold_recipe(m, 65.0)
    for layer, b in bits.items():
        ok = [w for w in (2, 4, 8) if np.mean(m.cumulative[w][layer]) > 65.0]
        assert b == (min(ok) if ok else 16)
    assert threshold_recipe(m, 500.0) == dict.fromkeys(m.numels, 16)


def test_reference_rule_is_linspace_and_duplicates_never_overwrite():
    m = _measurements()
    assert reference_thresholds(m, 7) == pytest.approx(list(np.linspace(210.0, 65.0, 7)))
    recipes = threshold_recipes(m, 7, rule="reference")
    names = [r.name for r in recipes]
    assert len(names) == len(set(names))  # the all-float16 thresholds collapse into one recipe, not 5 overwrites
    assert len({tuple(sorted(r.bits.items())) for r in recipes}) == len(recipes)


def test_curve_thresholds_give_distinct_recipes_below_16_bits():
    recipes = threshold_recipes(_measurements(), 4, rule="curves")
    assert len(recipes) >= 3
    assert all(r.bits_per_param < 16 for r in recipes)
    assert len({r.name for r in recipes}) == len(recipes)


def test_allocate_is_optimal_on_a_small_problem_and_respects_budget():
    m = _measurements()
    dist = layer_distortions(m)
    total = sum(m.numels.values())
    for target in (2.5, 3.0, 4.0, 5.5, 7.0):
        bits = allocate(dist, m.numels, target)
        assert bits_per_param(bits, m.numels) <= target + 1e-9
        best = min(
            sum(dist[n][b] for n, b in zip(m.numels, combo))
            for combo in itertools.product((2, 4, 8, 16), repeat=len(m.numels))
            if sum(b * m.numels[n] for n, b in zip(m.numels, combo)) <= target * total
        )
        got = sum(dist[n][b] for n, b in bits.items())
        assert got <= best * 1.05 + 1e-15  # Lagrangian path + greedy fill: within 5% of brute force here
    with pytest.raises(ValueError, match="below the narrowest"):
        allocate(dist, m.numels, 1.5)


def test_size_aware_beats_threshold_rule_in_predicted_distortion_at_equal_size():
    m = _measurements()
    dist = layer_distortions(m)
    for ref in threshold_recipes(m, 5, rule="curves"):
        ours = size_aware_recipes(m, [ref.bits_per_param])[0]
        assert ours.bits_per_param <= ref.bits_per_param + 1e-9
        assert sum(dist[n][b] for n, b in ours.bits.items()) <= sum(dist[n][b] for n, b in ref.bits.items()) + 1e-18
