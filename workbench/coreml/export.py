"""Export pipeline components to Core ML packages, palettized by exact weight name, and verify them.

Per component (`export_component`): trace + convert to a float16 ML Program in a package layout
(`convert_component`; `workbench.coreml.layout`: Apple's by default), save it once unpalettized to measure its size,
palettize the planned weights by name (`compress_model`), write the metadata, save `<out>/Unet.mlpackage` (Apple's
layout; `<out>/<component>.mlpackage` in ours), and read it back to compare every weight with the simulation
(`workbench.coreml.verify.verify_package`). `export_pipeline(pipe, out, ExportConfig(...))` plans every component
first (`workbench.coreml.plan.plan_export`: the recipe is checked against the torch modules, and the memory need
against the machine's, before any slow conversion), then exports them in turn and writes `<out>/verification.json`
(`ExportReport`, with the settings).

Example:
    >>> report = export_pipeline(pipe, "out/", ExportConfig(nbits=6, components=("unet", "text_encoder")))
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.coreml.components import layer_weight_names
from workbench.coreml.config import ExportConfig
from workbench.coreml.explicit_lut import op_config
from workbench.coreml.layout import (
    DEFAULT_LAYOUT,
    host_dtype,
    layout_inputs,
    layout_wrapper,
    package_name,
    write_swift_files,
)
from workbench.coreml.memory import check_export_memory
from workbench.coreml.metadata import set_package_metadata
from workbench.coreml.plan import ComponentPlan, plan_export
from workbench.coreml.results import ExportedPackage, ExportReport
from workbench.coreml.verify import package_nbytes, program_weight_names, verify_package
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers
from workbench.models.loader import DEMO_MODEL, load_pipeline
from workbench.palettes.config import FLOAT_BITS, PaletteConfig
from workbench.palettes.importance import Importance
from workbench.palettes.size import bits_per_param
from workbench.recipes.recipe import load_recipe
from workbench.threads import sklearn_single_thread


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
    identical weights) must share a config. With `module`, every palette is fitted from its weights (data-aware
    ones with `importance`, a `workbench.palettes.importance.Importance`) and stored as fitted
    (`workbench.coreml.explicit_lut.op_config`); without it, Core ML fits k-means and uniform palettes itself.

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


def _compress_and_save(
    plan: ComponentPlan, conversion: Conversion, out: Path, *, min_numel: int, source: str, recipe_name: str
) -> Compression:
    """Palettize the planned weights by name, write the metadata and save `<out>/<package_name(component, layout)>`."""

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
    pipe, plan: ComponentPlan, out: Path, config: ExportConfig, *, source: str = ""
) -> ExportedPackage:
    """Convert, palettize, save and (if `config.verify`) verify one planned component; see `export_pipeline`."""
    conversion = _convert(pipe, plan, out, config.batch_size)
    compression = _compress_and_save(
        plan, conversion, out, min_numel=config.min_numel, source=source, recipe_name=config.recipe_label
    )
    start = time.perf_counter()
    verification = None
    if config.verify:
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


@torch.no_grad()
def export_pipeline(
    pipe,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    source: str = "",
    importance=None,
) -> ExportReport:
    """Export pipeline components to Core ML packages, palettized by a recipe or a uniform width, and verify them.

    For each component: trace + convert to float16 (iOS17, or iOS18 when the plan has grouped or 3-bit palettes),
    save once unpalettized to measure its size, palettize the planned weights by name (`compress_model`), write
    metadata, save the package (`Unet.mlpackage`, ... in Apple's layout; `<component>.mlpackage` in ours), read it
    back and compare every weight (`verify_package`). Writes `<out_dir>/verification.json` (with the settings); in
    Apple's layout also the tokenizer's `vocab.json` and `merges.txt` and `compile_for_swift.sh` (macOS: compiles
    the packages into the resources folder Apple's Swift pipeline loads). Everything is planned and checked
    (`plan_export`, `check_export_memory`) before `out_dir` is created.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline (CPU, float32).
        out_dir (`str | os.PathLike`): where packages and `verification.json` go (created).
        config (`ExportConfig`, *optional*): recipe or width, components, layout...; None: `ExportConfig()`, the
            UNet in float16.
        source (`str`): the source model's name, written into the metadata.
        importance (`workbench.palettes.importance.Importance`, *optional*): the analysis' importances, needed by a
            recipe with data-aware palettes (`"wkmeans4"`...), which are re-fitted with them exactly as the analysis
            did.

    Returns:
        `ExportReport`.

    Example:
        >>> recipe = load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette")
        >>> report = export_pipeline(pipe, "out/", ExportConfig(recipe=recipe))
        >>> print(report.summary())  # sizes, bits/param, bit-exact per package
    """
    config = ExportConfig() if config is None else config
    plans = plan_export(pipe, config, importance)
    check_export_memory(plans)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packages = tuple(export_component(pipe, plan, out, config, source=source) for plan in plans)
    if config.layout == "apple":
        write_swift_files(pipe, out, [p.component for p in packages])
    report = ExportReport(
        out_dir=str(out), source=source, recipe_name=config.recipe_label, packages=packages, settings=config.to_dict()
    )
    report.save()
    return report


def export_model(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    recipe_file: str | os.PathLike | None = None,
    recipe_name: str | None = None,
    importance_file: str | os.PathLike | None = None,
) -> ExportReport:
    """`workbench export`: load a pipeline (CPU, float32), export and verify it (see `export_pipeline`).

    The recipe file and the importances are read, and `config` checked, before the pipeline loads.

    Args:
        model: hub id or pipeline folder; None for the demo model (`workbench.models.loader.DEMO_MODEL`).
        out_dir, config: see `export_pipeline`; the recipe comes from `recipe_file`, not `config.recipe`.
        recipe_file / recipe_name: a recipe JSON (ours or the reference's pre-analysis) and the recipe in it
            (optional when the file holds one).
        importance_file: the analysis' `importance.npz`, for recipes with data-aware palettes.
    """

    config = ExportConfig() if config is None else config
    if recipe_name is not None and recipe_file is None:
        raise InvalidValueError("--recipe-name needs --recipe FILE")
    if recipe_file is not None and (config.nbits is not None or config.recipe is not None):
        raise InvalidValueError("pass a recipe or nbits, not both")
    if recipe_file is not None:
        config = replace(config, recipe=load_recipe(recipe_file, recipe_name))
    importance = None
    if importance_file is not None:
        importance = Importance.load(importance_file)  # a missing file fails before the pipeline loads
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    source = str(model) if model is not None else str(DEMO_MODEL)
    return export_pipeline(pipe, out_dir, config, source=source, importance=importance)
