"""The UNet converted a piece at a time and stitched, and chunked as Apple's Swift pipeline loads it.

The split must run diffusers' forward exactly (bit for bit in torch); a package stitched from many pieces must hold
the same weights and operations as one converted whole; a chunked UNet's two packages must declare the interface
the Swift pipeline feeds, and run in sequence to the unchunked output.
"""

from collections import Counter

import numpy as np
import pytest
import torch

from workbench.coreml import ExportConfig, coreml_pipeline, export_pipeline, load_program, package_weights
from workbench.coreml.chunks import ChunkedPredictor, chunk_pieces, emulate_chunks, package_interface
from workbench.coreml.layout import AppleUNet, apple_inputs, package_stems
from workbench.coreml.unet_split import UNetPiece, halves, pieces_by_size, unet_units
from workbench.errors import InvalidValueError
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

MANY_PIECES = 200_000  # bytes: every unit of a tiny UNet alone, or nearly


def _random_inputs(pipe, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {k: torch.randn(v.shape, generator=g) for k, v in apple_inputs(pipe, "unet").items()}
    inputs["timestep"] = torch.tensor([10.0, 700.0])
    return inputs


def _chain(unet, units, ranges, inputs):
    env = dict(inputs)
    for start, stop in ranges:
        piece = UNetPiece(unet, units, start, stop)
        env.update(zip(piece.output_names, piece(*(env[n] for n in piece.input_names)), strict=True))
    return env["noise_pred"]


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


@pytest.mark.parametrize("which", ["sd", "sdxl"])
@torch.no_grad()
def test_pieces_in_sequence_are_the_unet_bit_for_bit(which, request):
    pipe = request.getfixturevalue(which)
    unet, inputs = pipe.unet, _random_inputs(pipe)
    expected = AppleUNet(unet)(**inputs)
    units = unet_units(unet)
    for budget in (1, MANY_PIECES, 10**12):  # one unit per piece, a few units, the whole UNet
        ranges = pieces_by_size(units, unet, budget)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(units)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert torch.equal(_chain(unet, units, ranges, inputs), expected)
    assert len(pieces_by_size(units, unet, 1)) == len(units)


def test_pieces_respect_the_budget_and_halves_balance_bytes(sd):
    unet = sd.unet
    units = unet_units(unet)
    sizes = [u.nbytes(unet) for u in units]
    assert sum(sizes) == sum(p.numel() * 4 for p in unet.parameters())  # every parameter in exactly one unit
    for start, stop in pieces_by_size(units, unet, MANY_PIECES):
        assert stop - start == 1 or sum(sizes[start:stop]) <= MANY_PIECES
    split = halves(units, unet)
    best = min(abs(sum(sizes) - 2 * sum(sizes[:k])) for k in range(1, len(units)))
    assert abs(sum(sizes) - 2 * sum(sizes[:split])) == best


def test_freeu_is_refused_with_the_way_out(sd):
    sd.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        with pytest.raises(InvalidValueError, match="disable_freeu"):
            unet_units(sd.unet)
    finally:
        sd.unet.disable_freeu()


def _op_types(package) -> Counter:
    return Counter(op.op_type for op in load_program(package).functions["main"].operations if op.op_type != "const")


@pytest.mark.slow
def test_stitched_package_equals_one_converted_whole(sdxl, tmp_path):
    """Many pieces stitched: the same weights, bit for bit, and the same operations as one piece."""
    whole = export_pipeline(sdxl, tmp_path / "whole", ExportConfig(nbits=4, min_numel=0, piece_bytes=10**12))
    many = export_pipeline(sdxl, tmp_path / "many", ExportConfig(nbits=4, min_numel=0, piece_bytes=MANY_PIECES))
    assert whole.all_bit_exact and many.all_bit_exact
    a, b = package_weights(whole.package("unet").path), package_weights(many.package("unet").path)
    unet_weights = {name for name in a if name.startswith("unet_")}
    assert unet_weights == {name for name in b if name.startswith("unet_")} and len(unet_weights) > 100
    assert all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in unet_weights)
    assert _op_types(whole.package("unet").path) == _op_types(many.package("unet").path)


@pytest.mark.parametrize(
    ("which", "piece_bytes"),
    [pytest.param("sd", None, marks=pytest.mark.slow), pytest.param("sdxl", MANY_PIECES, marks=pytest.mark.slow)],
)
def test_chunked_unet_runs_in_sequence_to_the_unchunked_output(which, piece_bytes, request, tmp_path):
    # sd: one piece per chunk; sdxl: many. Both slow (an export each): `make test` keeps the torch-level split tests
    pipe = request.getfixturevalue(which)
    report = export_pipeline(pipe, tmp_path, ExportConfig(nbits=4, chunk_unet=True, piece_bytes=piece_bytes))
    chunks = report.paths()["unet"]
    assert [p.name for p in chunks] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert report.all_bit_exact and len(report.packages) == 2
    sizes = [p.nbytes for p in report.packages]
    assert max(sizes) < 0.75 * sum(sizes)  # about equal halves
    first_in, first_out, _ = package_interface(chunks[0])
    second_in, second_out, _ = package_interface(chunks[1])
    assert "sample" in first_in and second_out == ("noise_pred",)
    assert set(second_in) <= set(first_out) | set(apple_inputs(pipe, "unet"))  # what the Swift merge provides
    assert "UnetChunk1 UnetChunk2" in (tmp_path / "compile_for_swift.sh").read_text()
    inputs = _random_inputs(pipe, seed=1)
    with coreml_pipeline(pipe, tmp_path) as emulated:  # the folder: found as chunks, both chunks' weights loaded
        assert emulated.packages["unet"] == tuple(chunks)
        chained = emulate_chunks(chunk_pieces(pipe.unet, chunks, "apple"), inputs)["noise_pred"]
        with torch.no_grad():
            unchunked = AppleUNet(pipe.unet)(**inputs)
    assert torch.equal(chained, unchunked)


def test_chunked_predictor_feeds_each_chunk_as_the_swift_pipeline_does(sd):
    """Predictors standing for the two chunk packages (torch pieces behind a numpy predict), chained."""
    unet, inputs = sd.unet, _random_inputs(sd, seed=2)
    units = unet_units(unet)
    split = halves(units, unet)
    pieces = [UNetPiece(unet, units, 0, split), UNetPiece(unet, units, split, len(units))]

    class Predictor:
        def __init__(self, piece):
            self.piece = piece

        @torch.no_grad()
        def predict(self, feed):
            assert set(feed) == set(self.piece.input_names)  # exactly what the package declares
            out = self.piece(*(torch.from_numpy(feed[n]) for n in self.piece.input_names))
            return {n: t.numpy() for n, t in zip(self.piece.output_names, out, strict=True)}

    chained = ChunkedPredictor([Predictor(p) for p in pieces], [p.input_names for p in pieces])
    out = chained.predict({k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        assert np.array_equal(out["noise_pred"], AppleUNet(unet)(**inputs).numpy())


def test_chunk_names_per_layout():
    assert package_stems("unet", "apple", chunk=True) == ("UnetChunk1", "UnetChunk2")
    assert package_stems("unet", "workbench", chunk=True) == ("unet_chunk1", "unet_chunk2")
    with pytest.raises(InvalidValueError, match="only the UNet"):
        package_stems("text_encoder", "apple", chunk=True)
    with pytest.raises(InvalidValueError, match="chunk_unet"):
        ExportConfig(components=("text_encoder",), chunk_unet=True)
