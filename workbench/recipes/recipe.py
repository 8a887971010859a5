"""Mixed-bit recipes, and the reference's pre-analysis JSON that carries them.

A recipe maps layer names (diffusers module paths) to a bit width; 16 means "leave it float16". An entry may
also be a palette config key (`"kmeans4_g16"`, `"wkmeans3"`: `workbench.palettes.config.PaletteConfig.from_key`)
for grouped, 3-bit or data-aware palettes; a recipe of ints only is exactly the reference's. The
reference (apple/ml-stable-diffusion's `mixed_bit_compression_pre_analysis.py`) writes one JSON per
model::

    {"model_version": str,
     "single_layer": {"<nbits>": {"<layer>": [psnr per prompt]}},
     "cumulative":   {"<nbits>": {"metadata": {...}, "<layer>": [psnr...]}},
     "baselines":    {"original": f, "linear_8bit": f, "recipe_4.50_bit_mixedpalette": f, ...},
     "recipes":      {"recipe_4.50_bit_mixedpalette": {"<layer>": nbits, ...}}}

`PreAnalysis` reads and writes that format unchanged, so a file published by Apple loads here and one
written here loads in their apply script (which reads only `recipes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from workbench.errors import InvalidValueError, UserError
from workbench.io import write_json_atomic
from workbench.models.layers import closest_names
from workbench.palettes.config import PaletteConfig, as_config
from workbench.palettes.size import bits_per_param

RECIPE_NBITS = (1, 2, 3, 4, 6, 8, 16)
RecipeEntry = int | str  # a bit width (16 = float16) or a palette config key
_KEYS = ("model_version", "single_layer", "cumulative", "baselines", "recipes")
RENAMED_KEY = "renamed"  # our addition to the format: {old recipe name: its name now}; the reference ignores it


class RecipeError(UserError, ValueError):
    """A recipe or pre-analysis file that cannot be used; the message says why and what is valid."""


def recipe_name(bits_per_param: float, suffix: str = "mixedpalette", decimals: int = 2) -> str:
    """The reference's naming: `recipe_4.50_bit_mixedpalette`. `bits_per_param` is the recipe's own size
    (`Recipe.bits_per_param` over the candidate layers), never a target it was made for, so the name and every
    label of the recipe (`workbench.palettes.size.SizeReport.label`) say the same size."""
    return f"recipe_{bits_per_param:.{decimals}f}_bit_{suffix}"


def free_recipe_name(bits_per_param: float, suffix: str, taken) -> str:
    """`recipe_name` with as many decimals (2 to 8) as it takes not to be one of `taken`; then a counter."""
    for decimals in range(2, 9):
        name = recipe_name(bits_per_param, suffix, decimals)
        if name not in taken:
            return name
    return f"{name}_{len(taken)}"


def _entry(value) -> RecipeEntry | None:
    """A recipe entry in its canonical form: an int width (also for a key naming per-tensor k-means, `"kmeans4"`
    -> 4, as Apple's format writes it), else the config key as `PaletteConfig.key` writes it; None if invalid."""
    if isinstance(value, str):
        try:
            config = PaletteConfig.from_key(value)
        except InvalidValueError:
            return None
        return config.nbits if config == PaletteConfig(config.nbits) else config.key
    if isinstance(value, bool) or value not in RECIPE_NBITS:
        return None
    return int(value)


@dataclass(frozen=True)
class Recipe:
    """Layer name -> bit width (1, 2, 3, 4, 6, 8, or 16 for float16) or palette config key (`"kmeans4_g16"`,
    `"wkmeans3"`; see `PaletteConfig.from_key`).

    Layers not listed are left float16.
    """

    name: str
    bits: Mapping[str, RecipeEntry]

    def __post_init__(self):
        entries = {str(k): _entry(v) for k, v in self.bits.items()}
        bad = {k: self.bits[k] for k, v in entries.items() if v is None}
        if bad:
            layer, value = next(iter(bad.items()))
            what = "palette config key" if isinstance(value, str) else "bit width"
            raise RecipeError(
                f"recipe {self.name!r}: layer {layer!r} has unsupported {what} {value!r} ({len(bad)} bad entries); "
                f"valid: {', '.join(map(str, RECIPE_NBITS))} (bit widths, 16 = float16) or a palette config key "
                "<mode><nbits>[_g<group_size>] such as kmeans4_g16 or wkmeans3"
            )
        object.__setattr__(self, "bits", entries)

    @property
    def configs(self) -> dict[str, PaletteConfig]:
        """Layer -> `PaletteConfig` for the layers it palettizes (float16 entries left out)."""
        configs = {name: as_config(entry) for name, entry in self.bits.items()}
        return {name: config for name, config in configs.items() if config is not None}

    @property
    def needs_ios18(self) -> bool:
        """Whether a grouped or 3-bit palette makes the recipe need Core ML's iOS18/macOS15 target."""
        return any(config.needs_ios18 for config in self.configs.values())

    @property
    def target(self) -> str:
        """The oldest deployment target that stores every palette: `"iOS18"` if `needs_ios18`, else `"iOS17"`."""
        return "iOS18" if self.needs_ios18 else "iOS17"

    @property
    def needs_importance(self) -> bool:
        """Whether some palette is data-aware, so fitting it (export) needs the analysis' importances."""
        return any(config.data_aware for config in self.configs.values())

    def validate(self, layer_names) -> Recipe:
        """Raise `RecipeError` if the recipe names layers not in `layer_names` (listing the closest)."""
        known = list(layer_names)
        known_set = set(known)
        unknown = [name for name in self.bits if name not in known_set]
        if unknown:
            hints = "; ".join(
                f"{u!r} (closest: {', '.join(closest_names(u, known, 3)) or 'none'})" for u in unknown[:3]
            )
            raise RecipeError(f"recipe {self.name!r} names {len(unknown)} layers not in the model: {hints}")
        return self

    def bits_per_param(self, numels: Mapping[str, int]) -> float:
        """The reference's size measure: sum(bits * numel) / sum(numel) over `numels` (layers not in the
        recipe count as 16 bits): `workbench.palettes.size.bits_per_param`."""
        return bits_per_param(self.bits, numels)

    def to_dict(self) -> dict:
        return {"name": self.name, "bits": dict(self.bits)}

    def renamed(self, name: str) -> Recipe:
        return Recipe(name, self.bits)

    def save(self, path: str | os.PathLike, model_version: str = "") -> Path:
        """Write a reference-format file holding just this recipe (their apply script reads it)."""
        analysis = PreAnalysis(model_version=model_version, recipes={self.name: dict(self.bits)})
        return analysis.save(path)


STRATEGIES = ("apple", "size-aware", "refined")


@dataclass(frozen=True)
class PlannedRecipe:
    """A recipe a strategy chose, and how; `workbench.analysis.result.RecipeResult` adds its measurement.

    Attributes:
        recipe: the per-layer choices (`Recipe`; named e.g. `recipe_4.50_bit_sizeaware`).
        strategy: "apple" (the reference's threshold rule), "size-aware" (the knapsack) or "refined".
        selector: the PSNR threshold (apple) or the bits/param target (size-aware, refined).
        bits_per_param: the recipe's size over the candidate layers (`Recipe.bits_per_param`).
        predicted_psnr: the knapsack's predicted PSNR (size-aware); None for the others.
    """

    recipe: Recipe
    strategy: str
    selector: float
    bits_per_param: float
    predicted_psnr: float | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InvalidValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def bits(self) -> Mapping[str, RecipeEntry]:
        return self.recipe.bits

    def renamed(self, name: str) -> PlannedRecipe:
        return replace(self, recipe=self.recipe.renamed(name))


@dataclass
class PreAnalysis:
    """The reference's pre-analysis JSON, field for field; unknown top-level keys are kept in `extra`."""

    model_version: str = ""
    single_layer: dict = field(default_factory=dict)
    cumulative: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    recipes: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    _order: tuple = field(default=("model_version", "recipes"), repr=False)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "pre-analysis") -> PreAnalysis:
        if not isinstance(d, Mapping):
            raise RecipeError(f"{source}: expected a JSON object at the top level, got {type(d).__name__}")
        if "recipes" not in d:
            raise RecipeError(f"{source}: no 'recipes' key; found keys {sorted(d)}")
        if not isinstance(d["recipes"], Mapping):
            raise RecipeError(f"{source}: 'recipes' must map recipe names to {{layer: nbits}}")
        for name, bits in d["recipes"].items():
            if not isinstance(bits, Mapping):
                raise RecipeError(f"{source}: recipe {name!r} must map layer names to bit widths or config keys")
            Recipe(name, bits)  # validates bit widths
        known = {k: d[k] for k in _KEYS if k in d}
        extra = {k: v for k, v in d.items() if k not in _KEYS}
        return cls(**known, extra=extra, _order=tuple(d))

    def to_dict(self) -> dict:
        # A key the source file had is written back even when empty; a new file gets the non-empty ones.
        values = {k: getattr(self, k) for k in _KEYS if k in self._order or getattr(self, k)} | self.extra
        order = [k for k in self._order if k in values] + [k for k in values if k not in self._order]
        return {k: values[k] for k in order}

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreAnalysis:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        except OSError as err:
            raise RecipeError(f"cannot read recipe file {path}: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (a partial file is never left behind), with the reference's indent=2."""

        return write_json_atomic(path, self.to_dict())

    @property
    def renamed(self) -> dict[str, str]:
        """Old recipe name -> its name in this file (`extra["renamed"]`): refined recipes were once named after
        the size they were refined within, now after their own size; `recipe` resolves an old name."""
        renamed = self.extra.get(RENAMED_KEY, {})
        return dict(renamed) if isinstance(renamed, Mapping) else {}

    def recipe(self, name: str | None = None) -> Recipe:
        """The recipe called `name` (or once called: `renamed`); with `name=None`, the only recipe in the file."""
        if name is None:
            if len(self.recipes) != 1:
                raise RecipeError(f"the file has {len(self.recipes)} recipes; pick one of: {', '.join(self.recipes)}")
            name = next(iter(self.recipes))
        name = self.renamed.get(name, name) if name not in self.recipes else name
        if name not in self.recipes:
            hint = ", ".join(closest_names(name, self.recipes, 3) or list(self.recipes)[:5])
            raise RecipeError(f"no recipe {name!r}; available: {hint}")
        return Recipe(name, self.recipes[name])


def load_recipe(path: str | os.PathLike, name: str | None = None) -> Recipe:
    """Load one recipe from a reference-format JSON (a full pre-analysis or a single-recipe file)."""
    return PreAnalysis.load(path).recipe(name)
