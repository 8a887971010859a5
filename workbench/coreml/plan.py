"""What an export will palettize, decided and checked against the torch modules before any (slow) conversion.

`palette_plan`: one component's layer -> `PaletteConfig` (a recipe, or a uniform width); `plan_export`: a
`ComponentPlan` per component of an `ExportConfig`. A recipe naming layers the model lacks fails here, naming the
closest real layers (`RecipeError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from workbench.coreml.components import WRAPPERS, component_module, weight_layers
from workbench.coreml.config import DEFAULT_MIN_NUMEL, ExportConfig, RecipeLike
from workbench.coreml.explicit_lut import check_importance
from workbench.coreml.layout import DEFAULT_LAYOUT
from workbench.models.layers import closest_names, compressible_layers, get_layer, select_layers
from workbench.palettes.config import PaletteConfig, as_config
from workbench.recipes.recipe import Recipe, RecipeError


def check_recipe_layers(recipe: RecipeLike, module: nn.Module) -> None:
    """Every layer the recipe names must be a layer of `module` with a weight.

    Raises:
        RecipeError: naming the unknown layers (the first three) with the closest real names, in one line.
    """
    if recipe is None:
        return
    known = list(weight_layers(module))
    if isinstance(recipe, Recipe):
        recipe.validate(known)
        return
    unknown = [name for name in recipe if name not in set(known)]
    if unknown:
        hints = "; ".join(f"{u!r} (closest: {', '.join(closest_names(u, known, 3)) or 'none'})" for u in unknown[:3])
        raise RecipeError(f"the recipe names {len(unknown)} layers not in {type(module).__name__}: {hints}")


def palette_plan(
    module: nn.Module,
    recipe: RecipeLike = None,
    *,
    nbits: int | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> dict[str, PaletteConfig]:
    """Layer name -> `PaletteConfig` for the layers to palettize; layers left out stay float16.

    Args:
        module (`nn.Module`): the component's torch module (e.g. `pipe.unet`).
        recipe (`Recipe` or `Mapping[str, int | PaletteConfig]`, *optional*): bit widths by layer (16 = float).
        nbits (`int`, *optional*): instead of a recipe, this width for every Linear/Conv2d layer with more than
            `min_numel` weights (the reference's `--quantize-nbits`).
        min_numel (`int`, defaults to 2048): see `nbits`.

    Returns:
        `dict[str, PaletteConfig]`.

    Raises:
        ValueError: both a recipe and nbits. RecipeError (a `UserError` and `ValueError`): a recipe naming layers
            the module lacks (see `check_recipe_layers`).
    """
    if recipe is not None and nbits is not None:
        raise ValueError("pass a recipe or nbits, not both")
    if nbits is not None:
        config = as_config(int(nbits))
        layers = compressible_layers(module, min_numel=min_numel)
        return {} if config is None else dict.fromkeys(layers, config)
    if recipe is None:
        return {}
    check_recipe_layers(recipe, module)
    plan = {name: as_config(spec) for name, spec in getattr(recipe, "bits", recipe).items()}
    return {name: cfg for name, cfg in plan.items() if cfg is not None}


@dataclass(frozen=True)
class ComponentPlan:
    """One component's export, decided and checked against its torch module before any (slow) conversion.

    Attributes:
        component: from `COMPONENTS`; module: its torch module; prefix: the export wrapper's attribute for it
            (Core ML weight names start with it).
        palette: torch layer -> `PaletteConfig` for the layers to palettize (`palette_plan`).
        uniform: the palette is a uniform width over every candidate layer (`nbits`): it is narrowed to the
            weights the package has (a VAE decoder package holds no VAE encoder). A recipe is not narrowed.
        deployment_target: `"iOS18"` when a palette is grouped or 3-bit, else `"iOS17"`.
        layout: `"apple"` or `"workbench"` (`workbench.coreml.layout`): inputs, outputs and the package's name.
        importance: `workbench.palettes.importance.Importance` for the data-aware palettes (None when there are none).
        given: `workbench.palettes.given.GivenPalettes` stored as given (learned LUTs), or None.
    """

    component: str
    module: nn.Module
    prefix: str
    palette: Mapping[str, PaletteConfig]
    uniform: bool
    deployment_target: str
    layout: str = DEFAULT_LAYOUT
    importance: object = None
    given: object = None


def plan_export(pipe, config: ExportConfig, importance=None, given=None) -> list[ComponentPlan]:
    """One `ComponentPlan` per component of `config`; a recipe naming unknown layers, a layer pattern matching
    none, a missing component or missing importances fail here, before any conversion (the rest of `config` was
    checked when it was made). `config.layers` / `config.exclude` (globs, `workbench.models.layers.select_layers`)
    narrow the UNet's palettized layers; the others stay float16. `importance`
    (`workbench.palettes.importance.Importance`) is needed by data-aware palettes. `given`
    (`workbench.palettes.given.GivenPalettes`, UNet layers) must be planned with their own configs, and are stored
    as given."""
    plans = []
    for component in config.components:
        module = component_module(pipe, component)
        recipe = config.recipe if component == "unet" else None
        palette = palette_plan(module, recipe, nbits=config.nbits, min_numel=config.min_numel)
        if component == "unet" and (config.layers or config.exclude):
            chosen = select_layers(dict.fromkeys(palette), config.layers, config.exclude)
            palette = {name: palette[name] for name in chosen}
        target = "iOS18" if any(cfg.needs_ios18 for cfg in palette.values()) else "iOS17"
        own = given if component == "unet" else None
        if own is not None:
            own.check_plan(palette)
            for name, cfg in palette.items():
                if name in own:
                    own.palette(name, tuple(get_layer(module, name).weight.shape), cfg)
        needed = check_importance(module, palette, importance, own)
        prefix, uniform = WRAPPERS[component].prefix, config.nbits is not None
        plan = ComponentPlan(component, module, prefix, palette, uniform, target, config.layout, needed, own)
        plans.append(plan)
    return plans
