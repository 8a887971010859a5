"""Export pipeline components to Core ML packages, palettized by exact weight name, and verify them.

Per component (`export_component`): trace + convert to a float16 ML Program in a package layout
(`convert_component`; `workbench.coreml.layout`: Apple's by default), save it once unpalettized to measure its size,
palettize the planned weights by name (`compress_model`), write the metadata, save `<out>/Unet.mlpackage` (Apple's
layout; `<out>/<component>.mlpackage` in ours), and read it back to compare every weight with the simulation
(`workbench.coreml.verify.verify_package`). `export_pipeline` plans every component first (`plan_export`: the
recipe is checked against the torch modules before any slow conversion), then exports them in turn and writes
`<out>/verification.json` (`ExportReport`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

from workbench.coreml.components import (
    COMPONENTS,
    WRAPPERS,
    check_component,
    component_module,
    layer_weight_names,
    weight_layers,
)
from workbench.coreml.explicit_lut import check_importance, op_config
from workbench.coreml.layout import (
    DEFAULT_LAYOUT,
    host_dtype,
    layout_inputs,
    layout_wrapper,
    package_name,
    write_swift_files,
)
from workbench.coreml.results import ExportedPackage, ExportReport
from workbench.coreml.verify import package_nbytes, program_weight_names, verify_package
from workbench.errors import UserError
from workbench.palettes.config import FLOAT_BITS, PaletteConfig
from workbench.threads import sklearn_single_thread

if TYPE_CHECKING:
    from workbench.recipes.recipe import Recipe

DEFAULT_MIN_NUMEL = 2048  # coremltools' own weight_threshold
RecipeLike = Union["Recipe", Mapping[str, "int | PaletteConfig | None"], None]


@torch.no_grad()
def convert_component(
    pipe,
    component: str,
    *,
    batch_size: int | None = None,
    deployment_target: str = "iOS17",
    layout: str = DEFAULT_LAYOUT,
):
    """Trace one pipeline component and convert it to a float16 Core ML ML Program.

    `torch.jit.trace` of the layout's wrapper, then `ct.convert(convert_to="mlprogram", compute_precision=FLOAT16)`.
    Inputs and outputs are named (see `workbench.coreml.layout`) and float32 on the host side (int32 `input_ids` in
    the workbench layout). The module is traced in float32 on the CPU where it sits; nothing is copied.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline on the CPU.
        component (`str`): `"unet"`, `"text_encoder"`, `"text_encoder_2"` or `"vae_decoder"`.
        batch_size (`int`, *optional*): see `example_inputs`.
        deployment_target (`str`, defaults to `"iOS17"`): a `coremltools.target` name; `"iOS18"` for grouped or
            3-bit palettes.
        layout (`str`, defaults to `"apple"`): `"apple"` (the contract Apple's Swift pipeline loads) or
            `"workbench"` (`workbench.coreml.layout`).

    Returns:
        `coremltools.models.MLModel`.
    """
    import warnings

    import coremltools as ct

    wrapper = layout_wrapper(pipe, component, layout)
    inputs = layout_inputs(pipe, component, layout, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools: "torch 2.13 has not been tested"; trace warnings
        traced = torch.jit.trace(wrapper, tuple(inputs.values()), check_trace=False)
        return ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=name, shape=x.shape, dtype=getattr(np, host_dtype(layout, x)))
                for name, x in inputs.items()
            ],
            outputs=[ct.TensorType(name=name, dtype=np.float32) for name in wrapper.output_names],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, deployment_target),
        )


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
        ValueError: both a recipe and nbits, or a recipe naming layers the module lacks (all listed).
    """
    from workbench.models.layers import compressible_layers
    from workbench.palettes.config import as_config

    if recipe is not None and nbits is not None:
        raise ValueError("pass a recipe or nbits, not both")
    if nbits is not None:
        config = as_config(int(nbits))
        layers = compressible_layers(module, min_numel=min_numel)
        return {} if config is None else dict.fromkeys(layers, config)
    if recipe is None:
        return {}
    bits = getattr(recipe, "bits", recipe)
    with_weight = weight_layers(module)
    missing = [name for name in bits if name not in with_weight]
    if missing:
        raise ValueError(
            f"the recipe names {len(missing)} layers that {type(module).__name__} lacks: {', '.join(missing)}"
        )
    plan = {name: as_config(spec) for name, spec in bits.items()}
    return {name: cfg for name, cfg in plan.items() if cfg is not None}


def compress_model(
    model,
    plan: Mapping[str, PaletteConfig],
    *,
    prefix: str | None = None,
    names: Mapping[str, str] | None = None,
    module: nn.Module | None = None,
    importance=None,
):
    """Palettize the weights of a converted model named by `plan`, one `OpPalettizerConfig` per weight.

    Torch layer `L` is the Core ML constant `names[L]`: by default (a package we converted, whose wrapper holds the
    module under `prefix`) `coreml_weight_name(prefix + "." + L)`; for a package converted elsewhere, the mapping
    `workbench.coreml.apply.match_weights` found by content. Every planned weight must exist (else a `ValueError`
    lists the missing ones), and no other weight is touched. Layers sharing one constant (a converter merged
    identical weights) must share a config. Data-aware palettes (`"wkmeans"`) are fitted from `module`'s weights
    with `importance` (`workbench.palettes.importance.Importance`) and stored as fitted
    (`workbench.coreml.explicit_lut`);
    Core ML fits the others.

    Returns:
        `coremltools.models.MLModel` (a new one; `model` is unchanged).
    """
    import warnings

    import coremltools as ct

    if not plan:
        return model
    names = layer_weight_names(plan, prefix) if names is None else names
    available = program_weight_names(model)
    missing = [layer for layer in plan if names[layer] not in available]
    if missing:
        raise ValueError(f"the package has no weight for {len(missing)} recipe layers: {', '.join(missing)}")
    by_weight: dict[str, tuple[str, PaletteConfig]] = {}
    for layer, cfg in plan.items():
        if by_weight.setdefault(names[layer], (layer, cfg))[1] != cfg:
            raise ValueError(f"layers sharing weight {names[layer]!r} have different palettes ({cfg.key} for {layer})")
    config = ct.optimize.coreml.OptimizationConfig(
        op_name_configs={
            weight: op_config(layer, cfg, module, importance) for weight, (layer, cfg) in by_weight.items()
        }
    )
    with warnings.catch_warnings(), sklearn_single_thread():  # as `fit_palette` runs it: the same LUTs
        warnings.simplefilter("ignore")
        return ct.optimize.coreml.palettize_weights(model, config)


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
    """

    component: str
    module: nn.Module
    prefix: str
    palette: Mapping[str, PaletteConfig]
    uniform: bool
    deployment_target: str
    layout: str = DEFAULT_LAYOUT
    importance: object = None


def plan_export(
    pipe,
    components: Iterable[str],
    *,
    recipe: RecipeLike,
    nbits: int | None,
    min_numel: int,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    layout: str = DEFAULT_LAYOUT,
    importance=None,
) -> list[ComponentPlan]:
    """One `ComponentPlan` per component; a bad component, recipe, width, layer pattern, layout or missing
    importance fails here, before any conversion. `layers` / `exclude` (globs, `workbench.models.layers.select_layers`)
    narrow the UNet's palettized layers; the others stay float16. `importance`
    (`workbench.palettes.importance.Importance`)
    is needed by data-aware palettes."""
    from workbench.coreml.layout import check_layout
    from workbench.models.layers import select_layers

    check_layout(layout)
    components = [check_component(c) for c in components]
    if not components:
        raise ValueError(f"no components to export; valid: {', '.join(COMPONENTS)}")
    if recipe is not None and "unet" not in components:
        raise ValueError("a recipe applies to the UNet; add 'unet' to the components or use nbits")
    plans = []
    for component in components:
        module = component_module(pipe, component)
        palette = palette_plan(module, recipe if component == "unet" else None, nbits=nbits, min_numel=min_numel)
        if component == "unet" and (layers or exclude):
            palette = {name: palette[name] for name in select_layers(dict.fromkeys(palette), layers, exclude)}
        target = "iOS18" if any(cfg.needs_ios18 for cfg in palette.values()) else "iOS17"
        prefix = WRAPPERS[component].prefix
        needed = check_importance(module, palette, importance)
        plans.append(ComponentPlan(component, module, prefix, palette, nbits is not None, target, layout, needed))
    return plans


# Peak memory of converting, palettizing, saving and verifying one component, beyond the loaded pipeline, per
# byte of the component's float32 weights: SD-1.5's UNet (3.44 GB) peaked at 12.4 GB RSS, 8.9 GB over the
# loaded pipeline (`workbench export` of a full-size build, 2 cores, 9 min 18 s).
EXPORT_MEMORY_PER_WEIGHT_BYTE = 2.6


class ExportMemoryError(UserError, MemoryError):
    """Exporting would need more memory than this machine has free; the message names the need and the way out."""


def export_memory_need(plans: Sequence[ComponentPlan]) -> int:
    """Bytes of memory the export of `plans` needs beyond the loaded pipeline (its largest component's)."""
    weights = max(sum(p.numel() * 4 for p in plan.module.parameters()) for plan in plans)
    return int(EXPORT_MEMORY_PER_WEIGHT_BYTE * weights)


def check_export_memory(plans: Sequence[ComponentPlan], available: int | None = None) -> None:
    """Fail early, with the measured need and the way out, where the export would run out of memory.

    Raises:
        ExportMemoryError: `export_memory_need(plans)` exceeds the memory available (`psutil`), or `available`.
    """
    import psutil

    need = export_memory_need(plans)
    if available is None:
        # weights loaded by mmap (safetensors) are not resident yet but will be: they count against what is free
        weights = sum(p.numel() * p.element_size() for plan in plans for p in plan.module.parameters())
        unread = max(0, weights - psutil.Process().memory_info().rss)
        available = psutil.virtual_memory().available - unread
    if need > available:
        largest = max(plans, key=lambda plan: sum(p.numel() for p in plan.module.parameters()))
        raise ExportMemoryError(
            f"exporting the {largest.component} needs about {need / 1e9:.1f} GB of free memory beyond the loaded "
            f"model ({EXPORT_MEMORY_PER_WEIGHT_BYTE:g} bytes per byte of its float32 weights, measured on SD-1.5); "
            f"this machine has {available / 1e9:.1f} GB free. Run the export on a machine with more memory (the "
            "recipe file carries over), or close what else is using memory."
        )


@dataclass(frozen=True)
class Conversion:
    """A component converted to float16 Core ML, not yet palettized: the model, its saved size, the time taken."""

    model: object  # coremltools.models.MLModel
    float16_nbytes: int
    seconds: float


@dataclass(frozen=True)
class Compression:
    """A palettized package saved to disk.

    Attributes:
        path: `<out>/<package_name(component, layout)>`; palette: the layers palettized (the plan, narrowed if
            uniform); bits_per_param: over the candidate layers the package holds; seconds: palettize + save time.
    """

    path: Path
    palette: Mapping[str, PaletteConfig]
    bits_per_param: float
    seconds: float


def _convert(pipe, plan: ComponentPlan, out: Path, batch_size: int | None) -> Conversion:
    """Trace + convert (timed), then save once unpalettized to a scratch folder to measure the float16 size."""
    start = time.perf_counter()
    model = convert_component(
        pipe, plan.component, batch_size=batch_size, deployment_target=plan.deployment_target, layout=plan.layout
    )
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=out, prefix=".float16-") as tmp:
        model.save(str(Path(tmp) / "float16.mlpackage"))
        nbytes = package_nbytes(Path(tmp) / "float16.mlpackage")
    return Conversion(model, nbytes, seconds)


def set_package_metadata(
    model, *, component: str, source: str, recipe_name: str, bits_per_param: float, n: int
) -> None:
    """Describe a palettized model: short description, author, and `user_defined_metadata` (source model,
    component, recipe, bits/param, number of palettized layers)."""
    from workbench import __version__

    model.short_description = (
        f"{component} of {source or 'a diffusers pipeline'}, palettized by workbench "
        f"({recipe_name or 'float16'}, {bits_per_param:.2f} bits/param)"
    )
    model.author = f"workbench {__version__}"
    model.user_defined_metadata.update(
        {
            "source_model": source,
            "component": component,
            "recipe": recipe_name,
            "bits_per_param": f"{bits_per_param:.4f}",
            "palettized_layers": str(n),
        }
    )


def _compress_and_save(
    plan: ComponentPlan, conversion: Conversion, out: Path, *, min_numel: int, source: str, recipe_name: str
) -> Compression:
    """Palettize the planned weights by name, write the metadata and save `<out>/<package_name(component, layout)>`."""
    from workbench.models.layers import compressible_layers
    from workbench.palettes.size import bits_per_param

    start = time.perf_counter()
    in_package = program_weight_names(conversion.model)
    candidates = compressible_layers(plan.module, min_numel=min_numel)
    names = layer_weight_names(candidates, plan.prefix)
    numels = {name: layer.weight.numel() for name, layer in candidates.items() if names[name] in in_package}
    palette = {n: cfg for n, cfg in plan.palette.items() if n in numels} if plan.uniform else dict(plan.palette)
    compressed = compress_model(
        conversion.model, palette, prefix=plan.prefix, module=plan.module, importance=plan.importance
    )
    bpp = bits_per_param(palette, numels) if numels else float(FLOAT_BITS)
    set_package_metadata(
        compressed,
        component=plan.component,
        source=source,
        recipe_name=recipe_name,
        bits_per_param=bpp,
        n=len(palette),
    )
    path = out / package_name(plan.component, plan.layout)
    if path.exists():
        shutil.rmtree(path)
    compressed.save(str(path))
    return Compression(path, palette, bpp, time.perf_counter() - start)


def export_component(
    pipe,
    plan: ComponentPlan,
    out: Path,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    batch_size: int | None = None,
    source: str = "",
    recipe_name: str = "",
    verify: bool = True,
) -> ExportedPackage:
    """Convert, palettize, save and (optionally) verify one planned component; see `export_pipeline`."""
    conversion = _convert(pipe, plan, out, batch_size)
    compression = _compress_and_save(
        plan, conversion, out, min_numel=min_numel, source=source, recipe_name=recipe_name
    )
    start = time.perf_counter()
    verification = None
    if verify:
        verification = verify_package(
            compression.path,
            plan.module,
            compression.palette,
            component=plan.component,
            prefix=plan.prefix,
            importance=plan.importance,
        )
    return ExportedPackage(
        component=plan.component,
        path=str(compression.path),
        nbytes=package_nbytes(compression.path),
        float16_nbytes=conversion.float16_nbytes,
        bits_per_param=compression.bits_per_param,
        n_palettized=len(compression.palette),
        deployment_target=plan.deployment_target,
        export_s=conversion.seconds,
        compress_s=compression.seconds,
        verify_s=time.perf_counter() - start,
        verification=verification,
    )


def _recipe_label(recipe: RecipeLike, nbits: int | None) -> str:
    """What the packages record as their recipe: `uniform_<n>bit`, the recipe's name, or "" for float16."""
    if nbits is not None:
        return f"uniform_{nbits}bit"
    return getattr(recipe, "name", "custom recipe" if recipe is not None else "")


@torch.no_grad()
def export_pipeline(
    pipe,
    out_dir: str | os.PathLike,
    *,
    recipe: RecipeLike = None,
    nbits: int | None = None,
    components: Iterable[str] = ("unet",),
    min_numel: int = DEFAULT_MIN_NUMEL,
    batch_size: int | None = None,
    source: str = "",
    verify: bool = True,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    layout: str = DEFAULT_LAYOUT,
    importance=None,
) -> ExportReport:
    """Export pipeline components to Core ML packages, palettized by a recipe or a uniform width, and verify them.

    For each component: trace + convert to float16 (iOS17, or iOS18 when the plan has grouped or 3-bit palettes),
    save once unpalettized to measure its size, palettize the planned weights by name (`compress_model`), write
    metadata, save the package (`Unet.mlpackage`, ... in Apple's layout; `<component>.mlpackage` in ours), read it
    back and compare every weight (`verify_package`). Writes `<out_dir>/verification.json`; in Apple's layout also
    the tokenizer's `vocab.json` and `merges.txt` and `compile_for_swift.sh` (macOS: compiles the packages into the
    resources folder Apple's Swift pipeline loads).

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline (CPU, float32).
        out_dir (`str | os.PathLike`): where packages and `verification.json` go (created).
        recipe (`Recipe` or mapping, *optional*): UNet layer -> bits or `PaletteConfig`; applies to the UNet only.
        nbits (`int`, *optional*): uniform width for every layer over `min_numel` weights of every component.
        components (`Iterable[str]`, defaults to `("unet",)`): from `COMPONENTS`.
        min_numel (`int`, defaults to 2048): candidate threshold for `nbits` and for bits/param (strict `>`).
        batch_size (`int`, *optional*): see `example_inputs`.
        source (`str`): the source model's name, written into the metadata.
        verify (`bool`, defaults to True): read the packages back and compare.
        layers, exclude (`Sequence[str]`, defaults to ()): globs narrowing the UNet's palettized layers
            (`plan_export`).
        layout (`str`, defaults to `"apple"`): the packages' inputs, outputs and names (`workbench.coreml.layout`).
        importance (`workbench.palettes.importance.Importance`, *optional*): the analysis' importances, needed by a
        recipe
            with data-aware palettes (`"wkmeans4"`...), which are re-fitted with them exactly as the analysis did.

    Returns:
        `ExportReport`.

    Example:
        >>> report = export_pipeline(pipe, "out/", recipe=load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette"))
        >>> print(report.summary())  # sizes, bits/param, bit-exact per package
    """
    plans = plan_export(
        pipe,
        components,
        recipe=recipe,
        nbits=nbits,
        min_numel=min_numel,
        layers=layers,
        exclude=exclude,
        layout=layout,
        importance=importance,
    )
    check_export_memory(plans)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = _recipe_label(recipe, nbits)
    options = {"min_numel": min_numel, "batch_size": batch_size, "source": source, "recipe_name": label}
    packages = tuple(export_component(pipe, plan, out, verify=verify, **options) for plan in plans)
    if layout == "apple":
        write_swift_files(pipe, out, [p.component for p in packages])
    report = ExportReport(out_dir=str(out), source=source, recipe_name=label, packages=packages)
    report.save()
    return report


def export_model(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    recipe_file: str | os.PathLike | None = None,
    recipe_name: str | None = None,
    nbits: int | None = None,
    components: Iterable[str] = ("unet",),
    min_numel: int = DEFAULT_MIN_NUMEL,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    layout: str = DEFAULT_LAYOUT,
    importance_file: str | os.PathLike | None = None,
) -> ExportReport:
    """`workbench export`: load a pipeline (CPU, float32), export and verify it (see `export_pipeline`).

    Args:
        model: hub id or pipeline folder; None for the demo model (`workbench.models.loader.DEMO_MODEL`).
        recipe_file / recipe_name: a recipe JSON (ours or the reference's pre-analysis) and the recipe in it
            (optional when the file holds one).
        importance_file: the analysis' `importance.npz`, for recipes with data-aware palettes.
        nbits, components, min_numel, layers, exclude, layout: see `export_pipeline`.
    """
    from workbench.coreml.layout import check_layout
    from workbench.models.loader import DEMO_MODEL, load_pipeline
    from workbench.recipes.recipe import load_recipe

    if recipe_name is not None and recipe_file is None:
        raise ValueError("--recipe-name needs --recipe FILE")
    if recipe_file is not None and nbits is not None:
        raise ValueError("pass a recipe or nbits, not both")
    if nbits is not None:
        from workbench.palettes.config import as_config

        as_config(int(nbits))  # an unsupported width fails before the pipeline loads
    recipe = load_recipe(recipe_file, recipe_name) if recipe_file is not None else None
    importance = None
    if importance_file is not None:
        from workbench.palettes.importance import Importance

        importance = Importance.load(importance_file)  # a missing file fails before the pipeline loads
    components = [check_component(c) for c in components]  # fail before the pipeline loads
    check_layout(layout)
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    source = str(model) if model is not None else str(DEMO_MODEL)
    options = {
        "components": components,
        "min_numel": min_numel,
        "source": source,
        "layers": layers,
        "exclude": exclude,
        "layout": layout,
        "importance": importance,
    }
    return export_pipeline(pipe, out_dir, recipe=recipe, nbits=nbits, **options)
