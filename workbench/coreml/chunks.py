"""A chunked UNet (`UnetChunk1` + `UnetChunk2`): run in sequence as Apple's Swift pipeline runs it.

Apple's `ManagedMLModel` array predicts with the first chunk, then feeds the next the union of the original inputs
and the previous chunk's outputs, by name (`dict.merging(inputs) { out, _ in out }`: an output wins over an input
of the same name). `ChunkedPredictor` does the same with Core ML predictors (macOS); `emulate_chunks` does it in
torch on any OS for the chunks `workbench export --chunk-unet` writes: each chunk package records the units it holds
(`UNITS_KEY` in its metadata), the matching `UNetPiece` must declare exactly the package's inputs and outputs, and
runs with the package's weights (loaded by `workbench.coreml.runtime` emulation), so chunk 1 then chunk 2 can be
compared with the unchunked UNet.

A package converted elsewhere (`workbench apply --chunk-unet`) has no units to cut at: `bisect_package` splits the
palettized program itself with coremltools' `bisect_model` (what Apple's `chunk_mlprogram.py` calls), and checks the
two halves against the package they came from: the same weights, bit for bit, and inputs and outputs the Swift
pipeline can wire (`check_chunk_interfaces`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from workbench.coreml.unet_split import UNetPiece, unet_units
from workbench.coreml.verify import StoredWeights
from workbench.errors import UserError

UNITS_KEY = "workbench.unet_units"  # user_defined_metadata of a chunk: "<start>-<stop>", the UNet units it holds


def package_interface(package: str | os.PathLike) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """(input names, output names, the `UNITS_KEY` metadata or None) of a saved package, read from its spec."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    description = spec.description
    units = description.metadata.userDefined.get(UNITS_KEY)
    return tuple(i.name for i in description.input), tuple(o.name for o in description.output), units


def chunk_pieces(unet: torch.nn.Module, packages: Sequence[str | os.PathLike], layout: str) -> list[UNetPiece]:
    """One `UNetPiece` per chunk package, holding the units its metadata names.

    Raises:
        ValueError: a package without the units metadata, or whose declared inputs or outputs are not the piece's
            (the contract the Swift pipeline relies on).
    """
    units = unet_units(unet)
    pieces = []
    for package in packages:
        inputs, outputs, span = package_interface(package)
        if span is None:
            raise ValueError(f"{package} has no {UNITS_KEY!r} metadata: not a chunk written by workbench")
        start, stop = (int(x) for x in span.split("-"))
        piece = UNetPiece(unet, units, start, stop, layout)
        if set(piece.input_names) != set(inputs) or tuple(piece.output_names) != outputs:
            raise ValueError(
                f"{Path(package).name} declares inputs {inputs} and outputs {outputs}; units {span} of this UNet "
                f"read {piece.input_names} and write {piece.output_names}"
            )
        pieces.append(piece)
    return pieces


@torch.no_grad()
def emulate_chunks(pieces: Sequence[UNetPiece], inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run chunk pieces in sequence as the Swift pipeline does: each takes, by name, what it declares from the
    original inputs merged with the previous chunk's outputs (outputs win). Returns the last chunk's outputs."""
    outputs: dict[str, torch.Tensor] = {}
    for piece in pieces:
        available = {**inputs, **outputs}
        outputs = dict(zip(piece.output_names, piece(*(available[n] for n in piece.input_names)), strict=True))
    return outputs


class ChunkedPredictor:
    """Core ML predictors of a chunked UNet run in sequence, fed as the Swift pipeline feeds them; `predict` takes
    and returns what one unchunked UNet package would. Each predictor needs `predict(dict) -> dict` and its declared
    input names (`input_names`)."""

    def __init__(self, predictors: Sequence, input_names: Sequence[Sequence[str]]):
        self.predictors, self.input_names = list(predictors), [tuple(n) for n in input_names]
        # every chunk's input shapes and dtypes where known (the first chunk's win), as one package's
        self.shapes, self.dtypes = {}, {}
        for predictor in self.predictors:
            for attribute in ("shapes", "dtypes"):
                known = getattr(self, attribute)
                known.update({n: v for n, v in getattr(predictor, attribute, {}).items() if n not in known})

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict:
        outputs: dict = {}
        for predictor, names in zip(self.predictors, self.input_names, strict=True):
            available = {**inputs, **outputs}
            outputs = dict(predictor.predict({n: available[n] for n in names}))
        return outputs


def check_chunk_interfaces(package: str | os.PathLike, chunks: Sequence[str | os.PathLike]) -> None:
    """Chunks the Swift pipeline can run in place of `package`: the first reads only the package's inputs, each next
    one only those and its predecessor's outputs, and the last writes the package's outputs.

    Raises:
        ValueError: naming the chunk and the inputs it could not be given.
    """
    inputs, outputs, _ = package_interface(package)
    available = set(inputs)
    for chunk in chunks:
        wants, writes, _ = package_interface(chunk)
        missing = sorted(set(wants) - available)
        if missing:
            raise ValueError(f"{Path(chunk).name} reads {missing}: neither inputs of {Path(package).name} nor outputs "
                             "of the chunk before it")  # fmt: skip
        available = set(inputs) | set(writes)
    if set(writes) != set(outputs):
        raise ValueError(f"{Path(chunks[-1]).name} writes {writes}; {Path(package).name} writes {outputs}")


def _check_same_weights(package: str | os.PathLike, chunks: Sequence[str | os.PathLike]) -> None:
    """Every weight of `package` is in some chunk, equal bit for bit, and the chunks hold no other weight."""
    whole = StoredWeights(package)
    names = set(whole.names)
    for chunk in chunks:
        part = StoredWeights(chunk)
        foreign = sorted(set(part.names) - names)
        if foreign:
            raise ValueError(f"{Path(chunk).name} holds weights {package} does not: {foreign[:5]}")
        for name in part.names:
            a, b = whole.get(name), part.get(name)
            if a.shape != b.shape or not np.array_equal(a.view(np.uint16), b.view(np.uint16)):
                raise ValueError(f"{Path(chunk).name} changed weight {name!r}")
            names.discard(name)
    if names:
        raise ValueError(f"the chunks of {package} lost weights: {sorted(names)[:5]}")


def bisect_package(package: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Split a saved UNet package in two of about equal weight bytes (`coremltools.models.utils.bisect_model`), next
    to it as `names` (e.g. `UnetChunk1`, `UnetChunk2`), checked against it (`check_chunk_interfaces`, the same
    weights bit for bit); the package itself is left in place for the caller.

    Returns:
        The two chunk packages.
    """
    import coremltools as ct

    package = Path(package)
    with tempfile.TemporaryDirectory(dir=package.parent, prefix=".bisect-") as tmp:
        try:
            ct.models.utils.bisect_model(str(package), tmp, check_output_correctness=False)  # that check predicts
        except ValueError as e:  # e.g. a rank-0 tensor at the cut: "Rank-0 (input ...) is unsupported"
            raise UserError(f"coremltools' bisect_model could not split {package.name}: {e}") from e
        halves = [Path(tmp) / f"{package.stem}_chunk{i}.mlpackage" for i in (1, 2)]
        check_chunk_interfaces(package, halves)
        _check_same_weights(package, halves)
        chunks = [package.parent / f"{name}.mlpackage" for name in names]
        for half, chunk in zip(halves, chunks, strict=True):
            if chunk.exists():
                shutil.rmtree(chunk)
            shutil.move(str(half), chunk)
    return chunks
