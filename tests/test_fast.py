import json

import numpy as np
import pytest

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.run import run_analysis
from workbench.errors import InvalidValueError
from workbench.palettes.kmeans import kmeans_float16
from workbench.recipes.refine import DEFAULT_KS
from workbench.sweep.prediction import (
    FastSettings,
    GainModel,
    calibration_layers,
    distortions,
    fit_gain_model,
    held_out_errors,
    layer_quantization_errors,
    psnr_from_distortions,
    quantization_errors,
)
from workbench.threads import torch_threads

# 20 candidate layers, three widths, 32x32 images: tiny-sd at CFG batch 2
CONFIG = AnalysisConfig(nbits=(2, 4, 6), min_numel=30_000, prompts=("a red circle", "a blue square"), height=32,
                        width=32, num_recipes=3)  # fmt: skip
FAST = AnalysisConfig(**{**CONFIG.to_dict(), "sweep": "fast", "fast": FastSettings(calibration=0.15, checks=0.15)})


@pytest.fixture(scope="module")
def runs(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    with torch_threads(1):
        exhaustive = run_analysis(pipe, CONFIG, progress=False)
        fast = run_analysis(pipe, FAST, out_dir=out, progress=False)
    return exhaustive, fast, out


def test_quantization_errors_are_the_exact_kmeans_errors_when_no_bins_merge():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 20)).astype(np.float16)  # 1,280 weights: at most 1,280 distinct values
    errors = quantization_errors(w, (1, 2, 4), bins_per_cluster=4096, max_bins=4096)
    for b, e in errors.items():
        clusters = kmeans_float16(w, 1 << b)
        exact = float(((w.astype(np.float64).ravel() - clusters.centroids[clusters.labels]) ** 2).sum())
        assert e == pytest.approx(exact, rel=1e-9)
    assert errors[1] > errors[2] > errors[4] > 0


def test_binned_quantization_errors_bound_the_optimum_closely_and_vanish_with_few_values():
    rng = np.random.default_rng(1)
    w = rng.standard_normal(200_000).astype(np.float16)
    binned = quantization_errors(w, (2, 4))
    for b in (2, 4):
        clusters = kmeans_float16(w, 1 << b)
        exact = float(((w.astype(np.float64) - clusters.centroids[clusters.labels]) ** 2).sum())
        assert exact <= binned[b] * (1 + 1e-9) <= exact * 1.05
    assert quantization_errors(np.array([0.5, -1, 2, 2], np.float16), (2,))[2] == 0.0  # 3 values, 4 entries


def test_layer_errors_are_of_the_weights_as_they_were_when_asked(pipe):
    from concurrent.futures import ThreadPoolExecutor

    from workbench.palettes.apply import palettized
    from workbench.palettes.stash import WeightStash
    from workbench.sweep.phases import candidate_layers

    layers = candidate_layers(pipe.unet, 30_000).layers
    expected = {name: quantization_errors(layer.weight, (2, 4)) for name, layer in layers.items()}
    with ThreadPoolExecutor(1) as pool, WeightStash(memory_bytes=0) as stash:
        pending = layer_quantization_errors(layers, (2, 4), pool)
        # written into the weights' own storage (a stash with no memory), while the errors are being computed
        with palettized(pipe.unet, dict.fromkeys(layers, 2), stash=stash):
            assert {name: f.result() for name, f in pending.items()} == expected


def test_the_gain_model_recovers_per_width_offsets_and_predicts_exactly_when_true():
    rng = np.random.default_rng(2)
    offsets = {2: 0.7, 6: -1.3}
    errors, measured = {}, {}
    for i in range(6):
        name = f"layer{i}"
        errors[name] = {2: 10 ** rng.uniform(-1, 1), 4: 10 ** rng.uniform(-3, -1), 6: 10 ** rng.uniform(-5, -3)}
        ref = 10 ** rng.uniform(-8, -4, size=2)  # two prompts
        model = GainModel(4, offsets)
        measured[name] = {4: ref, **{b: model.predict(ref, errors[name], b) for b in (2, 6)}}
    fitted = fit_gain_model(measured, errors, 4, (2, 4, 6))
    assert fitted.offsets == pytest.approx(offsets, abs=1e-12)
    assert fitted.rows == 12
    held_out = held_out_errors(measured, errors, 4, (2, 4, 6), floor=(1e-20, 1e-20))
    assert held_out == pytest.approx({2: 0.0, 6: 0.0}, abs=1e-6)


def test_distortions_and_psnr_round_trip_and_calibration_spans_the_ranking():
    floor = (1e-12, 1e-12)
    psnr = (40.0, 55.5)
    assert psnr_from_distortions(distortions(psnr, floor), floor) == psnr
    gains = {f"l{i}": float(i) for i in range(10)}
    assert calibration_layers(gains, 3) == ["l0", "l4", "l9"]
    assert calibration_layers(gains, 20) == sorted(gains, key=gains.get)
    assert FastSettings(calibration=0.1).calibration_count(100) == 10
    assert FastSettings(checks=0.4, check_rounds=4).checks_per_round(100) == 10
    assert FastSettings(checks=0.1, check_rounds=4).checks_per_round(5) == 1  # at least 3 checks in all
    # a fast analysis' refinement measures two candidates a round, an exhaustive one the refinement's default four
    assert AnalysisConfig(sweep="fast").refine_ks == FastSettings().refine_ks == (2, 8)
    assert AnalysisConfig().refine_ks == DEFAULT_KS == (1, 2, 4, 8)


def test_fast_sweep_measures_what_the_exhaustive_one_does_and_marks_the_rest_predicted(runs):
    exhaustive, fast, out = runs
    layers = list(exhaustive.layers)
    report = fast.fast
    n_cal = FAST.fast.calibration_count(len(layers))
    n_recipes = len(fast.recipes) + len(report.alternatives)  # the refined ones too
    refine = sum(e.kind == "refine" for e in fast.evaluations)  # the refinement's candidates,
    gradients = sum(a.rounds for r in fast.refinement for a in r.attempts)  # one UNet call each,
    t = fast.timing  # a candidate met twice is measured once (read back the second time); a refined recipe is
    assert t.unet_evaluations == t.new_evaluations + gradients + 1  # its best candidate's (not measured again),
    refined = [e for e in fast.evaluations if e.kind == "recipe" and e.config == "refined"]  # and one probe run
    assert refined and all(e.forward_s == 0.0 for e in refined)  # for the importances
    # baselines + every layer at the reference width + the calibration at the 2 other widths + checks + recipes
    assert t.evaluations == 3 + len(layers) + 2 * n_cal + len(report.checks) + n_recipes + refine
    assert len(report.calibration) == n_cal and 3 <= len(report.checks) <= 4 * FAST.fast.checks_per_round(20)
    assert fast.timing.unet_evaluations * 2 < exhaustive.timing.unet_evaluations
    # every measured isolated point is bitwise the exhaustive sweep's; predicted ones are marked
    full = {(e.layer, e.nbits): e.psnr for e in exhaustive.evaluations if e.kind == "isolated"}
    frame = fast.to_frame()
    isolated = frame[frame.kind == "isolated"]
    assert len(isolated) == len(layers) * 3
    for row in isolated.itertuples():
        if not row.predicted:
            assert tuple(float(p) for p in row.psnr.split(";")) == full[row.layer, row.nbits]
    measured = (~isolated.predicted).sum()
    assert measured == report.measured_points == len(layers) + 2 * n_cal + len(report.checks)
    assert frame[frame.kind == "cumulative"].predicted.all()
    assert frame[frame.kind.isin(["baseline", "recipe"])].predicted.eq(False).all()
    # the reference-format JSON holds every layer at every width, the run.json the validation
    pre = json.loads((out / "preanalysis.json").read_text())
    assert {b: sorted(v) for b, v in pre["single_layer"].items()} == {str(b): sorted(layers) for b in (2, 4, 6)}
    run = json.loads((out / "run.json").read_text())
    kept = {r.name for r in fast.recipes if r.strategy == "size-aware"}
    assert set(run["fast"]["recipe_errors_db"]) == kept | {r.name for r in report.alternatives}
    # at each target the better re-measured recipe of the knapsack and the rule on the fast curves is kept
    for lost in report.alternatives:
        winner = next(r for r in fast.recipes if r.strategy == "size-aware" and r.selector == lost.selector)
        assert winner.psnr_mean >= lost.psnr_mean and winner.bits_per_param <= lost.selector + 1e-6
    assert len(run["fast"]["checks"]) == len(report.checks)
    assert run["config"]["sweep"] == "fast" and "sweep" not in exhaustive.config.to_dict()


def test_fast_recipes_fit_their_targets_and_are_deterministic(pipe, runs):
    _, fast, _ = runs
    for r in fast.recipes:
        if r.strategy == "size-aware":
            assert r.bits_per_param <= r.selector + 1e-6
    with torch_threads(1):
        again = run_analysis(pipe, FAST, progress=False)
    assert [(r.name, r.bits, r.psnr) for r in again.recipes] == [(r.name, r.bits, r.psnr) for r in fast.recipes]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sweep": "quick"}, "unknown sweep 'quick'; valid: exhaustive, fast"),
        ({"sweep": "fast", "fast": FastSettings(reference_bits=8)}, "fast.reference_bits=8 is not one of the swept"),
        ({"sweep": "fast", "fast": {"calibration": 1.5}}, "fast calibration must lie in [0, 1]"),
        ({"sweep": "fast", "group_size": 4}, "needs sweep='exhaustive'"),
    ],
)
def test_bad_fast_settings_name_the_value_and_what_is_valid(changes, message):
    with pytest.raises(InvalidValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        if isinstance(changes.get("fast"), dict):
            changes = {**changes, "fast": FastSettings(**changes["fast"])}
        AnalysisConfig(**{**CONFIG.to_dict(), **changes})


def test_the_config_dict_keeps_the_fast_settings_flat_and_reads_back():
    d = FAST.to_dict()
    assert d["fast_calibration"] == 0.15 and d["fast_checks"] == 0.15 and d["fast_reference_bits"] == 2
    assert list(d).index("fast_reference_bits") == list(d).index("sweep") + 1  # where the store key had them
    assert AnalysisConfig.from_dict(d) == FAST and "fast_checks" not in CONFIG.to_dict()


def test_rule_recipe_within_a_target_is_the_largest_that_fits():
    from workbench.palettes.size import bits_per_param
    from workbench.recipes.allocation import Measurements, threshold_recipe, threshold_recipe_within

    numels = {"a": 100, "b": 300, "c": 600}
    cumulative = {2: {"a": [50.0], "b": [40.0], "c": [30.0]}, 4: {"a": [60.0], "b": [55.0], "c": [45.0]}}
    m = Measurements(numels, cumulative, cumulative, original=200.0, linear_8bit=50.0)
    sizes = sorted({bits_per_param(threshold_recipe(m, t), numels) for t in range(20, 60)})  # below the top value
    for target in (2.0, 2.5, 3.3, 4.0, 9.0):
        bits = threshold_recipe_within(m, target)
        fitting = [s for s in sizes if s <= target + 1e-9]
        assert bits_per_param(bits, numels) == (max(fitting) if fitting else 2.0)
