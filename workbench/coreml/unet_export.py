"""Convert the UNet a piece at a time, palettize each piece, and stitch the pieces into one package or two chunks.

Converting a whole UNet holds its float32 weights several times over (the torch model, the traced graph's
constants, the float16 copies, the serialized weights): about 2.6 bytes beyond the model per byte of float32
weights, 27 GB for SDXL. Here the UNet is cut into pieces of at most `piece_bytes` float32 parameter bytes
(`workbench.coreml.unet_split`), and for each piece in turn:

1. its modules are cast to float32 (a float16 pipeline stays float16 otherwise: exactly the values Core ML stores),
2. it is traced with zero inputs of the shapes the previous pieces output (propagated with fake tensors, so the
   UNet never runs twice), converted to a float16 MIL program and palettized in place with the workbench's own
   palettes (`compress_program`: nothing is serialized and read back),
3. its modules go back to their dtype and only the palettized program is kept.

Then the pieces are stitched into `Unet.mlpackage`, or with `chunk=True` into `UnetChunk1.mlpackage` and
`UnetChunk2.mlpackage` of about equal weight bytes, in the layout Apple's Swift pipeline loads: chunk 1 takes the
package inputs it needs and outputs, in float32, every tensor chunk 2 reads from it (`emb`, `hidden_<u>`: the
hidden state after unit `u`); chunk 2 takes those and the package inputs it needs, and outputs `noise_pred`. The
Swift pipeline feeds chunk 2 the union of the inputs and chunk 1's outputs, by name.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workbench.coreml.components import layer_weight_names
from workbench.coreml.compress import compress_program
from workbench.coreml.layout import layout_inputs, package_stems
from workbench.coreml.plan import ComponentPlan
from workbench.coreml.stitch import program_to_model, stitch_programs
from workbench.coreml.unet_split import UNetPiece, check_splittable, halves, pieces_by_size, unet_units
from workbench.coreml.verify import weight_names

# The largest piece converted at once, in float32 parameter bytes: memory follows it, not the UNet (a single
# unit above it, e.g. one of SDXL's 10-layer transformers at 1.38 GB, stands alone).
DEFAULT_PIECE_BYTES = 1_500_000_000
CHUNK_NAMES = ("UnetChunk1", "UnetChunk2")


@dataclass(frozen=True)
class StitchedPackage:
    """One package stitched from converted pieces: its name (`Unet`, `UnetChunk1`...), the MLModel, the palette
    of the layers it holds, and the UNet units it holds."""

    name: str
    model: object  # coremltools.models.MLModel
    palette: Mapping[str, object]
    units: tuple[int, int]  # the UNet units it holds (`workbench.coreml.chunks.UNITS_KEY`)


@contextlib.contextmanager
def float32_modules(unet: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Cast the parameters of `paths` to float32 for the block, then back to what they were (float16 <-> float32
    is exact both ways, so a float16 model comes back bit-identical)."""
    dtypes = {path: next(unet.get_submodule(path).parameters()).dtype for path in paths}
    for path in paths:
        unet.get_submodule(path).float()
    try:
        yield
    finally:
        for path, dtype in dtypes.items():
            unet.get_submodule(path).to(dtype)


@torch.no_grad()
def _output_shapes(piece: UNetPiece, examples: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """The shapes of a piece's outputs, propagated with fake tensors (no arithmetic: the UNet never runs twice)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return [tuple(out.shape) for out in piece(*(mode.from_tensor(x) for x in examples))]


def _sanitize_names(program) -> None:
    """coremltools' own renaming of variables and operations to valid identifiers, which the ML program backend
    runs when it serializes; run here so that the weights carry their package names before palettization."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    PASS_REGISTRY["mil_backend::sanitize_name_strings"](program)


@torch.no_grad()
def _convert_piece(piece: UNetPiece, shapes: dict, plan: ComponentPlan):
    """Trace (zero inputs of `shapes`), convert to a float16 MIL program and palettize it in place; record the
    piece's output shapes. Returns (program, the palette of the layers it holds)."""
    import coremltools as ct

    names = piece.input_names
    examples = tuple(torch.zeros(shapes[name]) for name in names)
    shapes.update(zip(piece.output_names, _output_shapes(piece, examples), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools: "torch 2.13 has not been tested"; trace warnings
        traced = torch.jit.trace(piece, examples, check_trace=False)
        program = ct.convert(
            traced,
            inputs=[ct.TensorType(name=n, shape=x.shape, dtype=np.float32) for n, x in zip(names, examples)],
            outputs=[ct.TensorType(name=name, dtype=np.float32) for name in piece.output_names],
            convert_to="milinternal",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, plan.deployment_target),
        )
    del traced
    _sanitize_names(program)  # as the backend would: `a.b.weight_to_fp16` -> `a_b_weight_to_fp16`
    held = weight_names(program)
    weights = layer_weight_names(plan.palette, plan.prefix)
    palette = {layer: cfg for layer, cfg in plan.palette.items() if weights[layer] in held}
    compress_program(
        program, palette, prefix=plan.prefix, module=plan.module, importance=plan.importance, given=plan.given
    )
    return program, palette


def _convert_pieces(unet: nn.Module, units, span: tuple[int, int], shapes: dict, plan: ComponentPlan, budget: int):
    """Convert and palettize `units[span[0]:span[1]]` piece by piece: (palettized programs, their palette)."""
    start, stop = span
    models, palette = [], {}
    ranges = [(start + a, start + b) for a, b in pieces_by_size(units[start:stop], unet, budget)]
    for k, (a, b) in enumerate(ranges, 1):
        began = time.perf_counter()
        piece = UNetPiece(unet, units, a, b, plan.layout).eval()
        paths = [path for unit in piece.units for path in unit.module_paths(unet)]
        with float32_modules(unet, paths):
            model, held = _convert_piece(piece, shapes, plan)
        models.append(model)
        palette.update(held)
        gb = sum(unit.nbytes(unet) for unit in piece.units) / 1e9
        print(
            f"  piece {k}/{len(ranges)}: units {a}-{b - 1}, {gb:.2f} GB float32, {time.perf_counter() - began:.0f} s"
        )
    return models, palette


def export_unet_pieces(
    pipe, plan: ComponentPlan, *, batch_size: int | None = None, chunk: bool = False, piece_bytes: int | None = None
) -> list[StitchedPackage]:
    """The UNet of `plan`, converted and palettized a piece at a time, stitched into one package or two chunks.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline on the CPU, float32 or float16 (its modules are cast to
            float32 one piece at a time while converting, and back).
        plan: the UNet's `ComponentPlan` (palette, deployment target, layout).
        batch_size: the traced inputs' batch (`workbench.coreml.components.example_inputs`).
        chunk: two packages (`UnetChunk1`, `UnetChunk2` in Apple's layout) instead of one.
        piece_bytes: the most float32 parameter bytes converted at once (`DEFAULT_PIECE_BYTES`).

    Returns:
        One `StitchedPackage` (`Unet`), or two (the chunks), not yet saved.
    """
    import coremltools as ct

    unet, target = plan.module, getattr(ct.target, plan.deployment_target)
    inputs = layout_inputs(pipe, "unet", plan.layout, batch_size)
    check_splittable(unet, inputs["sample"].shape)
    units = unet_units(unet)
    shapes = {name: tuple(x.shape) for name, x in inputs.items()}
    cuts = [0, halves(units, unet), len(units)] if chunk else [0, len(units)]
    names = package_stems("unet", plan.layout, chunk)
    packages = []
    for name, start, stop in zip(names, cuts, cuts[1:]):
        models, palette = _convert_pieces(unet, units, (start, stop), shapes, plan, piece_bytes or DEFAULT_PIECE_BYTES)
        border = UNetPiece(unet, units, start, stop, plan.layout)  # the package's inputs and outputs
        order = [n for n in inputs if n in border.input_names] + [n for n in border.input_names if n not in inputs]
        declared = {n: (shapes[n], np.float32) for n in order}  # the layout's inputs first, in its order
        program = stitch_programs(models, declared, border.output_names, target)
        del models
        model = program_to_model(program, target)
        packages.append(StitchedPackage(name, model, palette, (start, stop)))
    return packages
