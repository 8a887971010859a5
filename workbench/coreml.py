"""Core ML packages: weight names by construction, and reading weights back out of a saved package.

The torch frontend of coremltools names the float16 constant of a module's weight after the module's
path: `down_blocks.0.attentions.0.proj_in.weight` becomes `down_blocks_0_attentions_0_proj_in_weight_to_fp16`.
Since we convert the model ourselves, that mapping is known by construction (no weight hashing, unlike
the reference), and `coreml_weight_names` checks it is one-to-one before anything relies on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def coreml_weight_name(layer: str) -> str:
    """The name coremltools gives the float16 weight constant of torch module `layer`."""
    return layer.replace(".", "_") + "_weight_to_fp16"


def coreml_weight_names(layers: Iterable[str]) -> dict[str, str]:
    """`{torch layer name: Core ML weight name}`, refusing mappings that would be ambiguous."""
    mapping = {layer: coreml_weight_name(layer) for layer in layers}
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for layer, name in mapping.items():
            if name in seen:
                raise ValueError(f"layers {seen[name]!r} and {layer!r} both map to Core ML weight {name!r}")
            seen[name] = layer
    return mapping


def load_program(package: str | os.PathLike):
    """The MIL program of a saved `.mlpackage`, with its weights, on any OS (no Core ML runtime needed)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise FileNotFoundError(f"not an .mlpackage (no Manifest.json): {package}")
    spec = ct.utils.load_spec(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights_dir))


def package_weights(package: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every weight of a saved package, decompressed, keyed by its uncompressed constant's name.

    Palettized weights (`constexpr_lut_to_dense` ops, named `<const>_palettized`) are expanded from
    their LUT and indices exactly as Core ML does; float constants are returned as stored.
    """
    program = load_program(package)
    weights: dict[str, np.ndarray] = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_lut_to_dense":
                weights[op.name.removesuffix("_palettized")] = np.asarray(op.materialized_val_inference())
            elif op.op_type == "const" and op.outputs[0].val is not None:
                value = np.asarray(op.outputs[0].val)
                if value.dtype == np.float16 and value.ndim >= 2:
                    weights[op.name] = value
    return weights


def palettized_weight_names(package: str | os.PathLike) -> set[str]:
    """Names of the weights a package stores palettized."""
    program = load_program(package)
    return {
        op.name.removesuffix("_palettized")
        for function in program.functions.values()
        for op in function.operations
        if op.op_type == "constexpr_lut_to_dense"
    }
