"""Reading Core ML packages back on any OS, and proving their weights equal the torch simulation.

`package_weights` decompresses every weight of a saved `.mlpackage` exactly as Core ML does (LUT and indices
of `constexpr_lut_to_dense` ops); `verify_package` compares each one with `fit_palette(torch weight).dense()`
(palettized layers) or the torch weight cast to float16 (the others), bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from torch import nn

from workbench.coreml.components import layer_weight_names, weight_layers
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.threads import sklearn_single_thread


def load_program(package):
    """The MIL program of a saved `.mlpackage` (or an in-memory `MLModel`), with its weights, on any OS."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    if not isinstance(package, (str, os.PathLike)):  # an MLModel: its spec and weights folder
        spec = package.get_spec()
        return load(spec, specification_version=spec.specificationVersion, file_weights_dir=package.weights_dir)
    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise FileNotFoundError(f"not an .mlpackage (no Manifest.json): {package}")
    spec = ct.utils.load_spec(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights_dir))


def _weight_ops(program):
    """(weight name, op, palettized?) for palettized weights and float16 constants of >= 2 dimensions."""
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_lut_to_dense":
                yield op.name.removesuffix("_palettized"), op, True
            elif op.op_type == "const" and op.outputs[0].val is not None:
                value = op.outputs[0].val
                if getattr(value, "dtype", None) == np.float16 and np.ndim(value) >= 2:
                    yield op.name, op, False


def unpack_indices(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """The first `count` `nbits`-bit indices packed least significant bit first into the bytes `packed` (how
    `constexpr_lut_to_dense` stores them: coremltools' `restore_elements_from_packed_bits`, which expands every bit
    to a byte first; equal to it for every width, `tests/test_coreml_verify.py`). Every width here divides 24, so
    each 3 bytes hold a whole number of indices: read as one little-endian integer, they are shifted out in turn."""
    if 24 % nbits:
        raise ValueError(f"nbits must divide 24 (1, 2, 3, 4, 6 or 8), got {nbits}")
    packed = np.ascontiguousarray(packed).view(np.uint8).reshape(-1)
    if nbits == 8:
        return packed[:count].copy()
    triples = np.zeros((-(-packed.size // 3), 3), dtype=np.uint32)
    triples.reshape(-1)[: packed.size] = packed
    words = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
    per_word = 24 // nbits
    out = np.empty((words.size, per_word), dtype=np.uint8)
    for k in range(per_word):
        out[:, k] = (words >> (k * nbits)) & ((1 << nbits) - 1)
    return out.reshape(-1)[:count]


def _decompress(op) -> np.ndarray:
    """A `constexpr_lut_to_dense` op's weight as Core ML computes it: the per-tensor (iOS16/17) op from its packed
    indices (`unpack_indices`); any other form (iOS18's grouped LUTs) by coremltools' own decompression."""
    lut, indices, shape = (getattr(op, n, None) for n in ("lut", "indices", "shape"))
    if shape is None or lut is None or lut.val is None or np.ndim(lut.val) != 1 or indices.val.dtype != np.uint8:
        return np.asarray(op.materialized_val_inference())
    lut, shape = lut.val, tuple(int(d) for d in shape.val)
    nbits = int(lut.size).bit_length() - 1
    return lut[unpack_indices(indices.val, nbits, math.prod(shape))].reshape(shape)


class StoredWeights:
    """A package's weights by name, decompressed one at a time when asked for (`get`), so reading back a large
    package holds its compressed program and one dense weight, not every weight dense at once."""

    def __init__(self, package: str | os.PathLike):
        self._ops = {name: (op, palettized) for name, op, palettized in _weight_ops(load_program(package))}
        self.palettized = {name for name, (_, palettized) in self._ops.items() if palettized}

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    @property
    def names(self) -> tuple[str, ...]:
        """Every weight's name, in program order."""
        return tuple(self._ops)

    def get(self, name: str) -> np.ndarray | None:
        """The weight decompressed exactly as Core ML does, or None if the package has none of that name."""
        if name not in self._ops:
            return None
        op, palettized = self._ops[name]
        return _decompress(op) if palettized else np.asarray(op.outputs[0].val)


def package_weights(package: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every weight of a saved package, decompressed, keyed by its uncompressed constant's name.

    Palettized weights (`constexpr_lut_to_dense` ops, named `<const>_palettized`) are expanded from
    their LUT and indices exactly as Core ML does; float constants are returned as stored.
    """
    return {
        name: _decompress(op) if palettized else np.asarray(op.outputs[0].val)
        for name, op, palettized in _weight_ops(load_program(package))
    }


def palettized_weight_names(package: str | os.PathLike) -> set[str]:
    """Names of the weights a package stores palettized."""
    return {name for name, _, palettized in _weight_ops(load_program(package)) if palettized}


def weight_names(program) -> set[str]:
    """Names of the weights (float16 constants of >= 2 dimensions, or palettized) of a MIL program."""
    return {name for name, _, _ in _weight_ops(program)}


def program_weight_names(model_or_package) -> set[str]:
    """Names of the weights (float16 constants of >= 2 dimensions, or palettized) of an MLModel or a package."""
    return weight_names(load_program(model_or_package))


def package_nbytes(package: str | os.PathLike) -> int:
    """Bytes on disk of a package (all files)."""
    return sum(f.stat().st_size for f in Path(package).rglob("*") if f.is_file())


def weight_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of a weight against its float original: `20*log10(max|reference| / rmse)`, the squared error summed in
    float64 (inf if equal)."""
    ref = np.asarray(reference, dtype=np.float32).reshape(-1)
    diff = (ref - np.asarray(test, dtype=np.float32).reshape(-1)).astype(np.float64)  # exact for float16 values
    rmse = math.sqrt(float(diff @ diff) / max(diff.size, 1))
    peak = float(np.abs(ref).max())
    return math.inf if rmse == 0 else 20.0 * math.log10(peak / rmse) if peak > 0 else -math.inf


def _bit_equal(expected: np.ndarray, got: np.ndarray | None) -> bool:
    """Same float16 bits (uint16 views, so -0.0 != 0.0 and NaNs compare), `got` reshaped to `expected`."""
    return (
        got is not None
        and got.size == expected.size
        and np.array_equal(expected.view(np.uint16), got.view(np.uint16).reshape(expected.shape))
    )


@dataclass(frozen=True)
class LayerCheck:
    """One palettized weight read back from a package and compared with the simulation.

    Attributes:
        layer: torch module path in the component; weight: its Core ML constant; config: e.g. `kmeans4`;
        bit_exact: decompressed package weight == `fit_palette(torch weight).dense()` bit for bit;
        psnr_db: weight PSNR of the package weight vs the float32 torch weight (`weight_psnr`).
    """

    component: str
    layer: str
    weight: str
    nbits: int
    config: str
    numel: int
    bit_exact: bool
    psnr_db: float


@dataclass(frozen=True)
class Verification:
    """What a saved package holds, compared weight by weight with the torch model and the simulation.

    Attributes:
        component, package: what was checked.
        layers: one `LayerCheck` per palettized weight.
        float16_layers: Linear/Conv2d layers left float16 in the package; float16_exact: how many of them equal
            `torch weight.half()` bit for bit.
        unexpected_palettized: weights stored palettized that the plan did not ask for (should be empty).
    """

    component: str
    package: str
    layers: tuple[LayerCheck, ...]
    float16_layers: int
    float16_exact: int
    unexpected_palettized: tuple[str, ...] = ()

    @property
    def all_bit_exact(self) -> bool:
        return (
            all(c.bit_exact for c in self.layers)
            and self.float16_exact == self.float16_layers
            and not self.unexpected_palettized
        )

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self.layers], columns=[f.name for f in fields(LayerCheck)])

    def to_dict(self) -> dict:
        d = asdict(self)
        for row in d["layers"]:  # JSON has no inf: a lossless weight gets null
            row["psnr_db"] = None if not math.isfinite(row["psnr_db"]) else round(row["psnr_db"], 3)
        d["all_bit_exact"] = self.all_bit_exact
        return d


def expected_weight(layer: str, weight: nn.Parameter, config: PaletteConfig, importance=None, given=None):
    """What the package must hold for a planned layer: its given palette's `dense()` when `given`
    (`GivenPalettes`) holds it, else `fit_palette(weight, config).dense()` (data-aware: with `importance`)."""
    if given is not None and layer in given:
        return given.palette(layer, tuple(weight.shape), config).dense()
    weights = importance.for_weight(layer, tuple(weight.shape)) if config.data_aware else None
    return fit_palette(weight.detach().cpu(), config, importance=weights).dense()


def _check_layer(
    component: str, layer: str, weight: nn.Parameter, config: PaletteConfig, weight_name: str, stored, expected
) -> LayerCheck:
    """One planned layer: stored palettized, and equal to `expected` (`expected_weight`) bit for bit."""

    torch_weight = weight.detach().cpu()
    palettized = stored.palettized
    got = stored.get(weight_name)
    exact = weight_name in palettized and _bit_equal(expected, got)
    psnr = weight_psnr(torch_weight.float().numpy(), got.reshape(expected.shape)) if got is not None else -math.inf
    return LayerCheck(component, layer, weight_name, config.nbits, config.key, expected.size, bool(exact), psnr)


def verify_package(
    package: str | os.PathLike,
    module: nn.Module,
    plan: Mapping[str, PaletteConfig],
    *,
    component: str,
    prefix: str | None = None,
    names: Mapping[str, str] | None = None,
    importance=None,
    given=None,
) -> Verification:
    """Read a saved package back, decompress every palettized weight, compare with the simulation.

    Each planned layer's stored weight must equal `fit_palette(torch weight, config).dense()` (a layer of `given`:
    its given palette's `dense()`) bit for bit (uint16 views, never float16 sorting); every other Linear/Conv2d layer
    in the package must equal the torch weight cast to float16.

    Args:
        package (`str | os.PathLike`): the saved `.mlpackage`.
        module (`nn.Module`): the component's torch module it was exported from (e.g. `pipe.unet`).
        plan (`Mapping[str, PaletteConfig]`): the layers that were palettized, and how.
        component (`str`): the component's name, recorded in the result.
        prefix (`str`, *optional*): the export wrapper's attribute for the module (`UNetExport.prefix`, ...): a
            package we converted names layer `L`'s weight `coreml_weight_name(prefix + "." + L)`.
        names (`Mapping[str, str]`, *optional*): instead of `prefix`, torch layer -> Core ML weight name for the
            layers the package holds (`workbench.coreml.apply.match_weights`, for a package converted elsewhere).
        importance (`workbench.palettes.importance.Importance`, *optional*): for data-aware palettes in the plan.
        given (`workbench.palettes.given.GivenPalettes`, *optional*): palettes the package must hold as given.

    Returns:
        `Verification`.
    """
    stored = StoredWeights(package)
    palettized = stored.palettized
    layers = weight_layers(module)
    names = layer_weight_names(layers, prefix) if names is None else names

    def check(item) -> LayerCheck:
        layer, cfg = item
        with sklearn_single_thread():  # per calling thread: set in the worker itself
            weight = layers[layer].weight
            expected = expected_weight(layer, weight, cfg, importance, given)
            return _check_layer(component, layer, weight, cfg, names[layer], stored, expected)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # the k-means kernels release the GIL
        checks = tuple(pool.map(check, plan.items()))
    float16 = [layer for layer in layers if layer not in plan and names.get(layer) in stored]
    n_exact = sum(_bit_equal(layers[n].weight.detach().cpu().half().numpy(), stored.get(names[n])) for n in float16)
    return Verification(
        component=component,
        package=str(package),
        layers=checks,
        float16_layers=len(float16),
        float16_exact=n_exact,
        unexpected_palettized=tuple(sorted(palettized - {names[layer] for layer in plan})),
    )
