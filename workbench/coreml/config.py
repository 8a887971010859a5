"""What an export decides: `ExportConfig`, the settings of `export_pipeline` / `workbench export`, checked when made.

Example:
    >>> config = ExportConfig(recipe=load_recipe("recipes.json"), components=("unet", "text_encoder"))
    >>> report = export_pipeline(pipe, "out/", config)
    >>> ExportConfig.from_dict(config.to_dict()) == config   # written into verification.json
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Union

import numpy as np

from workbench.coreml.components import COMPONENTS, check_component
from workbench.coreml.layout import DEFAULT_LAYOUT, check_layout
from workbench.errors import InvalidValueError
from workbench.palettes.config import PaletteConfig, as_config
from workbench.recipes.recipe import Recipe

DEFAULT_MIN_NUMEL = 2048  # coremltools' own weight_threshold
RecipeLike = Union[Recipe, Mapping[str, "int | str | PaletteConfig | None"], None]


def _strings(value, what: str) -> tuple[str, ...]:
    """A sequence of strings as a tuple (a lone string is one item, not its characters)."""
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise InvalidValueError(f"{what} must be strings, got {items!r}")
    return items


@dataclass(frozen=True)
class ExportConfig:
    """The settings of an export: what is palettized, how, into which packages.

    Attributes:
        recipe (`Recipe` or `Mapping[str, int | str | PaletteConfig]`, *optional*): UNet layer -> bits (16 = float16),
            config key or `PaletteConfig`; applies to the UNet only.
        nbits (`int`, *optional*): instead of a recipe, one width for every Linear/Conv2d layer over `min_numel`
            weights of every component (the reference's `--quantize-nbits`). Neither: float16 packages.
        components (`tuple[str, ...]`, defaults to `("unet",)`): from `COMPONENTS`.
        min_numel (`int`, defaults to 2048): candidate threshold for `nbits` and for bits/param (strict `>`).
        layers, exclude (`tuple[str, ...]`, defaults to ()): globs narrowing the UNet's palettized layers
            (`workbench.models.layers.select_layers`).
        layout (`str`, defaults to `"apple"`): the packages' inputs, outputs and names (`workbench.coreml.layout`).
        batch_size (`int`, *optional*): the traced inputs' batch (`workbench.coreml.components.example_inputs`).
        verify (`bool`, defaults to True): read the packages back and compare every weight with the simulation.
        chunk_unet (`bool`, defaults to False): write the UNet as two packages of about equal size (`UnetChunk1`,
            `UnetChunk2`, which Apple's Swift pipeline loads where one UNet package is too large for a phone).
        piece_bytes (`int`, *optional*): the most float32 parameter bytes of the UNet converted at once
            (`workbench.coreml.unet_export.DEFAULT_PIECE_BYTES`): export memory follows it.

    The deployment target is not a setting: each package gets the oldest that stores its palettes (iOS17, or
    iOS18 for grouped or 3-bit ones).

    Raises:
        InvalidValueError (a `ValueError`): a recipe and nbits both, an unsupported width, a recipe without the
            UNet among the components, an unknown layout, a negative min_numel or a batch size under 1;
            `ValueError` for an unknown component.
    """

    recipe: RecipeLike = None
    nbits: int | None = None
    components: tuple[str, ...] = ("unet",)
    min_numel: int = DEFAULT_MIN_NUMEL
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layout: str = DEFAULT_LAYOUT
    batch_size: int | None = None
    verify: bool = True
    chunk_unet: bool = False
    piece_bytes: int | None = None

    def __post_init__(self):
        components = tuple(check_component(c) for c in _strings(self.components, "components"))
        if not components:
            raise InvalidValueError(f"no components to export; valid: {', '.join(COMPONENTS)}")
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "layers", _strings(self.layers, "layers"))
        object.__setattr__(self, "exclude", _strings(self.exclude, "exclude"))
        check_layout(self.layout)
        if self.recipe is not None and not isinstance(self.recipe, (Recipe, Mapping)):
            raise InvalidValueError(f"recipe must be a Recipe or a mapping of layer -> bits, got {self.recipe!r}")
        if self.recipe is not None and self.nbits is not None:
            raise InvalidValueError("pass a recipe or nbits, not both")
        if self.nbits is not None:
            if isinstance(self.nbits, bool) or not isinstance(self.nbits, (int, np.integer)):
                raise InvalidValueError(f"nbits must be an integer bit width, got {self.nbits!r}")
            object.__setattr__(self, "nbits", int(self.nbits))
            as_config(self.nbits)  # an unsupported width fails here, naming the valid ones
        if self.recipe is not None and "unet" not in components:
            raise InvalidValueError("a recipe applies to the UNet; add 'unet' to the components or use nbits")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise InvalidValueError(f"min_numel must be an integer >= 0, got {self.min_numel!r}")
        if self.piece_bytes is not None and (not isinstance(self.piece_bytes, int) or self.piece_bytes < 1):
            raise InvalidValueError(f"piece_bytes must be a positive integer or None, got {self.piece_bytes!r}")
        if self.chunk_unet and "unet" not in components:
            raise InvalidValueError("chunk_unet chunks the UNet; add 'unet' to the components")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise InvalidValueError(f"batch_size must be an integer >= 1 or None, got {self.batch_size!r}")

    @property
    def recipe_label(self) -> str:
        """What the packages record as their recipe: `uniform_<n>bit`, the recipe's name, or "" for float16."""
        if self.nbits is not None:
            return f"uniform_{self.nbits}bit"
        return getattr(self.recipe, "name", "custom recipe" if self.recipe is not None else "")

    def to_dict(self) -> dict:
        """JSON-ready: the recipe as `{"name", "bits"}` (palette configs by their key)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(components=list(self.components), layers=list(self.layers), exclude=list(self.exclude))
        if self.recipe is not None:
            bits = getattr(self.recipe, "bits", self.recipe)
            bits = {layer: spec.key if isinstance(spec, PaletteConfig) else spec for layer, spec in bits.items()}
            d["recipe"] = {"name": self.recipe_label, "bits": bits}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ExportConfig:
        """The inverse of `to_dict` (the recipe comes back as a `Recipe`); unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            valid = ", ".join(f.name for f in fields(cls))
            raise InvalidValueError(f"unknown export settings {sorted(unknown)}; valid: {valid}")
        d = dict(d)
        if d.get("recipe") is not None:
            d["recipe"] = Recipe(d["recipe"]["name"], d["recipe"]["bits"])
        return cls(**d)
