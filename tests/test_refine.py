"""The refined strategy: the one knapsack over any options, the probe's gradient, the aligned model's exchange, and
refined recipes in an analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.refine import search_name
from workbench.analysis.run import run_analysis
from workbench.compare.seed_matched import column_for
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers, get_layer, gradient_checkpointing
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig, as_config
from workbench.palettes.fit import fit_palette
from workbench.palettes.importance import IMPORTANCE_FILE, Importance
from workbench.palettes.size import format_bits, recipe_size
from workbench.recipes import pricing as pricing_module
from workbench.recipes.allocation import allocate, allocate_options
from workbench.recipes.pricing import Pricing
from workbench.recipes.recipe import PreAnalysis, Recipe
from workbench.recipes.refine import (
    Change,
    OptionSpace,
    RefineSettings,
    exchange_steps,
    prompt_weights,
    refine_recipe,
    weighted_distortion,
    weighted_distortions,
)
from workbench.report.tables import recipe_table
from workbench.report.widgets import RecipeExplorer
from workbench.sweep.probe import OneStepProbe
from workbench.threads import torch_threads

PROMPTS = ("a red circle", "a blue square")


def test_allocate_options_is_allocate_with_width_costs():
    rng = np.random.default_rng(0)
    numels = {f"l{i}": int(n) for i, n in enumerate(rng.integers(1000, 50_000, 12))}
    distortion = {n: {b: float(rng.random()) * 2.0 ** (-b) for b in (1, 2, 4, 6, 8)} | {16: 0.0} for n in numels}
    total = sum(numels.values())
    for target in (1.5, 3.0, 4.5, 7.0):
        costs = {n: {b: b * numels[n] for b in opts} for n, opts in distortion.items()}
        options = allocate_options(distortion, costs, target * total + 1e-6 * total)
        assert options == allocate(distortion, numels, target)
        assert sum(costs[n][b] for n, b in options.items()) <= target * total + 1e-6 * total


def test_allocate_options_takes_string_options_and_negative_values():
    values = {"a": {"kmeans4": 0.0, "wkmeans4": -1.0, "kmeans2": 3.0}, "b": {"kmeans4": 0.0, "kmeans2": 0.5}}
    costs = {"a": {"kmeans4": 4, "wkmeans4": 4, "kmeans2": 2}, "b": {"kmeans4": 4, "kmeans2": 2}}
    assert allocate_options(values, costs, 6) == {"a": "wkmeans4", "b": "kmeans2"}
    with pytest.raises(ValueError, match="more than the budget"):
        allocate_options(values, costs, 3)


def test_exchange_does_not_cancel_more_than_the_whole_error():
    """Two changes that each cancel 90% of the error along it: a separable model takes both (predicting -180%);
    the aligned model takes one, and predicts the remainder."""
    d = 1.0
    cancel = [Change(f"l{i}", "up", 0.0, -0.9 * math.sqrt(d), 0.0) for i in range(2)]
    steps = exchange_steps({c.layer: [c] for c in cancel}, spent=0.0, budget=0.0, current=d, max_changed=2)
    ((chosen, change),) = steps
    assert len(chosen) == 1 and change == pytest.approx(0.1**2 - 1.0)


def test_exchange_pays_an_upgrade_with_a_downgrade_within_the_budget():
    changes = {
        "up": [Change("up", 8, 10.0, -0.5, 0.0)],  # costs 10 bytes, removes half the error
        "down": [Change("down", 2, -12.0, 0.0, 0.01)],  # saves 12 bytes, adds a little noise off the error's axis
    }
    ((chosen, change),) = exchange_steps(changes, spent=100.0, budget=100.0, current=1.0, max_changed=4)
    assert chosen == {"up": 8, "down": 2} and change == pytest.approx(0.25 + 0.01 - 1.0)
    # the pair is one step of two changes: with room for one, there is no step
    assert exchange_steps(changes, spent=100.0, budget=100.0, current=1.0, max_changed=1) == []


def test_distortion_gradient_is_the_derivative_and_chunks_agree(pipe):
    probe = OneStepProbe(pipe, PROMPTS, seed=0, height=32, width=32)
    layers = compressible_layers(pipe.unet, 30_000)
    names = list(layers)
    with torch_threads(1), palettized(pipe.unet, dict.fromkeys(names, 2)):
        params = [layers[n].weight for n in names]
        flags = [p.requires_grad for p in params]
        d, grads = probe.distortion_gradient(params)
        d_chunked, chunked = probe.distortion_gradient(params, batch_chunk=1)
        assert d == d_chunked and d > 0
        for g, c in zip(grads, chunked):  # the same sums in another order: float32 rounding only
            assert float((c - g).norm()) <= 1e-4 * float(g.norm())
        assert [p.requires_grad for p in params] == flags  # as they were
        # prompt weights: D = mean_p w_p d_p, so each prompt alone (weight 2, the other 0) averages to D
        first, _ = probe.distortion_gradient(params, weights=(2.0, 0.0))
        second, _ = probe.distortion_gradient(params, weights=(0.0, 2.0))
        assert (first + second) / 2 == pytest.approx(d, rel=1e-5) and first != second
        with pytest.raises(ValueError, match="one weight per prompt"):
            probe.distortion_gradient(params, weights=(1.0,))
        i = max(range(len(names)), key=lambda j: float(grads[j].norm()))
        weight = params[i]
        step = (-1e-3 * grads[i] / grads[i].norm() * weight.norm()).detach()
        with torch.no_grad():
            weight += step
            out = probe().double()
            weight -= step
        peak = out.abs().flatten(1).amax(1) + 1e-5
        moved = float(((out - probe.reference.double()).square().flatten(1).mean(1) / peak.square()).mean())
        linear = float((grads[i] * step).sum())
        assert linear < 0 and moved - d == pytest.approx(linear, rel=0.05)


def test_prompt_weights_linearise_the_mean_relative_change_the_candidates_are_judged_by():
    w = prompt_weights((30.0, 40.0))
    assert w.mean() == pytest.approx(1.0) and w[1] == pytest.approx(10 * w[0])  # the cleaner prompt counts more
    psnr, change = np.array([30.0, 40.0]), np.array([0.2, -0.1])  # each prompt's distortion times (1 + change)
    after = psnr - 10 * np.log10(1 + change)
    assert weighted_distortion(after, w) / weighted_distortion(psnr, w) - 1 == pytest.approx(change.mean())
    assert prompt_weights((35.0, 35.0)) == pytest.approx([1.0, 1.0])  # equal prompts: the unweighted D
    table = weighted_distortions({"l": {2: 0.5, 4: [1.0, 3.0], 6: [-1.0, 0.1]}}, w)["l"]
    assert table == pytest.approx({2: 0.5, 4: float(np.mean(w * [1.0, 3.0])), 6: 0.0})  # clipped at 0


@pytest.fixture(scope="module")
def refined_analysis(pipe, tmp_path_factory):
    """`(result, out_dir)` of a small analysis with every strategy (one per module: two tests read it)."""
    out = tmp_path_factory.mktemp("refined")
    config = AnalysisConfig(nbits=(2, 4, 8), min_numel=30_000, prompts=PROMPTS, height=32, width=32, num_recipes=3,
                            size_aware_targets=(3.0,))  # fmt: skip
    with torch_threads(1):
        return run_analysis(pipe, config, out_dir=out, progress=False), out


def test_refined_recipes_are_measured_no_larger_and_no_worse_than_any_start(refined_analysis):
    result, tmp_path = refined_analysis
    refined = [r for r in result.recipes if r.strategy == "refined"]
    assert refined and len(refined) == len([r for r in result.recipes if r.strategy == "size-aware"])
    stored = {e.id: e for e in result.evaluations}
    for r in refined:
        assert r.bits_per_param <= r.selector + 1e-6
        assert r.psnr == next(e.psnr for e in stored.values() if e.kind == "recipe" and e.recipe == r.name)
        fitting = [o for o in result.recipes if o.strategy != "refined" and o.bits_per_param <= r.selector + 1e-6]
        assert r.psnr_mean >= max(o.psnr_mean for o in fitting)
        report = result.refinement[r.name]
        assert report.psnr == pytest.approx(r.psnr_mean) and report.refinement.rounds >= 1
        assert all(s.measured_psnr <= report.psnr + 1e-9 for s in report.refinement.steps)
        assert report.to_dict() == json.loads((tmp_path / "run.json").read_text())["refinement"][r.name]
    assert any(e.kind == "refine" for e in result.evaluations)
    assert "refinement" in (tmp_path / "run.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["in memory", "on disk"])
def test_refinement_sharing_the_executors_state_is_the_same_search(pipe, tmp_path, monkeypatch, memory):
    """The refinement keeps each measured candidate in force (a round changes only the layers that differ): the
    same candidates, PSNRs and refined recipes as putting every recipe in force afresh, with the stash keeping
    originals in memory or on disk (where a palettized parameter keeps the original's storage); the UNet comes back
    bitwise."""
    from workbench.analysis import refine as analysis_refine
    from workbench.palettes import stash as stash_module
    from workbench.sweep.store import weights_fingerprint

    config = AnalysisConfig(nbits=(2, 4, 8), min_numel=30_000, prompts=PROMPTS, height=32, width=32, num_recipes=3,
                            size_aware_targets=(3.0,))  # fmt: skip
    if memory == "on disk":
        monkeypatch.setattr(stash_module, "STASH_MEMORY_BYTES", 0)
    before = weights_fingerprint(pipe.unet)

    def refine(out, shared: bool):
        with monkeypatch.context() as m:
            if not shared:  # no local executor seen: every gradient puts its recipe in force and takes it out
                m.setattr(analysis_refine, "LocalExecutor", type("NotLocal", (), {}))
            with torch_threads(1):
                return run_analysis(pipe, config, out_dir=out, progress=False)

    fresh, shared = refine(tmp_path / "fresh", False), refine(tmp_path / "shared", True)
    assert weights_fingerprint(pipe.unet) == before
    pick = lambda result: [(r.name, dict(r.bits), r.psnr) for r in result.recipes if r.strategy == "refined"]  # noqa: E731
    assert pick(shared) == pick(fresh) and pick(fresh)
    assert shared.refinement.to_dict() == fresh.refinement.to_dict()


def test_every_view_shows_the_one_size_a_recipe_is_named_after(pipe, refined_analysis):
    """One size definition: each recipe's name, table row, grid column and explorer label say its bits/param
    (`Recipe.bits_per_param` over the candidate layers); a refined recipe's old name (its target's) still loads."""
    result, out = refined_analysis
    table = recipe_table(result).set_index("name")
    layers = compressible_layers(pipe.unet, min_numel=30_000)
    assert set(layers) == set(result.layers)
    explorer = RecipeExplorer(
        result.preanalysis.recipes, result.layers, strategies={r.name: r.strategy for r in result.recipes}
    )
    for r in result.recipes:
        bpp = Recipe(r.name, r.bits).bits_per_param(result.layers)
        assert bpp == r.bits_per_param
        digits = r.name.split("_")[1]
        assert digits == f"{bpp:.{len(digits.split('.')[1])}f}", f"{r.name} is not named after its size {bpp}"
        assert table.loc[r.name, "bits_per_param"] == round(bpp, 3)
        column = column_for(r.name, layers, r.bits)
        assert column.size == recipe_size(r.bits, result.layers, {n: m.weight.shape[0] for n, m in layers.items()})
        assert column.caption.split("\n")[0] == format_bits(bpp)
        if len(digits.split(".")[1]) == 2:  # a name with the usual 2 decimals says what every label says
            assert format_bits(bpp) == f"{digits} bits/param"
        explorer.strategy.value, explorer.target.value = r.strategy, bpp
        assert explorer.state.bits_per_param == bpp
        assert explorer.state.size.label() in explorer.text.value
        assert explorer.state.size.label().startswith(format_bits(explorer.state.bits_per_param))
    saved = PreAnalysis.load(out / "preanalysis.json")
    refined = [r for r in result.recipes if r.strategy == "refined"]
    for r in refined:
        assert saved.recipe(search_name(r.selector)).bits == saved.recipe(r.name).bits  # the old name loads it
    renamed = {search_name(r.selector): r.name for r in refined if search_name(r.selector) != r.name}
    assert saved.renamed == renamed


def test_refined_needs_size_aware():
    with pytest.raises(InvalidValueError, match="size-aware"):
        AnalysisConfig(strategies=("apple", "refined"))
    with pytest.raises(InvalidValueError, match="refine_rounds"):
        AnalysisConfig(refine_rounds=0)
    with pytest.raises(InvalidValueError, match="refine_min_gain"):
        AnalysisConfig(refine_min_gain=-0.1)
    with pytest.raises(InvalidValueError, match="refine_evaluations"):
        AnalysisConfig(refine_evaluations=0)


def test_a_search_stops_at_its_evaluations_and_after_a_small_gain(pipe):
    """`RefineSettings.max_evaluations` caps the candidates a search measures (a round that would pass it is not
    started), and a round that gains less than `min_gain` dB is its last; with neither, it runs every round."""
    names = list(compressible_layers(pipe.unet, 2048))[:8]
    numels = {n: get_layer(pipe.unet, n).weight.numel() for n in names}
    options = {n: {b: b * numels[n] for b in (2, 4, 8, 16)} for n in names}
    distortion = {n: dict.fromkeys((2, 4, 8, 16), 0.0) for n in names}  # each change priced by its gradient alone
    start = dict.fromkeys(names, 2)  # room to upgrade a layer or two in every round
    budget = sum(options[n][4] for n in names)

    def measure(candidates, round_):  # every candidate is 0.05 dB better than the round before
        return [(30.0 + 0.05 * round_, 30.0 + 0.05 * round_) for _ in candidates]

    def search(**settings):
        with torch_threads(1):
            probe = OneStepProbe(pipe, PROMPTS, seed=0)
            return refine_recipe(probe, start, OptionSpace(options, distortion), budget, measure,
                                 pricing=Pricing(PaletteCache()), start_psnr=(30.0, 30.0),
                                 settings=RefineSettings(rounds=3, ks=(1, 2), **settings))  # fmt: skip

    free = search()
    assert free.rounds >= 2 and free.psnr == pytest.approx(30.0 + 0.05 * free.rounds)
    assert search(min_gain=0.1).rounds == 1  # 0.05 dB gained: the first round is the last
    assert search(min_gain=0.04).rounds == free.rounds
    cap = len([s for s in free.steps if s.round == 1]) + 1  # room for round 1, not for round 2's two candidates
    capped = search(max_evaluations=cap)
    assert capped.rounds == 1 and len(capped.steps) <= cap


def test_data_aware_refinement_saves_its_importance_and_is_rejected_on_workers(pipe, tmp_path):
    config = AnalysisConfig(nbits=(2, 4), min_numel=30_000, prompts=PROMPTS, height=32, width=32, num_recipes=2,
                            data_aware=True)  # fmt: skip
    with torch_threads(1):
        result = run_analysis(pipe, config, out_dir=tmp_path, progress=False)
    importance = Importance.load(tmp_path / IMPORTANCE_FILE)
    assert set(importance.arrays) == set(result.layers)
    refined = [r for r in result.recipes if r.strategy == "refined"]
    plain = {r.selector: r for r in result.recipes if r.strategy == "size-aware"}
    for r in refined:
        assert {as_config(v).mode for v in r.bits.values() if as_config(v) is not None} <= {"kmeans", "wkmeans"}
        assert r.psnr_mean >= plain[r.selector].psnr_mean and r.bits_per_param <= r.selector + 1e-6
    # the recipes' data-aware palettes are the ones the saved importances give
    wkmeans = [(n, v) for r in refined for n, v in r.bits.items() if isinstance(v, str)]
    assert wkmeans  # on this pipeline the refinement takes some (4 of its layers, deterministic on CPU)
    name, key = wkmeans[0]
    weight = get_layer(pipe.unet, name).weight
    again = fit_palette(weight, PaletteConfig.from_key(key), importance=importance.for_weight(name, weight.shape))
    cache = PaletteCache(importance=importance)
    assert np.array_equal(cache.palette(name, weight, PaletteConfig.from_key(key)).dense(), again.dense())
    with pytest.raises(InvalidValueError, match="one process"):
        run_analysis(pipe, config, executor=object())


@pytest.mark.parametrize("options", [(2, 4, 16), ("kmeans2", "kmeans3_g4", "wkmeans4", 16)])
def test_binned_pricing_equals_the_dense_sums(options):
    """The bins' sums (`workbench.recipes.pricing`) are the dense sums over every weight: <g, Q>, the importance-
    weighted distance between two options and to the float32 original, for exact, approximate, grouped and
    data-aware palettes; and the numba kernels equal the numpy fallback."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 700, generator=gen) * 0.05
    grad = torch.randn(16, 700, generator=gen, dtype=torch.float32)
    importance = Importance({"w": np.random.default_rng(0).random(700)})
    pricing = Pricing(PaletteCache(importance=importance), importance, approximate=True)
    bins = pricing.layer_bins("w", weight, options)
    sums, dot = bins.gradient_sums(weight, grad)
    imp = torch.from_numpy(importance.for_weight("w", weight.shape).copy()).double()

    def dense(option, exact):
        config = as_config(option)
        if config is None:
            return weight.double()
        approximate = not exact and config.mode == "kmeans"
        return torch.from_numpy(pricing.cache.palette("w", weight, config, approximate).dense()).double()

    assert dot == pytest.approx(float((grad.double() * weight.double()).sum()), rel=1e-9)
    for option in options:
        for exact in (True, False):
            q, values = dense(option, exact), pricing.option_values("w", option, weight, exact)
            inner = dot if values is None else float(sums @ values)
            assert inner == pytest.approx(float((grad.double() * q).sum()), rel=1e-6, abs=1e-9)
            to_original = float((imp * (q - weight.double()).square()).sum())
            assert bins.error(values, None) == pytest.approx(to_original, rel=1e-6, abs=1e-12)
            other = pricing.option_values("w", options[0], weight, True)
            between = float((imp * (q - dense(options[0], True)).square()).sum())
            assert bins.error(values, other) == pytest.approx(between, rel=1e-6, abs=1e-12)
    # the numba kernels and the numpy fallback give the same bins and sums (the fallback runs without numba)
    w, bits = pricing_module._flat(weight)
    imp_flat = importance.for_weight("w", weight.shape)
    kernels = pricing_module._kernels()
    assert kernels is not None  # numba is a dependency: the kernels are what runs
    for segment in {bins.segment, weight.numel()}:
        fast = kernels.bin_stats(bits, w, np.ascontiguousarray(imp_flat, dtype=np.float64).reshape(-1), segment)
        with no_kernels():
            slow = pricing_module._bin_stats(bits, w, imp_flat, segment)
            slow_grad = pricing_module._bin_gradient(bits, w, grad.reshape(-1).numpy(), segment)
        assert np.array_equal(fast[2], slow[2])
        for a, b in zip(fast[:2], slow[:2]):
            assert np.allclose(a, b, rtol=1e-12, atol=1e-15)
        assert fast[3] == pytest.approx(slow[3], rel=1e-12)
        fast_grad = kernels.bin_gradient(bits, w, grad.reshape(-1).numpy(), segment)
        assert np.allclose(fast_grad[0], slow_grad[0], rtol=1e-12, atol=1e-15)
        assert fast_grad[1] == pytest.approx(slow_grad[1], rel=1e-12)


class no_kernels:
    """`workbench.recipes.pricing` without its numba kernels (as where numba is missing), for a `with` block."""

    def __enter__(self):
        self.saved = pricing_module._kernels
        pricing_module._kernels = lambda: None

    def __exit__(self, *exc):
        pricing_module._kernels = self.saved


def test_consumed_gradient_is_the_gradient(pipe):
    """`distortion_gradient(consume=...)` hands over the same gradients, whole or summed over chunks, and leaves
    no `.grad` behind."""
    with torch_threads(1):
        probe = OneStepProbe(pipe, PROMPTS, seed=0)
        names = list(compressible_layers(pipe.unet, 2048))[:6]
        params = [get_layer(pipe.unet, n).weight for n in names]
        d, grads = probe.distortion_gradient(params)
        for chunk in (None, 1):
            got: dict[int, torch.Tensor] = {}

            def consume(i, g):
                got[i] = got[i] + g if i in got else g.clone()

            assert probe.distortion_gradient(params, batch_chunk=chunk, consume=consume) == pytest.approx(d)
            assert all(torch.allclose(got[i], g, rtol=1e-4, atol=1e-10) for i, g in enumerate(grads) if g.any())
            assert all(p.grad is None for p in params)


def test_checkpointed_gradient_is_bitwise_the_plain_one(pipe):
    """Gradient checkpointing (the refinement's default) runs the same operations on the same values again: the
    same D and gradients, bit for bit, whole and consumed; the UNet's own setting is left as it was."""
    with torch_threads(1):
        probe = OneStepProbe(pipe, PROMPTS, seed=0)
        names = list(compressible_layers(pipe.unet, 2048))
        params = [get_layer(pipe.unet, n).weight for n in names]
        with gradient_checkpointing(pipe.unet) as on:
            assert on and pipe.unet.is_gradient_checkpointing
        assert not pipe.unet.is_gradient_checkpointing
        d, grads = probe.distortion_gradient(params)
        d_c, grads_c = probe.distortion_gradient(params, checkpointing=True)
        assert d == d_c and all(torch.equal(a, b) for a, b in zip(grads, grads_c))
        got: dict[int, torch.Tensor] = {}
        assert probe.distortion_gradient(params, consume=lambda i, g: got.__setitem__(i, g), checkpointing=True) == d
        assert all(torch.equal(got[i], g) for i, g in enumerate(grads) if i in got) and len(got) > len(names) // 2
        assert not pipe.unet.is_gradient_checkpointing
