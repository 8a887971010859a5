"""TODO(layout): docstring."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from workbench.errors import InvalidValueError
from workbench.palettes.config import SUPPORTED_NBITS
from workbench.recipes.refine import DEFAULT_KS
from workbench.sweep.prediction import FastSettings

if TYPE_CHECKING:
    pass


STRATEGIES = ("apple", "size-aware", "refined")
SWEEPS = ("exhaustive", "fast")
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
            interact by the latent error's gradient and measured steps (`workbench.recipes.refine`; needs "size-aware").
        threshold_rule (`str`, defaults to "curves"): "reference" = `linspace(original - 1, linear_8bit + 5, K)`
            exactly; "curves" = K thresholds read off the measured cumulative curves so that the recipes'
            bits/param spread evenly (the reference rule breaks where "original" is the ~200 dB cap of a
            deterministic device).
        group_size (`int`, defaults to 0): > 0 adds cumulative sweeps with `per_grouped_channel` palettes of
            this many output channels per LUT (ordered by the per-tensor isolated sensitivity).
        size_aware_targets (`tuple[float, ...]`, defaults to ()): extra bits/param targets for the size-aware
            strategy; it always also targets every apple recipe's bits/param.
        trajectory (`bool`, defaults to False): also generate full trajectories for every recipe and compare
            decoded images with the float model's (see `workbench.analysis.trajectory`).
        trajectory_steps (`int`, *optional*): steps of the full trajectories; None = the pipeline's default.
        trajectory_prompts (`tuple[str, ...]`, *optional*): None = `prompts`.
        layers (`tuple[str, ...]`, defaults to ()): glob patterns (`fnmatch`, `*` spans dots) of the candidates to
            measure, e.g. `("mid_block.*",)`; empty = every candidate. Layers left out stay float16 in recipes.
        exclude (`tuple[str, ...]`, defaults to ()): glob patterns of candidates to leave out.
        sweep (`str`, defaults to "exhaustive"): "exhaustive" measures every candidate at every width and the
            cumulative curves (the reference's method); "fast" measures every candidate at `fast_reference_bits`,
            a calibration subset at every width, predicts the rest and checks it (`workbench.sweep.prediction`).
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
