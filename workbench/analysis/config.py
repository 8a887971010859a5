"""What an analysis measures (`AnalysisConfig`: widths, prompts, strategies, sweep), the defaults that depend on
the model (`config_for_model`), and the built-in prompts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from workbench.demo.world import make_dataset
from workbench.errors import InvalidValueError
from workbench.models.loader import default_min_numel, is_demo_model
from workbench.palettes.config import SUPPORTED_NBITS
from workbench.recipes.recipe import STRATEGIES
from workbench.recipes.refine import DEFAULT_KS
from workbench.sweep.prediction import FastSettings

SWEEPS = ("exhaustive", "fast")
THRESHOLD_RULES = ("curves", "reference")
FLAT_FAST_KEYS = ("reference_bits", "calibration", "checks")  # what `AnalysisConfig.to_dict` writes of `fast`

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
        height, width (`int`, *optional*): image size in pixels, a multiple of 8; None = the pipeline's default
            (`unet.config.sample_size` times the VAE's factor: 512 for SD-1.5 and SD-2.1-base, 1024 for SDXL, 64
            for the demo model). The reference analyses at 768; a small size makes a CPU analysis affordable, at
            the cost of measuring the UNet at a resolution it is not used at.
        num_recipes (`int`, defaults to 7): K, recipes per strategy (the reference's thresholds count).
        strategies (`tuple[str, ...]`, defaults to ("apple", "size-aware", "refined")): recipe strategies to run:
            the reference's threshold rule, the size-aware knapsack, and the knapsack's recipes refined where layers
            interact by the latent error's gradient and measured steps (`workbench.recipes.refine`; needs
            "size-aware").
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
            cumulative curves (the reference's method); "fast" measures every candidate at `fast.reference_bits`,
            a calibration subset at every width, predicts the rest and checks it (`workbench.sweep.prediction`).
        fast (`FastSettings`, defaults to `FastSettings()`): the fast sweep's reference width, calibration and
            checks (used only with `sweep="fast"`).
        refine_rounds (`int`, defaults to 4): the "refined" strategy's linearisations per recipe at most (each one
            backward pass and up to 4 measured candidates, 2 in a fast analysis; it stops early when a round finds
            nothing better).
        refine_min_gain (`float`, defaults to 0.1): dB of mean PSNR a refinement round must gain for another to
            follow (0: go on while anything is gained).
        refine_evaluations (`int`, *optional*): candidates the whole refinement measures at most, shared evenly by
            the recipes it refines and their starts (a round that would pass a search's share is not started);
            None = no cap beyond `refine_rounds`.
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
    fast: FastSettings = FastSettings()
    refine_rounds: int = 4
    refine_min_gain: float = 0.1
    refine_evaluations: int | None = None
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
        for name in ("height", "width"):
            size = getattr(self, name)
            if size is not None and (isinstance(size, bool) or size < 8 or size % 8):
                raise InvalidValueError(f"{name}={size} must be a positive multiple of 8 pixels (or None: the "
                                        "pipeline's own)")  # fmt: skip
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
        if not self.refine_min_gain >= 0:
            raise InvalidValueError(f"refine_min_gain must be >= 0 dB, got {self.refine_min_gain}")
        if self.refine_evaluations is not None and self.refine_evaluations < 1:
            raise InvalidValueError(f"refine_evaluations must be >= 1 or None, got {self.refine_evaluations}")

    def _check_sweep(self) -> None:
        if self.sweep not in SWEEPS:
            raise InvalidValueError(f"unknown sweep {self.sweep!r}; valid: {', '.join(SWEEPS)}")
        if self.sweep != "fast":
            return
        if self.fast.reference_bits not in self.nbits:
            raise InvalidValueError(
                f"fast.reference_bits={self.fast.reference_bits} is not one of the swept widths {list(self.nbits)}"
            )
        if self.group_size:
            raise InvalidValueError("group_size > 0 (grouped cumulative curves) needs sweep='exhaustive'")

    @property
    def refine_ks(self) -> tuple[int, ...]:
        """Layer changes per candidate the refinement measures each round: fewer in a fast analysis."""
        return tuple(self.fast.refine_ks if self.sweep == "fast" else DEFAULT_KS)

    @property
    def approximate_pricing(self) -> bool:
        """Whether the refinement prices options with approximate palettes: in a fast analysis (which fits exactly
        only what it measures)."""
        return self.sweep == "fast" and "refined" in self.strategies

    def to_dict(self) -> dict:
        """The fields as JSON values (the store key hashes them). The fast sweep's settings are written flat, as
        `fast_reference_bits`, `fast_calibration` and `fast_checks`, and only for a fast sweep; `refine_rounds` and
        `refine_min_gain` only with the refined strategy, `refine_evaluations` only with it and a cap, and
        `data_aware` only when set: settings that decide nothing are left out."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fast"}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if self.sweep == "exhaustive":
            del d["sweep"]
        else:
            at = list(d).index("sweep") + 1  # the flat keys where the fields stood
            flat = {f"fast_{k}": v for k, v in self.fast.to_dict().items() if k in FLAT_FAST_KEYS}
            d = {**dict(list(d.items())[:at]), **flat, **dict(list(d.items())[at:])}
        if "refined" not in self.strategies:
            del d["refine_rounds"], d["refine_min_gain"], d["refine_evaluations"]
        elif d["refine_evaluations"] is None:
            del d["refine_evaluations"]
        if not self.data_aware:
            del d["data_aware"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AnalysisConfig:
        """The inverse of `to_dict` (flat `fast_*` keys or a `fast` object); unknown keys are an error."""
        d = dict(d)
        fast = dict(d.pop("fast", {}))
        fast.update({k[len("fast_") :]: d.pop(k) for k in [k for k in d if k.startswith("fast_")]})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown or set(fast) - set(FLAT_FAST_KEYS):
            bad = sorted(unknown | {f"fast_{k}" for k in set(fast) - set(FLAT_FAST_KEYS)})
            raise InvalidValueError(f"unknown AnalysisConfig keys {bad}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values, fast=FastSettings(**fast))


def config_for_model(model, **options) -> AnalysisConfig:
    """An `AnalysisConfig` for `model` (a model spec as `load_pipeline` takes it) from options named as its fields.

    Options that are None take their defaults; `resolution` stands for square `height` and `width`. Two defaults
    depend on the model: `min_numel`
    (`default_min_numel`: 2048 for the demo and tiny models, whose layers are small; the reference's 1e5 otherwise)
    and, for the demo model with `trajectory`, `trajectory_prompts`: captions of its own shapes world, which its
    adherence scorer reads.

    Example:
        >>> config_for_model(None, nbits=[2, 4], trajectory=True).min_numel
        2048
    """
    options = {k: v for k, v in options.items() if v is not None}
    resolution = options.pop("resolution", None)  # square images of this size (`--resolution`)
    if resolution is not None:
        if isinstance(resolution, bool) or resolution < 8 or resolution % 8:
            raise InvalidValueError(f"resolution={resolution} must be a positive multiple of 8 pixels")
        options.setdefault("height", resolution)
        options.setdefault("width", resolution)
    options.setdefault("min_numel", default_min_numel(model))
    if options.get("trajectory") and is_demo_model(model) and "trajectory_prompts" not in options:
        count = len(options.get("prompts", DEFAULT_PROMPTS))
        options["trajectory_prompts"] = tuple(make_dataset(count, seed=1).captions)
    return AnalysisConfig(**options)
