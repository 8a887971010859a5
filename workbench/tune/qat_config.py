"""Training-time palettization's settings (`QatConfig`), checked when built; no torch here, so the command line checks
them before it imports the training code (`workbench.tune.qat`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workbench.errors import InvalidValueError, from_known_fields

UNIFORM_WIDTHS = (1, 2, 3, 4, 6, 8)  # `--palettize N`: per-tensor k-means at N bits on every candidate layer
LUT_MODES = ("centroid", "learned")  # how LUT entries train (`QatConfig.luts`)
ASSIGNMENTS = (
    "fixed",
    "nearest",
    "soft",
)  # how weights choose their LUT entry while training (`QatConfig.assignment`)


@dataclass(frozen=True)
class QatConfig:
    """How to fine-tune the demo model's UNet while its weights are palettized. Frozen; `to_dict`/`from_dict`
    round-trip through JSON.

    Args:
        palettize (`str`): a uniform width ("2": per-tensor k-means at 2 bits on every candidate layer) or a recipe
            file (ours or the reference's pre-analysis JSON; `workbench.recipes.recipe.load_recipe`).
        recipe_name (`str`, defaults to ""): which recipe of that file ("": its only one).
        steps (`int`, defaults to 120): optimizer steps (AdamW, 5% warmup then cosine decay, as the demo's training).
        batch (`int`, defaults to 32): training images per step (the demo's own training: 64).
        lr (`float`, defaults to 1e-3): peak learning rate of the float masters (the defaults are the settings
            `benchmarks/learned_qat.py` measured).
        recluster_every (`int`, defaults to 0): steps between exact k-means re-fits of every palette on the float
            masters (`workbench.palettes.fit.fit_palette`); 0 keeps the first assignment (the post-training k-means')
            for the whole run, and every LUT entry is the mean of the masters assigned to it after every step. On the
            demo model a re-fit raised the loss threefold (docs/training_time.md): Adam moves every master by about
            the learning rate whatever its layer's scale, and a re-fit from scratch sees that drift where the
            centroid (a mean) averages it out.
        distill (`float`, defaults to 1.0): weight of the float UNet's prediction as a second target beside the
            data's (the loss is `data + distill * teacher`, both weighted per timestep as the demo's loss); 0 trains
            on the data alone.
        luts (`str`, defaults to "centroid"): how the LUT entries train. "centroid": each entry is the float16 mean
            of the float masters assigned to it, after every step (the masters train; `recluster_every` applies).
            "learned": the entries themselves are parameters (`workbench.tune.luts.LutWeight`, the learned-LUT
            parametrization), their gradient the sum of their weights' gradients, each layer's step size `lut_lr`
            times its weight RMS; the assignment stays the post-training k-means'; no float masters.
        assignment (`str`, defaults to "soft"): with `luts="centroid"` (learned LUTs keep theirs), which entry each
            weight reads while training. "soft": a soft assignment in the forward pass (each weight a softmax-weighted
            mix of its group's centroids, the centroids the weighted means of the masters: one differentiable k-means
            iteration, recomputed in the backward pass so nothing of size weights x entries is kept), its
            `temperature` constant or annealed to 0 (`anneal`); after every step each
            weight takes its nearest entry and each entry the mean of its masters. "fixed": the post-training k-means'
            assignment for the whole run, the gradient straight through to the masters. "nearest": as "fixed", but
            each weight moves to the entry nearest its master after every step (docs/training_time.md).
        temperature (`float`, defaults to 0.06): with `assignment="soft"`, the temperature relative to the squared
            mean spacing of each palette group's first entries ((max - min) / (2**nbits - 1)): between two adjacent
            entries the attention changes by a factor e over `temperature / 2` of their gap around its midpoint, at
            every width.
        anneal (`bool`, defaults to False): with `assignment="soft"`, True anneals the temperature to 0 at three
            quarters of the steps (the last quarter hard); False keeps it constant, and the palettes written are each
            weight's nearest entry after the last step (as DKM's `finalize`). Constant was better and steadier on the
            demo model (docs/training_time.md).
        lut_lr (`float`, defaults to 0.01): with `luts="learned"`, the LUT entries' peak step size relative to their
            layer's weight RMS (as `workbench tune`); the schedule is the same warmup and cosine decay.
        min_numel (`int`, defaults to 2048): with a uniform width, the candidate layers have more weights than this
            (the analysis' default on the demo model).
        seed (`int`, defaults to 0): seeds every batch drawn (the dataset is the base model's own).
    """

    palettize: str
    recipe_name: str = ""
    steps: int = 120
    batch: int = 32
    lr: float = 1e-3
    recluster_every: int = 0
    distill: float = 1.0
    luts: str = "centroid"
    assignment: str = "soft"
    temperature: float = 0.06
    anneal: bool = False
    lut_lr: float = 0.01
    min_numel: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "palettize", str(self.palettize))
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("recluster_every", "min_numel", "seed"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "lut_lr"):
            if not getattr(self, name) > 0:
                raise InvalidValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("distill", "temperature"):
            if not getattr(self, name) >= 0:
                raise InvalidValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._check_modes()
        if self.uniform_bits is None and not Path(self.palettize).is_file():
            raise InvalidValueError(
                f"--palettize {self.palettize!r} is neither a palette width "
                f"({', '.join(map(str, UNIFORM_WIDTHS))}) nor a recipe file"
            )

    def _check_modes(self) -> None:
        """`luts` and `assignment` are known, and combine."""
        if self.luts not in LUT_MODES:
            raise InvalidValueError(f"luts={self.luts!r}; valid: {', '.join(LUT_MODES)}")
        if self.assignment not in ASSIGNMENTS:
            raise InvalidValueError(f"assignment={self.assignment!r}; valid: {', '.join(ASSIGNMENTS)}")
        if self.luts == "learned" and self.recluster_every:
            raise InvalidValueError("recluster_every needs luts='centroid' (learned LUTs keep their assignment)")
        if self.recluster_every and self.assignment != "fixed":
            raise InvalidValueError(
                f"recluster_every re-fits a fixed assignment; with assignment={self.assignment!r} give "
                "assignment='fixed' (--assignment fixed)"
            )

    @property
    def uniform_bits(self) -> int | None:
        """The width of a uniform `palettize` ("2" -> 2), None for a recipe file."""
        text = self.palettize.strip()
        if text.isdigit() and int(text) in UNIFORM_WIDTHS:
            return int(text)
        if text.isdigit():
            valid = ", ".join(map(str, UNIFORM_WIDTHS))
            raise InvalidValueError(f"--palettize {text}: unsupported palette width; valid: {valid} or a recipe file")
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QatConfig:
        return from_known_fields(cls, data)
