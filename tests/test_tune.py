"""Palettes given explicitly (`GivenPalettes`) and learned LUTs (`workbench.tune`): stored, simulated, exported and
read back exactly as given."""

import numpy as np
import pytest
import torch

from workbench.coreml import ExportConfig, export_pipeline, package_weights
from workbench.coreml.components import layer_weight_names
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers, get_layer
from workbench.palettes import GivenPalettes, Palette, PaletteConfig, palettized

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPED = PaletteConfig(3, granularity="per_grouped_channel", group_size=8)


def _recipe(unet) -> dict:
    """A mixed recipe over a few of the tiny UNet's layers: 2 and 4 bits per tensor, 3 bits grouped."""
    names = [n for n, m in compressible_layers(unet, 2048).items() if m.weight.shape[0] % 8 == 0]
    return {names[0]: PaletteConfig(2), names[1]: PaletteConfig(4), names[-1]: GROUPED, names[2]: PaletteConfig(2)}


def _moved(given: GivenPalettes) -> GivenPalettes:
    """Every LUT entry moved off its fitted value (as learning would), indices kept."""
    return GivenPalettes(
        {
            n: Palette((p.lut * np.float16(1.25) + np.float16(1e-3)).astype(np.float16), p.indices, p.config)
            for n, p in given.items()
        }
    )


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float16).view(np.uint16)


def test_given_palettes_round_trip_through_save_and_load_exactly(pipe, tmp_path):
    given = _moved(GivenPalettes.fit(pipe.unet, _recipe(pipe.unet)))
    loaded = GivenPalettes.load(given.save(tmp_path / "palettes.npz"))
    assert list(loaded) == list(given) and loaded.configs == given.configs and loaded.digest == given.digest
    for name, p in given.items():
        assert np.array_equal(_bits(loaded[name].lut), _bits(p.lut))
        assert loaded[name].indices.dtype == np.uint8 and np.array_equal(loaded[name].indices, p.indices)
    assert given.bits_per_param() == pytest.approx(
        sum(p.config.nbits * p.indices.size for p in given.values()) / sum(p.indices.size for p in given.values())
    )
    with pytest.raises(InvalidValueError, match="not a given-palettes file"):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        GivenPalettes.load(tmp_path / "other.npz")


def test_given_palettes_are_checked(pipe):
    given = GivenPalettes.fit(pipe.unet, _recipe(pipe.unet))
    name, p = next(iter(given.items()))
    with pytest.raises(InvalidValueError, match="LUT must be float16"):
        GivenPalettes({name: Palette(p.lut.astype(np.float32), p.indices, p.config)})
    with pytest.raises(InvalidValueError, match="indices must be uint8 below 4"):
        GivenPalettes({name: Palette(p.lut, p.indices + np.uint8(4), p.config)})
    with pytest.raises(InvalidValueError, match="the recipe asks for kmeans4, the given palette is kmeans2"):
        given.palette(name, p.indices.shape, PaletteConfig(4))
    with pytest.raises(InvalidValueError, match="leaves it float16"):
        given.check_plan({})


def test_palettized_uses_the_given_palettes_and_restores_exactly(pipe):
    given = _moved(GivenPalettes.fit(pipe.unet, _recipe(pipe.unet)))
    before = {n: get_layer(pipe.unet, n).weight.detach().clone() for n in given}
    with palettized(pipe.unet, given.configs, given=given):
        for name in given:
            now = get_layer(pipe.unet, name).weight.detach()
            assert torch.equal(now, torch.from_numpy(given.dense(name).astype(np.float32)))
    for name, weight in before.items():
        assert torch.equal(get_layer(pipe.unet, name).weight, weight)


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.Conv2d(64, 32, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


def _convert(net, target):
    import warnings

    import coremltools as ct

    x = torch.zeros(1, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            torch.jit.trace(net, x),
            inputs=[ct.TensorType(name="x", shape=x.shape)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=target,
        )


def test_core_ml_stores_the_given_palettes_and_verify_proves_it(tmp_path):
    import coremltools as ct

    from workbench.coreml import compress_model, coreml_weight_names, verify_package

    net = TwoConvs().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    recipe = {"stem": PaletteConfig(2), "head": GROUPED}
    given = _moved(GivenPalettes.fit(net, recipe))
    names = coreml_weight_names(compressible_layers(net, min_numel=0))
    model = compress_model(_convert(net, ct.target.iOS18), recipe, names=names, module=net, given=given)
    model.save(str(tmp_path / "net.mlpackage"))
    stored = package_weights(tmp_path / "net.mlpackage")
    for name in given:
        assert np.array_equal(_bits(stored[names[name]]).reshape(-1), _bits(given.dense(name)).reshape(-1)), name
    ours = verify_package(tmp_path / "net.mlpackage", net, recipe, component="net", names=names, given=given)
    assert ours.all_bit_exact
    fitted = verify_package(tmp_path / "net.mlpackage", net, recipe, component="net", names=names)
    assert not any(c.bit_exact for c in fitted.layers)  # the read-back tells the given palettes from fitted ones


@pytest.mark.slow
def test_an_export_with_given_palettes_stores_exactly_them(pipe, tmp_path):
    recipe = _recipe(pipe.unet)
    given = _moved(GivenPalettes.fit(pipe.unet, recipe))
    report = export_pipeline(pipe, tmp_path, ExportConfig(recipe=recipe), given=given)
    package = report.package("unet")
    assert report.all_bit_exact and len(package.verification.layers) == len(given)
    stored, names = package_weights(package.path), layer_weight_names(given, "unet")
    for name in given:  # what Core ML decompresses is the given palette, not one fitted to the weight
        assert np.array_equal(_bits(stored[names[name]]).reshape(-1), _bits(given.dense(name)).reshape(-1)), name

    # the read-back proves it: the same package checked against the fitted palettes fails on every given layer
    from workbench.coreml import verify_package

    fitted = verify_package(package.path, pipe.unet, recipe, component="unet", prefix="unet")
    assert not any(c.bit_exact for c in fitted.layers)
