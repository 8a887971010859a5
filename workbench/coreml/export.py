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

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from workbench.coreml.chunks import UNITS_KEY
from workbench.coreml.components import layer_weight_names
from workbench.coreml.compress import compress_model
from workbench.coreml.config import ExportConfig
from workbench.coreml.layout import (
    DEFAULT_LAYOUT,
    host_dtype,
    layout_inputs,
    layout_wrapper,
    package_stems,
    write_swift_files,
)
from workbench.coreml.memory import check_export_memory
from workbench.coreml.metadata import set_package_metadata
from workbench.coreml.plan import ComponentPlan, plan_export
from workbench.coreml.results import ExportedPackage, ExportReport
from workbench.coreml.unet_export import DEFAULT_PIECE_BYTES, export_unet_pieces, float32_modules
from workbench.coreml.verify import package_nbytes, program_weight_names, verify_package
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers, get_layer
from workbench.models.loader import DEMO_MODEL, load_pipeline
from workbench.palettes.config import FLOAT_BITS, PaletteConfig
from workbench.palettes.given import GivenPalettes
from workbench.palettes.importance import Importance
from workbench.palettes.size import bits_per_param, layer_nbytes
from workbench.recipes.recipe import Recipe, load_recipe


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


@dataclass(frozen=True)
class Converted:
    """One package converted and palettized, not yet saved.

    Attributes:
        stem: the package's name without `.mlpackage` (`Unet`, `UnetChunk1`, `TextEncoder`...); model: the
            `MLModel`; palette: the layers it holds palettized, and how; float16_nbytes: its size unpalettized;
        seconds: trace + convert (+ palettize, for the UNet's pieces) time; units: see `UNITS_KEY`.
    """

    stem: str
    model: object
    palette: Mapping[str, PaletteConfig]
    float16_nbytes: int | None  # None: computed from the saved package (`float16_equivalent_nbytes`)
    seconds: float
    units: tuple[int, int] | None = None  # a UNet package: the units it holds (`workbench.coreml.chunks`)


def _convert_whole(pipe, plan: ComponentPlan, out: Path, batch_size: int | None) -> Converted:
    """A text encoder or the VAE decoder in one conversion (cast to float32 while converting), measured once
    unpalettized, then palettized (a uniform width narrowed to the weights the package holds)."""
    start = time.perf_counter()
    with float32_modules(plan.module, [""]):
        model = convert_component(
            pipe, plan.component, batch_size=batch_size, deployment_target=plan.deployment_target, layout=plan.layout
        )
    with tempfile.TemporaryDirectory(dir=out, prefix=".float16-") as tmp:
        model.save(str(Path(tmp) / "float16.mlpackage"))
        nbytes = package_nbytes(Path(tmp) / "float16.mlpackage")
    held = program_weight_names(model)
    names = layer_weight_names(plan.palette, plan.prefix)
    palette = {n: cfg for n, cfg in plan.palette.items() if names[n] in held} if plan.uniform else dict(plan.palette)
    compressed = compress_model(
        model, palette, prefix=plan.prefix, module=plan.module, importance=plan.importance, given=plan.given
    )
    return Converted(
        package_stems(plan.component, plan.layout)[0], compressed, palette, nbytes, time.perf_counter() - start
    )


def _convert_unet(pipe, plan: ComponentPlan, config: ExportConfig) -> list[Converted]:
    """The UNet a piece at a time (`workbench.coreml.unet_export`), into one package or two chunks."""
    start = time.perf_counter()
    stitched = export_unet_pieces(
        pipe, plan, batch_size=config.batch_size, chunk=config.chunk_unet, piece_bytes=config.piece_bytes
    )
    covered = {layer for package in stitched for layer in package.palette}
    if not plan.uniform and covered != set(plan.palette):
        missing = sorted(set(plan.palette) - covered)
        raise ValueError(f"the converted UNet has no weight for {len(missing)} recipe layers: {', '.join(missing)}")
    seconds = (time.perf_counter() - start) / len(stitched)
    return [Converted(p.name, p.model, p.palette, None, seconds, p.units) for p in stitched]


def float16_equivalent_nbytes(nbytes: int, palette: Mapping[str, PaletteConfig], module) -> int:
    """The size of a saved package of `nbytes` with its palettized weights stored float16 instead: each palettized
    layer's packed indices and LUTs (`layer_nbytes`) give way to 2 bytes per weight (a UNet stitched from pieces is
    never saved unpalettized, so its float16 size is this, not a second save)."""
    for layer, cfg in palette.items():
        weight = get_layer(module, layer).weight
        nbytes += 2 * weight.numel() - layer_nbytes(weight.numel(), weight.shape[0], cfg)
    return nbytes


def _save(plan: ComponentPlan, converted: Converted, out: Path, config: ExportConfig, source: str):
    """Write the metadata and save `<out>/<stem>.mlpackage`: (path, bits/param over the candidates it holds)."""
    in_package = program_weight_names(converted.model)
    candidates = compressible_layers(plan.module, min_numel=config.min_numel)
    names = layer_weight_names(candidates, plan.prefix)
    numels = {name: layer.weight.numel() for name, layer in candidates.items() if names[name] in in_package}
    palette = {n: cfg for n, cfg in converted.palette.items() if n in numels}
    bpp = bits_per_param(palette, numels) if numels else float(FLOAT_BITS)
    set_package_metadata(
        converted.model,
        component=plan.component,
        source=source,
        recipe_name=config.recipe_label,
        bits_per_param=bpp,
        n=len(converted.palette),
    )
    if converted.units is not None:
        converted.model.user_defined_metadata[UNITS_KEY] = "-".join(map(str, converted.units))
    path = out / f"{converted.stem}.mlpackage"
    if path.exists():
        shutil.rmtree(path)
    converted.model.save(str(path))
    return path, bpp


def export_component(
    pipe, plan: ComponentPlan, out: Path, config: ExportConfig, *, source: str = ""
) -> list[ExportedPackage]:
    """Convert, palettize, save and (if `config.verify`) verify one planned component (the UNet piece by piece,
    into one package or, with `config.chunk_unet`, two); see `export_pipeline`."""
    if plan.component == "unet":
        converted = _convert_unet(pipe, plan, config)
    else:
        converted = [_convert_whole(pipe, plan, out, config.batch_size)]
    packages = []
    while converted:  # each model is let go once saved, before the next is read back
        package = converted.pop(0)
        start = time.perf_counter()
        path, bpp = _save(plan, package, out, config, source)
        package = replace(package, model=None)  # saved: the read-back holds the package's program, not this one
        saved = time.perf_counter()
        float16 = package.float16_nbytes
        if float16 is None:
            float16 = float16_equivalent_nbytes(package_nbytes(path), package.palette, plan.module)
        verification = None
        if config.verify:
            verification = verify_package(
                path,
                plan.module,
                package.palette,
                component=plan.component,
                prefix=plan.prefix,
                importance=plan.importance,
                given=plan.given,
            )
        packages.append(
            ExportedPackage(
                component=plan.component,
                path=str(path),
                nbytes=package_nbytes(path),
                float16_nbytes=float16,
                bits_per_param=bpp,
                n_palettized=len(package.palette),
                deployment_target=plan.deployment_target,
                export_s=package.seconds,
                compress_s=saved - start,
                verify_s=time.perf_counter() - saved,
                verification=verification,
            )
        )
    return packages


@torch.no_grad()
def export_pipeline(
    pipe,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    source: str = "",
    importance=None,
    given=None,
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
        given (`workbench.palettes.given.GivenPalettes`, *optional*): UNet palettes stored as given (learned LUTs);
            the recipe must plan each of their layers with its own config (`config.recipe` = their recipe), and the
            read-back proves the package holds exactly their LUTs and indices.

    Returns:
        `ExportReport`.

    Example:
        >>> recipe = load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette")
        >>> report = export_pipeline(pipe, "out/", ExportConfig(recipe=recipe))
        >>> print(report.summary())  # sizes, bits/param, bit-exact per package
    """
    config = ExportConfig() if config is None else config
    plans = plan_export(pipe, config, importance, given)
    check_export_memory(plans, piece_bytes=config.piece_bytes or DEFAULT_PIECE_BYTES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packages = tuple(package for plan in plans for package in export_component(pipe, plan, out, config, source=source))
    if config.layout == "apple":
        write_swift_files(pipe, out, [Path(p.path).name.removesuffix(".mlpackage") for p in packages])
    report = ExportReport(
        out_dir=str(out), source=source, recipe_name=config.recipe_label, packages=packages, settings=config.to_dict()
    )
    report.save()
    return report


@contextlib.contextmanager
def _diffusers_errors_only():
    """diffusers' log at error level for the block (its float16-on-CPU warnings do not apply to an export)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def export_model(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    recipe_file: str | os.PathLike | None = None,
    recipe_name: str | None = None,
    importance_file: str | os.PathLike | None = None,
    palettes_file: str | os.PathLike | None = None,
) -> ExportReport:
    """`workbench export`: load a pipeline (CPU, float32), export and verify it (see `export_pipeline`).

    The recipe file and the importances are read, and `config` checked, before the pipeline loads.

    Args:
        model: hub id or pipeline folder; None for the demo model (`workbench.models.loader.DEMO_MODEL`).
        out_dir, config: see `export_pipeline`; the recipe comes from `recipe_file`, not `config.recipe`.
        recipe_file / recipe_name: a recipe JSON (ours or the reference's pre-analysis) and the recipe in it
            (optional when the file holds one).
        importance_file: the analysis' `importance.npz`, for recipes with data-aware palettes.
        palettes_file: given palettes (`GivenPalettes.save`, e.g. `workbench tune`'s), stored as given; without a
            recipe or nbits, their own recipe is exported.
    """

    config = ExportConfig() if config is None else config
    given = None if palettes_file is None else GivenPalettes.load(palettes_file)
    if recipe_name is not None and recipe_file is None:
        raise InvalidValueError("--recipe-name needs --recipe FILE")
    if recipe_file is not None and (config.nbits is not None or config.recipe is not None):
        raise InvalidValueError("pass a recipe or nbits, not both")
    if recipe_file is not None:
        config = replace(config, recipe=load_recipe(recipe_file, recipe_name))
    elif given is not None and config.nbits is None and config.recipe is None:
        config = replace(config, recipe=Recipe(f"given_{given.digest}", {n: c.key for n, c in given.configs.items()}))
    importance = None
    if importance_file is not None:
        importance = Importance.load(importance_file)  # a missing file fails before the pipeline loads
    # float16 in memory: each module is cast to float32 only while it converts (exact both ways). diffusers warns
    # that a float16 pipeline cannot run on a CPU: this one is never run, only converted
    with _diffusers_errors_only():
        pipe = load_pipeline(model, device="cpu", dtype=torch.float16)
    source = str(model) if model is not None else str(DEMO_MODEL)
    return export_pipeline(pipe, out_dir, config, source=source, importance=importance, given=given)
