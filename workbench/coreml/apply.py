"""Apply a recipe to a Core ML package converted elsewhere (Apple's `torch2coreml`, the `apple/coreml-*` repos).

Such a package names its weights its own way, and stores them reshaped (a Linear as a 1x1 convolution, (out, in,
1, 1)). Each package weight is matched to its torch layer by exact float16 content (`match_weights`): both sides
are cast to float16, their singleton axes squeezed, and grouped by a SHA-256 of shape and bytes, then confirmed
with `np.array_equal` on the bits. Never by name, and never by a partial hash (Apple's apply script matches
(first value, element count) and asserts a distance < 0.01, which fails on fine-tuned models).

`apply_recipe` then palettizes the matched weights with the same `compress_model` as `export`, saves the package
under its own file name (so `Unet.mlpackage` stays what the Swift pipeline loads), reads it back and proves every
weight bit-exact with the simulation (`verify_package`), and reports sizes (`ExportReport`, `verification.json`).

Example:
    >>> report = apply_recipe("Unet.mlpackage", pipe.unet, load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette"),
    ...                       "applied/")
    >>> print(report.summary())
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.coreml.chunks import bisect_package
from workbench.coreml.components import weight_layers
from workbench.coreml.compress import compress_model
from workbench.coreml.config import DEFAULT_MIN_NUMEL, RecipeLike
from workbench.coreml.explicit_lut import check_importance
from workbench.coreml.memory import check_export_memory
from workbench.coreml.metadata import set_package_metadata
from workbench.coreml.plan import ComponentPlan, palette_plan
from workbench.coreml.results import ExportedPackage, ExportReport
from workbench.coreml.unet_export import CHUNK_NAMES
from workbench.coreml.verify import (
    StoredWeights,
    package_nbytes,
    package_weights,
    palettized_weight_names,
    verify_package,
)
from workbench.errors import InvalidValueError, UserError
from workbench.models.layers import compressible_layers
from workbench.models.loader import DEMO_MODEL, ModelSpec, load_pipeline
from workbench.palettes.config import FLOAT_BITS, PaletteConfig
from workbench.palettes.importance import Importance
from workbench.palettes.size import bits_per_param
from workbench.recipes.recipe import load_recipe

SPEC_TARGETS = {7: "iOS16", 8: "iOS17", 9: "iOS18"}  # Core ML specification version -> deployment target
_SHOWN = 8  # names listed in an error before "and N more"


class PackageMismatchError(UserError, ValueError):
    """A package whose weights do not match the torch model's: converted from another model, already palettized,
    or with identical layers the recipe treats differently. The message lists what did not match."""


class DeploymentTargetError(UserError, ValueError):
    """The recipe needs Core ML ops the package's deployment target lacks (grouped or 3-bit palettes: iOS18)."""


def canonical_weight(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A weight as float16 with its singleton axes removed: a Linear's (out, in) and the same weight stored as a
    1x1 convolution, (out, in, 1, 1), become the same array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float16).numpy()
    array = np.asarray(value).astype(np.float16, copy=False)
    return array.reshape([d for d in array.shape if d != 1])


def content_key(value: torch.Tensor | np.ndarray) -> tuple[tuple[int, ...], str]:
    """`(canonical shape, SHA-256 of the canonical float16 bytes)`: equal keys mean equal weights, bit for bit."""
    array = np.ascontiguousarray(canonical_weight(value))
    return array.shape, hashlib.sha256(array.view(np.uint16).tobytes()).hexdigest()


@dataclass(frozen=True)
class WeightMatch:
    """Torch layers and package weights paired by content.

    Attributes:
        names: torch layer -> package weight, where exactly one of each holds those values.
        ambiguous: `(layers, weights)` groups holding identical values (e.g. two zero-initialized layers): which is
            which cannot be told, and does not matter where the recipe treats the layers alike.
        unmatched_layers: torch layers whose values no package weight holds.
        unmatched_weights: package weights (float16, >= 2 axes) whose values no torch layer holds.
        palettized: package weights stored palettized already (their values cannot be matched).
    """

    names: Mapping[str, str]
    ambiguous: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    unmatched_layers: tuple[str, ...]
    unmatched_weights: tuple[str, ...]
    palettized: tuple[str, ...] = ()


def match_weights(
    module: nn.Module, stored: Mapping[str, np.ndarray], palettized: tuple[str, ...] | set[str] = ()
) -> WeightMatch:
    """Pair the module's Linear/Conv2d weights with a package's weights by exact float16 content.

    Args:
        module (`nn.Module`): the torch component (e.g. `pipe.unet`).
        stored (`Mapping[str, np.ndarray]`): the package's weights (`workbench.coreml.verify.package_weights`).
        palettized (`set[str]`, defaults to ()): names of the package's already palettized weights; not matched.

    Returns:
        `WeightMatch`.
    """
    layers = weight_layers(module)
    by_key_layers: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        by_key_layers[content_key(layer.weight)].append(name)
    by_key_weights: dict[tuple, list[str]] = defaultdict(list)
    for name, value in stored.items():
        if name not in palettized:
            by_key_weights[content_key(value)].append(name)
    names, ambiguous, unmatched_layers, unmatched_weights = {}, [], [], []
    for key in by_key_layers.keys() | by_key_weights.keys():
        group_layers, group_weights = by_key_layers.get(key, []), by_key_weights.get(key, [])
        if not group_weights:
            unmatched_layers += group_layers
        elif not group_layers:
            unmatched_weights += group_weights
        elif len(group_layers) == len(group_weights) == 1:
            layer, weight = group_layers[0], group_weights[0]
            if not np.array_equal(  # the digest said so; the bits confirm it
                canonical_weight(layers[layer].weight).view(np.uint16),
                canonical_weight(stored[weight]).view(np.uint16),
            ):
                raise AssertionError(f"SHA-256 collision between {layer} and {weight}")
            names[layer] = weight
        else:
            ambiguous.append((tuple(sorted(group_layers)), tuple(sorted(group_weights))))
    return WeightMatch(
        names=names,
        ambiguous=tuple(sorted(ambiguous)),
        unmatched_layers=tuple(sorted(unmatched_layers, key=list(layers).index)),
        unmatched_weights=tuple(sorted(unmatched_weights)),
        palettized=tuple(sorted(palettized)),
    )


def _listed(names, n: int = _SHOWN) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _resolve_ambiguous(match: WeightMatch, plan: Mapping[str, PaletteConfig]) -> dict[str, str]:
    """Layer -> weight for groups of identical layers the plan treats alike (any pairing gives the same package);
    a `PackageMismatchError` naming the layers where it does not."""
    names = {}
    for layers, weights in match.ambiguous:
        configs = {plan.get(layer) for layer in layers}
        if len(configs) > 1 or len(weights) > len(layers):
            keys = ", ".join(f"{layer}: {plan[layer].key if layer in plan else 'float16'}" for layer in layers)
            raise PackageMismatchError(
                f"layers {', '.join(layers)} hold identical weights, so the package's {', '.join(weights)} cannot "
                f"be told apart, and the recipe treats them differently ({keys}); give these layers the same width "
                "in the recipe (16 for all of them to leave them float16)"
            )
        names |= {layer: weights[i % len(weights)] for i, layer in enumerate(layers)}
    return names


def resolve_names(
    match: WeightMatch, plan: Mapping[str, PaletteConfig], *, package: str, model: str
) -> dict[str, str]:
    """Torch layer -> package weight for every matched layer; every planned layer must be among them.

    Raises:
        PackageMismatchError: a planned layer whose values the package lacks (listing those layers and the
            package weights that match no layer: the package is another model's), or identical layers that the
            plan treats differently.
    """
    names = dict(match.names) | _resolve_ambiguous(match, plan)
    missing = [layer for layer in plan if layer not in names]
    if missing and match.palettized:
        raise PackageMismatchError(
            f"{package} is palettized already ({len(match.palettized)} weights, e.g. {_listed(match.palettized, 3)}), "
            f"so {len(missing)} of the recipe's {len(plan)} layers cannot be matched by their float16 values; apply "
            "the recipe to the float16 package (`workbench export --layout apple` without --nbits / --recipe, or "
            "torch2coreml's output without --quantize-nbits)"
        )
    if missing:
        raise PackageMismatchError(
            f"{package} does not hold the weights of {model}: {len(missing)} of the recipe's {len(plan)} layers have "
            f"no package weight with the same float16 values ({_listed(missing)}), and "
            f"{len(match.unmatched_weights)} package weight(s) match no layer of the model "
            f"({_listed(match.unmatched_weights) or 'none'}). Apply the recipe to a package converted from the model "
            "it was made for (a fine-tune needs its own package and its own recipe), and pass that model as --model."
        )
    return names


def match_notes(match: WeightMatch, plan: Mapping[str, PaletteConfig]) -> tuple[str, ...]:
    """What a successful match leaves for the user to know: package weights no layer holds (left as they are)
    and groups of identical layers (all given the same palette)."""
    notes = []
    if match.unmatched_weights:
        notes.append(
            f"{len(match.unmatched_weights)} package weight(s) match no layer of the model and are left as they are: "
            f"{_listed(match.unmatched_weights)}"
        )
    for layers, weights in match.ambiguous:
        how = plan[layers[0]].key if layers[0] in plan else "float16"
        notes.append(f"layers {', '.join(layers)} hold identical weights ({', '.join(weights)}): all {how}")
    return tuple(notes)


def check_deployment_target(spec_version: int, plan: Mapping[str, PaletteConfig], package: str) -> str:
    """The package's deployment target, if it supports every palette of `plan`.

    Raises:
        DeploymentTargetError: grouped or 3-bit palettes (iOS18 / macOS15) for an older package, or a package
            that is not an ML Program (before iOS16).
    """
    target = SPEC_TARGETS.get(spec_version, "iOS18" if spec_version > 9 else None)
    if target is None:
        raise DeploymentTargetError(
            f"{package} is Core ML specification {spec_version}, not an ML Program (iOS16 or later); re-convert it "
            "with convert_to='mlprogram' (torch2coreml does by default)"
        )
    needs = [layer for layer, cfg in plan.items() if cfg.needs_ios18]
    if needs and spec_version < 9:
        raise DeploymentTargetError(
            f"the recipe's grouped or 3-bit palettes ({_listed(needs, 3)}) need iOS18 / macOS15, and {package} "
            f"targets {target}; re-convert the UNet with minimum deployment target iOS18 (torch2coreml "
            "--min-deployment-target iOS18, or workbench export), or use a recipe without grouped or 3-bit palettes"
        )
    return target


class PackageNotFoundError(UserError, FileNotFoundError):
    """A path that is not a Core ML `.mlpackage`."""


def check_package(package: str | os.PathLike) -> Path:
    """`package` as a path, or a `PackageNotFoundError` when it is not an `.mlpackage` folder."""
    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise PackageNotFoundError(f"not an .mlpackage (no Manifest.json): {package}")
    return package


def check_out_dir(out_dir: str | os.PathLike, package: str | os.PathLike) -> Path:
    """`out_dir` as a path, if it can be the folder that receives `<package's file name>` and its report.

    Raises:
        InvalidValueError: `out_dir` ends in `.mlpackage` (it would be a folder of that name holding the package),
            or the output package would overwrite the input.
    """
    out, package = Path(out_dir), Path(package)
    if out.suffix.lower() == ".mlpackage":
        raise InvalidValueError(
            f"--out {out} names a package, but --out is the folder that receives {package.name} (the input's file "
            f"name, which Apple's Swift pipeline loads) and verification.json; pass a folder, e.g. --out "
            f"{out.with_suffix('')}"
        )
    if (out / package.name).resolve() == package.resolve():
        raise InvalidValueError(f"--out {out} would overwrite the input package {package}; choose another folder")
    return out


def _load_package(package: Path):
    import coremltools as ct

    check_package(package)
    return ct.models.MLModel(str(package), skip_model_load=True)  # weights and spec only: works on any OS


def _bits_per_param(module: nn.Module, plan: Mapping[str, PaletteConfig], names: Mapping[str, str], min_numel: int):

    numels = {n: m.weight.numel() for n, m in compressible_layers(module, min_numel=min_numel).items() if n in names}
    return bits_per_param(plan, numels) if numels else float(FLOAT_BITS)


def _checked_plan(module: nn.Module, recipe: RecipeLike, importance: Importance | None, component: str):
    """`(plan, importances it needs or None)`, checked before the package is read.

    Raises:
        RecipeError: layers the module lacks. InvalidValueError: data-aware palettes without (matching)
            importances (`check_importance`). ExportMemoryError: too little free memory (`check_export_memory`).
    """
    plan = palette_plan(module, recipe)
    importance = check_importance(module, plan, importance)
    needs = ComponentPlan(component, module, prefix="", palette=plan, uniform=False, deployment_target="")
    check_export_memory([needs], action="applying the recipe to")
    return plan, importance


@torch.no_grad()
def _chunked(path: Path) -> tuple[list[Path], float]:
    """The applied package split into `UnetChunk1` + `UnetChunk2` beside it (`bisect_package`), then removed; and
    the seconds it took."""
    start = time.perf_counter()
    chunks = bisect_package(path, CHUNK_NAMES)
    shutil.rmtree(path)
    return chunks, time.perf_counter() - start


def _verified(path: Path, module: nn.Module, plan, names, importance, fields: dict) -> ExportedPackage:
    """One saved package read back and compared with the simulation (`verify_package`) for the planned layers it
    holds; `fields`: the rest of its `ExportedPackage`."""
    start = time.perf_counter()
    held = StoredWeights(path)
    mine = {layer: cfg for layer, cfg in plan.items() if names[layer] in held}
    del held
    component = fields["component"]
    verification = verify_package(path, module, mine, component=component, names=names, importance=importance)
    return ExportedPackage(path=str(path), nbytes=package_nbytes(path), n_palettized=len(mine), **fields,
                           verify_s=time.perf_counter() - start, verification=verification)  # fmt: skip


def apply_recipe(
    package: str | os.PathLike,
    module: nn.Module,
    recipe: RecipeLike,
    out_dir: str | os.PathLike,
    *,
    source: str = "",
    min_numel: int = DEFAULT_MIN_NUMEL,
    importance: Importance | None = None,
    chunk: bool = False,
) -> ExportReport:
    """Palettize an existing float16 Core ML package with a recipe, and prove the result bit-exact.

    Matches every package weight to its torch layer by content (`match_weights`), checks the recipe against both
    (`resolve_names`) and the package's deployment target (`check_deployment_target`), palettizes the planned
    weights (`compress_model` with the torch module, as `export` does: palettes fitted from the matched torch layers,
    data-aware ones with `importance`), saves `<out_dir>/<package's file name>`, reads it back and compares every
    weight with the simulation (`verify_package`), and writes `<out_dir>/verification.json`.

    Args:
        package (`str | os.PathLike`): a float16 `.mlpackage` of `module` (e.g. `Unet.mlpackage` from torch2coreml).
        module (`nn.Module`): the torch component it was converted from (e.g. `pipe.unet`).
        recipe (`Recipe` or `Mapping[str, int | PaletteConfig]`): layer -> bits or `PaletteConfig` (16 = float16).
        out_dir (`str | os.PathLike`): where the palettized package and `verification.json` go (created).
        source (`str`): the source model's name, for the metadata and messages.
        min_numel (`int`, defaults to 2048): layers counted in bits/param (strict `>`).
        importance (`Importance`, *optional*): the analysis' importances, for data-aware palettes (`"wkmeans4"`).
        chunk (`bool`, defaults to False): split the palettized package into `UnetChunk1` + `UnetChunk2` for iOS
            (`workbench.coreml.chunks.bisect_package`), each verified, instead of keeping it whole.

    Returns:
        `ExportReport` with one `ExportedPackage` (two with `chunk`): `float16_nbytes` is the input package's size,
        `export_s` the time to read and match it.

    Raises:
        PackageMismatchError, DeploymentTargetError, ExportMemoryError, InvalidValueError: see `resolve_names`,
            `check_deployment_target`, `_checked_plan` and `check_out_dir`.
    """
    component = "unet"  # what `workbench apply` palettizes (recorded in the report and the package's metadata)
    package, out = Path(package), check_out_dir(out_dir, package)
    path = out / package.name
    start = time.perf_counter()
    plan, importance = _checked_plan(module, recipe, importance, component)
    model = _load_package(package)
    target = check_deployment_target(model.get_spec().specificationVersion, plan, str(package))
    match = match_weights(module, package_weights(package), palettized_weight_names(package))
    names = resolve_names(match, plan, package=str(package), model=source or type(module).__name__)
    matched_s = time.perf_counter() - start

    start = time.perf_counter()
    names_planned = {layer: names[layer] for layer in plan}
    compressed = compress_model(model, plan, names=names_planned, module=module, importance=importance)
    label = getattr(recipe, "name", "custom recipe")
    bpp = _bits_per_param(module, plan, names, min_numel)
    set_package_metadata(
        compressed, component=component, source=source, recipe_name=label, bits_per_param=bpp, n=len(plan)
    )
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    compressed.save(str(path))
    compress_s = time.perf_counter() - start

    paths, chunk_s = _chunked(path) if chunk else ([path], 0.0)
    fields = {"component": component, "float16_nbytes": package_nbytes(package), "bits_per_param": bpp,
                  "deployment_target": target, "export_s": matched_s, "compress_s": compress_s + chunk_s}  # fmt: skip
    packages = tuple(_verified(p, module, plan, names, importance, fields) for p in paths)
    notes = match_notes(match, plan)
    report = ExportReport(str(out), source, label, packages, applied_to=str(package), notes=notes)
    report.save()
    return report


def apply_model(
    package: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    recipe_file: str | os.PathLike,
    recipe_name: str | None = None,
    model: ModelSpec = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    importance_file: str | os.PathLike | None = None,
    chunk: bool = False,
) -> ExportReport:
    """`workbench apply`: load the recipe and the pipeline (CPU, float32), then `apply_recipe` to its UNet.

    Args:
        package: the float16 UNet `.mlpackage` to palettize.
        out_dir, min_numel: see `apply_recipe`.
        recipe_file / recipe_name: a recipe JSON (ours or the reference's pre-analysis) and the recipe in it
            (optional when the file holds one).
        model: the model spec the package was converted from (hub id, pipeline folder, single-file checkpoint...,
            `workbench.models.loader.load_pipeline`); None for the demo model.
        importance_file: the analysis' `importance.npz`, for recipes with data-aware palettes.
        chunk: write `UnetChunk1` + `UnetChunk2` instead of one package (see `apply_recipe`).
    """

    recipe = load_recipe(recipe_file, recipe_name)  # a bad file fails before the pipeline loads
    check_package(package)
    check_out_dir(out_dir, package)
    importance = None if importance_file is None else Importance.load(importance_file)
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    source = str(model) if model is not None else str(DEMO_MODEL)
    return apply_recipe(
        package, pipe.unet, recipe, out_dir, source=source, min_numel=min_numel, importance=importance, chunk=chunk
    )
