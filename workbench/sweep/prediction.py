"""The fast sweep: every candidate measured at one width, a few at every width, the rest predicted and checked.

The exhaustive sweep measures every candidate layer alone at every width (and the cumulative curves), about ten
UNet evaluations per layer. This sweep measures one, and predicts the others from a model of how a layer's output
noise grows with its weights' quantization error:

    log10 d_l(b) = log10 d_l(r) + log10 e_l(b) - log10 e_l(r) + c_b,        c_r = 0

- `d_l(b)`: the one-step latent noise power (over peak^2, the harness' floor removed) with layer l alone
  palettized at width b, per prompt, as `workbench.recipes.allocation.layer_distortions` reads it from PSNRs;
- `e_l(b)`: the layer's weight quantization error at width b (`quantization_errors`: the optimal 1-D k-means
  error of its float16 values, computed without running the UNet);
- `r`: the reference width every layer is measured at; the per-width offsets `c_b` are shared by all layers and
  fitted by least squares on a calibration subset of layers measured at every width (they absorb how the UNet's
  response departs from proportional at coarse or fine widths).

The predicted isolated PSNRs fill the reference-format JSON like measured ones (the cumulative curves are the
model's additive sums along the sensitivity order), marked as predicted everywhere they are written. Validation
runs in the same analysis: the leave-one-layer-out error of the calibration fit per width, and `checks`: after the
recipes are planned, the predicted (layer, width) options that carry the most predicted noise in them are measured,
the measurements replace the predictions, the recipes are planned again and re-measured end to end as always.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(sweep="fast", strategies=("size-aware",)), out_dir="out")
    >>> result.fast.to_dict()  # calibration layers, fit, held-out and check errors (dB)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from workbench.errors import InvalidValueError
from workbench.palettes.kmeans import kmeans_1d_binned, unique_float16
from workbench.sweep.phases import isolated_points

TINY = 1e-30  # a distortion below the floor is clipped here, so its logarithm stays finite


# --------------------------------------------------------------------------------------------------------------
# The cheap side: weight quantization errors.


def float16_histogram(weight: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct float16 values of `weight` (float64, ascending) and their counts (float64)."""
    w = weight.detach().to("cpu", torch.float16).numpy() if isinstance(weight, torch.Tensor) else weight
    unique = unique_float16(np.asarray(w, dtype=np.float16))
    return unique.values.astype(np.float64), unique.counts.astype(np.float64)


def quantization_errors(
    weight: torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
    widths: Sequence[int],
    bins_per_cluster: int = 32,
    max_bins: int = 2048,
) -> dict[int, float]:
    """The squared error `sum (w - q_b(w))**2` of the optimal per-tensor k-means palette of `weight`'s float16
    values at each width b, the proxy `e_l(b)` of the fast sweep's model.

    The distinct float16 values (with their counts) are clustered by `workbench.palettes.kmeans.kmeans_1d_binned`:
    merged
    into at most `min(bins_per_cluster * 2**b, max_bins)` bins and clustered exactly; the error is
    an upper bound of the optimum that is exact when no bins are merged and within a few percent otherwise. It
    costs milliseconds per width instead of an 8-bit fit's seconds.

    Args:
        weight: the weight, or its `float16_histogram`.

    Returns:
        width -> error, in the weight's units squared (float64).
    """
    values, counts = weight if isinstance(weight, tuple) else float16_histogram(weight)
    return {int(b): kmeans_1d_binned(values, counts, 1 << int(b), bins_per_cluster, max_bins)[1] for b in widths}


def layer_quantization_errors(
    layers: Mapping[str, torch.nn.Module], widths: Sequence[int], pool: ThreadPoolExecutor
) -> dict[str, Future]:
    """`quantization_errors` of every layer's weight at `widths`, on `pool` (numba releases the GIL): layer -> a
    future of width -> error. The weights' histograms are taken before this returns, so the caller may palettize
    the layers in place right after."""
    histograms = {name: float16_histogram(layer.weight) for name, layer in layers.items()}
    return {name: pool.submit(quantization_errors, h, widths) for name, h in histograms.items()}


# --------------------------------------------------------------------------------------------------------------
# The model.


def distortions(psnr: Sequence[float], floor: Sequence[float]) -> np.ndarray:
    """Per prompt, `10**(-psnr/10) - floor` clipped at `TINY`: the noise a change added above the harness' floor."""
    return np.maximum(10.0 ** (-np.asarray(psnr, dtype=np.float64) / 10.0) - np.asarray(floor), TINY)


def psnr_from_distortions(d: np.ndarray, floor: Sequence[float]) -> tuple[float, ...]:
    """Per prompt, `-10 log10(floor + d)`, rounded to 0.1 dB as measured PSNRs are."""
    return tuple(round(float(x), 1) for x in -10.0 * np.log10(np.asarray(floor) + d))


@dataclass(frozen=True)
class GainModel:
    """`d(b) = d(r) * e(b) / e(r) * 10**offsets[b]` (see the module docstring).

    Attributes:
        reference_bits: r, the width every layer is measured at.
        offsets: width -> c_b (0 at r), the mean over the calibration layers of how far the log distortion ratio
            departs from the weight-error ratio.
        rows: calibration points the fit used.
    """

    reference_bits: int
    offsets: Mapping[int, float]
    rows: int = 0

    def log_ratio(self, errors: Mapping[int, float], b: int) -> float:
        """`log10 d(b) - log10 d(r)` of a layer with quantization `errors`."""
        if b == self.reference_bits:
            return 0.0
        return _log_error_ratio(errors, b, self.reference_bits) + self.offsets[b]

    def predict(self, measured: np.ndarray, errors: Mapping[int, float], b: int) -> np.ndarray:
        """Per-prompt distortions at width b from the per-prompt `measured` distortions at the reference width."""
        return measured * 10.0 ** self.log_ratio(errors, b)


def _log_error_ratio(errors: Mapping[int, float], b: int, r: int) -> float:
    return math.log10(max(errors[b], TINY)) - math.log10(max(errors[r], TINY))


def fit_gain_model(
    measured: Mapping[str, Mapping[int, np.ndarray]],
    errors: Mapping[str, Mapping[int, float]],
    reference_bits: int,
    widths: Sequence[int],
) -> GainModel:
    """The offsets `c_b` from the layers of `measured` (layer -> width -> per-prompt distortions) that hold the
    reference width and others: the mean of `log10(d(b) / d(r)) - log10(e(b) / e(r))` (the least-squares fit).
    Without such points an offset is 0 (distortion proportional to weight error).

    The weight errors' exponent is fixed at 1 (output noise power proportional to weight error power, the linear
    regime): fitted freely it is not identifiable next to per-width offsets when layers' error ratios are alike,
    and on the demo model a fitted exponent predicted held-out layers no better.
    """
    residuals: dict[int, list[float]] = {int(b): [] for b in widths if b != reference_bits}
    for layer, by_width in measured.items():
        if reference_bits not in by_width:
            continue
        ref = math.log10(float(np.mean(by_width[reference_bits])))
        for b, d in by_width.items():
            if b != reference_bits:
                ratio = _log_error_ratio(errors[layer], b, reference_bits)
                residuals[b].append(math.log10(float(np.mean(d))) - ref - ratio)
    offsets = {b: float(np.mean(v)) if v else 0.0 for b, v in residuals.items()}
    return GainModel(reference_bits, offsets, sum(map(len, residuals.values())))


def held_out_errors(
    measured: Mapping[str, Mapping[int, np.ndarray]],
    errors: Mapping[str, Mapping[int, float]],
    reference_bits: int,
    widths: Sequence[int],
    floor: Sequence[float],
) -> dict[int, float]:
    """Width -> mean absolute error (dB, mean-over-prompts PSNR) of each calibration layer's predictions by a model
    fitted without it (leave one layer out); NaN where there are fewer than 3 calibration layers."""
    calibration = [layer for layer, d in measured.items() if len(d) > 1 and reference_bits in d]
    out: dict[int, list[float]] = {int(b): [] for b in widths if b != reference_bits}
    if len(calibration) >= 3:
        for layer in calibration:
            rest = {name: measured[name] for name in calibration if name != layer}
            model = fit_gain_model(rest, errors, reference_bits, widths)
            ref = measured[layer][reference_bits]
            for b, d in measured[layer].items():
                if b != reference_bits:
                    predicted = model.predict(ref, errors[layer], b)
                    out[b].append(abs(_mean_psnr(predicted, floor) - _mean_psnr(d, floor)))
    return {b: float(np.mean(v)) if v else math.nan for b, v in out.items()}


def _mean_psnr(d: np.ndarray, floor: Sequence[float]) -> float:
    return float(np.mean(-10.0 * np.log10(np.asarray(floor) + d)))


def calibration_layers(gains: Mapping[str, float], count: int) -> list[str]:
    """`count` layers spread evenly over the ranking by `gains` (measured distortion per unit weight error), so the
    calibration spans insensitive to sensitive layers; deterministic."""
    ranked = sorted(gains, key=lambda name: (gains[name], name))
    if count >= len(ranked):
        return ranked
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, count)).astype(int))
    return [ranked[i] for i in picks]


# --------------------------------------------------------------------------------------------------------------
# What the fast sweep reports.


@dataclass(frozen=True)
class Check:
    """A predicted isolated point measured to check the model: `error_db = predicted - measured` (mean PSNR)."""

    layer: str
    nbits: int
    predicted_psnr: float
    measured_psnr: float

    @property
    def error_db(self) -> float:
        return self.predicted_psnr - self.measured_psnr


@dataclass
class FastReport:
    """The fast sweep's model and validation, the `fast` object of `run.json`.

    Attributes:
        model: the fitted `GainModel` (refitted after the checks).
        calibration: layers measured at every width.
        measured_points, predicted_points: isolated (layer, width) points measured / predicted.
        held_out_db: width -> leave-one-layer-out mean absolute error of the calibration fit (dB).
        checks: predicted points measured after the first plan (`Check`).
        recipe_errors_db: recipe -> predicted minus re-measured mean PSNR (dB), for the recipes with a prediction.
        alternatives: re-measured recipes that lost to a better one at the same target
            (`workbench.analysis.fast.keep_best_per_target`, `RecipeResult`s).
    """

    model: GainModel
    calibration: list[str]
    measured_points: int
    predicted_points: int
    held_out_db: dict[int, float]
    checks: list[Check] = field(default_factory=list)
    recipe_errors_db: dict[str, float] = field(default_factory=dict)
    alternatives: list = field(default_factory=list)

    @property
    def check_error_db(self) -> float:
        """Mean absolute error of the checks (dB); NaN without checks."""
        return float(np.mean([abs(c.error_db) for c in self.checks])) if self.checks else math.nan

    def summary(self) -> str:
        """One line: points measured and predicted, the calibration fit's held-out error, the checks' error."""
        held_out = ", ".join(f"{b}-bit {v:.1f}" for b, v in self.held_out_db.items())
        return (
            f"{self.measured_points} isolated points measured, {self.predicted_points} predicted; held-out error of "
            f"the calibration fit (dB) {held_out}; {len(self.checks)} checks, mean abs error "
            f"{self.check_error_db:.2f} dB"
        )

    def checks_frame(self):
        """One row per check: layer, bits, predicted and measured mean PSNR, error_db (predicted - measured)."""
        import pandas as pd

        rows = [(c.layer, c.nbits, c.predicted_psnr, c.measured_psnr, c.error_db) for c in self.checks]
        return pd.DataFrame(rows, columns=["layer", "bits", "predicted", "measured", "error_db"])

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "calibration": list(self.calibration),
            "measured_points": self.measured_points,
            "predicted_points": self.predicted_points,
            "held_out_db": {str(b): v for b, v in self.held_out_db.items()},
            "check_error_db": self.check_error_db,
            "checks": [{**asdict(c), "error_db": c.error_db} for c in self.checks],
            "recipe_errors_db": dict(self.recipe_errors_db),
            "alternatives": [
                {"name": r.name, "bits_per_param": r.bits_per_param, "psnr_mean": r.psnr_mean, "target": r.selector}
                for r in self.alternatives
            ],
        }


# --------------------------------------------------------------------------------------------------------------
# The sweep.


@dataclass(frozen=True)
class FastSettings:
    """How much the fast sweep measures.

    Attributes:
        reference_bits: the width every candidate is measured at.
        calibration: fraction of the candidates measured at every width (at least 3 layers).
        checks: predicted points measured after planning, as a fraction of the number of candidates (at least 3),
            spread over `check_rounds` rounds of plan, check, refit.
        check_rounds: how many times the recipes are planned and their most influential predicted points checked.

        refine_ks: layer changes per measured candidate of the refined strategy's rounds (`workbench.recipes.refine`)
        in a
            fast analysis (the exhaustive one measures `DEFAULT_KS`).

    On the demo model, checks measured in rounds brought the fast recipes closer to the exhaustive ones than the
    same number of points in one round or spent on calibration, and a 2-bit reference closer than a 4-bit one.
    Since the refined strategy re-measures whole recipes around the knapsack's (`workbench.recipes.refine`), which
    corrects what checks of isolated points cannot (layers interact), the defaults spend few of the candidates on
    checks (far fewer than before the refinement) and on calibration, and measure two candidates a round (2 and 8
    changes): with the refinement, more of each bought little and cost evaluations. The settings compared, with
    their evaluations and gains on the demo model and tiny SDXL, are in docs/benchmarks.md.
    """

    reference_bits: int = 2
    calibration: float = 0.03
    checks: float = 0.05
    check_rounds: int = 4
    refine_ks: tuple[int, ...] = (2, 8)

    def __post_init__(self):
        for name in ("calibration", "checks"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidValueError(f"fast {name} must lie in [0, 1] (a fraction of the candidates), got {value}")
        if self.check_rounds < 0 or not self.refine_ks or min(self.refine_ks) < 1:
            raise InvalidValueError(f"check_rounds must be >= 0 and refine_ks positive, got {self}")
        object.__setattr__(self, "refine_ks", tuple(int(k) for k in self.refine_ks))

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    def calibration_count(self, num_layers: int) -> int:
        return min(num_layers, max(3, round(self.calibration * num_layers)))

    def checks_per_round(self, num_layers: int) -> int:
        return max(1, round(max(3, round(self.checks * num_layers)) / max(1, self.check_rounds)))


@dataclass
class FastSweep:
    """Measured and predicted isolated points and the model between them.

    Attributes:
        widths: the analysis' widths.
        layers: the candidates, in module order.
        floor: the harness' noise floor per prompt (`10**(-original/10)`).
        errors: layer -> width -> quantization error (`quantization_errors`).
        measured: layer -> width -> per-prompt distortions measured.
        report: the model and its validation (`FastReport`).
    """

    widths: tuple[int, ...]
    layers: tuple[str, ...]
    floor: tuple[float, ...]
    errors: dict[str, dict[int, float]]
    measured: dict[str, dict[int, np.ndarray]]
    report: FastReport

    def distortion(self, layer: str, b: int) -> np.ndarray:
        """Per-prompt distortion of `layer` alone at width `b`: measured if it was, else predicted."""
        known = self.measured[layer]
        if b in known:
            return known[b]
        return self.report.model.predict(known[self.report.model.reference_bits], self.errors[layer], b)

    def is_predicted(self, layer: str, b: int) -> bool:
        return b not in self.measured[layer]

    def psnr(self, layer: str, b: int) -> tuple[float, ...]:
        """Per-prompt isolated PSNR, measured or predicted (rounded to 0.1 dB)."""
        return psnr_from_distortions(self.distortion(layer, b), self.floor)

    def isolated(self) -> dict[int, dict[str, tuple[float, ...]]]:
        """width -> layer -> PSNR per prompt, as `workbench.sweep.phases.IsolatedSweep.psnr` holds it."""
        return {b: {n: self.psnr(n, b) for n in self.layers} for b in self.widths}

    def cumulative(self, order: Mapping[int, Sequence[str]]) -> dict[int, dict[str, tuple[float, ...]]]:
        """width -> layer -> the model's PSNR per prompt with that layer and all before it in `order[width]`
        palettized: the floor plus the sum of their distortions."""
        out = {}
        for b in self.widths:
            total = np.zeros(len(self.floor))
            out[b] = {}
            for name in order[b]:
                total = total + self.distortion(name, b)
                out[b][name] = psnr_from_distortions(total, self.floor)
        return out

    def record(self, layer: str, b: int, psnr: Sequence[float]) -> None:
        self.measured[layer][b] = distortions(psnr, self.floor)


def fast_sweep(
    candidates,
    widths: Sequence[int],
    runner,
    executor,
    original: Sequence[float],
    settings: FastSettings = FastSettings(),
    workers: int = 1,
) -> FastSweep:
    """Measure every candidate at `settings.reference_bits`, a calibration subset at every width, fit the model.

    Args:
        candidates, runner, executor: as `workbench.sweep.phases.isolated_sweep` takes them.
        widths: the analysis' widths (the reference width among them).
        original: the float model's PSNR per prompt (the harness' floor).
        settings (`FastSettings`): how much to measure.
        workers (`int`, defaults to 1): threads computing the quantization errors while the UNet runs.
    """

    widths = tuple(sorted(int(b) for b in widths))
    r = settings.reference_bits
    layers = tuple(candidates.layers)
    floor = tuple(10.0 ** (-np.asarray(original, dtype=np.float64) / 10.0))
    n_cal = settings.calibration_count(len(layers))
    runner.plan(len(layers) + n_cal * (len(widths) - 1))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # the errors are computed while the reference is measured
        pending = layer_quantization_errors(candidates.layers, widths, pool)
        at_reference = isolated_points(candidates, [(n, r) for n in layers], runner, executor)
        errors = {name: future.result() for name, future in pending.items()}
    measured = {n: {r: distortions(at_reference[n, r], floor)} for n in layers}
    gains = {n: float(np.mean(measured[n][r])) / max(errors[n][r], TINY) for n in layers}
    calibration = calibration_layers(gains, n_cal)
    points = [(n, b) for n in calibration for b in widths if b != r]
    for (n, b), psnr in isolated_points(candidates, points, runner, executor).items():
        measured[n][b] = distortions(psnr, floor)
    calibrated = {n: measured[n] for n in calibration}
    report = FastReport(
        model=fit_gain_model(calibrated, errors, r, widths),
        calibration=calibration,
        measured_points=len(layers) + len(points),
        predicted_points=len(layers) * len(widths) - len(layers) - len(points),
        held_out_db=held_out_errors(calibrated, errors, r, widths, floor),
    )
    return FastSweep(widths, layers, floor, errors, measured, report)


def check_points(sweep: FastSweep, recipes: Sequence[Mapping[str, int]], count: int) -> list[tuple[str, int]]:
    """The `count` predicted (layer, width) options of `recipes` with the most predicted noise (mean over prompts),
    the ones whose errors would move the recipes most; each once."""
    options = {(n, int(b)) for bits in recipes for n, b in bits.items() if int(b) in sweep.widths}
    predicted = [(n, b) for n, b in options if sweep.is_predicted(n, b)]
    predicted.sort(key=lambda p: (-float(np.mean(sweep.distortion(*p))), p))
    return predicted[:count]


def run_checks(sweep: FastSweep, points: Sequence[tuple[str, int]], candidates, runner, executor) -> list[Check]:
    """Measure `points`, record them in `sweep` (they replace the predictions), refit the model's offsets on every
    measured point, and return the checks (each against the prediction made before it was measured)."""

    predicted = {p: _mean_psnr(sweep.distortion(*p), sweep.floor) for p in points}
    runner.plan(len(points))
    checks = []
    for (n, b), psnr in isolated_points(candidates, points, runner, executor).items():
        sweep.record(n, b, psnr)
        checks.append(Check(n, b, predicted[n, b], _mean_psnr(sweep.measured[n][b], sweep.floor)))
    report = sweep.report
    report.checks.extend(checks)
    report.measured_points += len(checks)
    report.predicted_points -= len(checks)
    # the corrective round: the offsets refitted on every layer measured at more than the reference width
    several = {n: d for n, d in sweep.measured.items() if len(d) > 1}
    report.model = fit_gain_model(several, sweep.errors, report.model.reference_bits, sweep.widths)
    return checks
