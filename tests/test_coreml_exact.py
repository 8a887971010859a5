"""The simulation is the shipped model: Core ML's palettized weights equal ours, bit for bit."""

import shutil
import warnings

import coremltools as ct
import numpy as np
import pytest
import torch
from small_convert import convert_small
from torch import nn

from workbench.coreml import coreml_weight_names, package_weights, palettized_weight_names, verify_package
from workbench.models.layers import compressible_layers
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.threads import sklearn_single_thread

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(nn.Module):
    """Convs and linears on both sides of coremltools' 10,000-element k-means switch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 64, 3, padding=1)  # 4,608 weights: scikit-learn path
        self.block = nn.ModuleList([nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 128, 1)])  # 36,864 / 8,192
        self.head = nn.Linear(128, 256)  # 32,768: exact 1-D path
        self.out = nn.Linear(256, 64)  # 16,384

    def forward(self, x):
        for layer in (self.stem, *self.block):
            x = torch.relu(layer(x))
        return self.out(torch.relu(self.head(x.mean((2, 3)))))


def _small_net():
    net = SmallNet().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


RECIPES = {
    "per_tensor": {
        name: PaletteConfig(nbits)
        for name, nbits in zip(["stem", "block.0", "block.1", "head", "out"], [4, 6, 2, 8, 1])
    },
    "per_tensor_3bit": {name: PaletteConfig(3) for name in ["stem", "block.0", "head"]},
    "per_tensor_1bit": {name: PaletteConfig(1) for name in ["stem", "block.0", "block.1", "head", "out"]},
    "grouped": {
        name: PaletteConfig(nbits, granularity="per_grouped_channel", group_size=16)
        for name, nbits in zip(["stem", "block.0", "block.1", "head", "out"], [2, 3, 4, 6, 8])
    },
    "uniform": {name: PaletteConfig(4, mode="uniform") for name in ["stem", "block.0", "head"]},
}


@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_coreml_package_weights_equal_the_simulation(recipe_name, tmp_path):
    recipe = RECIPES[recipe_name]
    net = _small_net()
    ios18 = any(cfg.needs_ios18 for cfg in recipe.values())
    model = convert_small(net, ct.target.iOS18 if ios18 else ct.target.iOS17)
    layers = compressible_layers(net, min_numel=0)
    names = coreml_weight_names(layers)
    config = ct.optimize.coreml.OptimizationConfig(
        op_name_configs={names[layer]: cfg.to_coreml() for layer, cfg in recipe.items()}
    )
    # scikit-learn's k-means (tensors under 10,000 weights) on one thread, as `fit_palette` and the export run it:
    # its LUTs change in their last bits with the OpenMP thread count
    with warnings.catch_warnings(), sklearn_single_thread():
        warnings.simplefilter("ignore")
        compressed = ct.optimize.coreml.palettize_weights(model, config)
    path = tmp_path / "net.mlpackage"
    compressed.save(str(path))

    stored = package_weights(path)  # read back from disk and decompressed
    assert palettized_weight_names(path) == {names[layer] for layer in recipe}
    for layer, cfg in recipe.items():
        ours = fit_palette(layers[layer].weight, cfg).dense()
        theirs = stored[names[layer]]
        assert theirs.dtype == np.float16 and theirs.shape == ours.shape
        assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16)), f"{layer} ({cfg.key}) differs"
    for layer in set(layers) - set(recipe):  # left float16
        expected = layers[layer].weight.detach().half().numpy()
        assert np.array_equal(stored[names[layer]], expected), layer


DATA_AWARE = {
    "per_tensor": {
        name: PaletteConfig(n, "wkmeans") for name, n in zip(["stem", "block.0", "head", "out"], [4, 2, 8, 1])
    },
    "grouped_3bit": {
        "stem": PaletteConfig(3, "wkmeans"),
        "block.0": PaletteConfig(4, "wkmeans", "per_grouped_channel", 16),
        "block.1": PaletteConfig(2, "wkmeans", "per_grouped_channel", 32),
        "head": PaletteConfig(6, "wkmeans", "per_grouped_channel", 8),
    },
}


@pytest.mark.parametrize("recipe_name", list(DATA_AWARE))
def test_data_aware_palettes_are_stored_as_fitted(recipe_name, tmp_path):
    from workbench.coreml.explicit_lut import explicit_lut_config
    from workbench.palettes.importance import expand_importance

    recipe = DATA_AWARE[recipe_name]
    net = _small_net()
    ios18 = any(cfg.needs_ios18 for cfg in recipe.values())
    model = convert_small(net, ct.target.iOS18 if ios18 else ct.target.iOS17)
    layers = compressible_layers(net, min_numel=0)
    names = coreml_weight_names(layers)
    rng = np.random.default_rng(0)
    importance = {}
    for name in recipe:  # skewed, with some input channels of no importance at all
        moments = rng.gamma(0.3, 1.0, layers[name].weight.shape[1])
        moments[rng.random(moments.size) < 0.1] = 0.0
        importance[name] = expand_importance(layers[name], moments)
    config = ct.optimize.coreml.OptimizationConfig(
        op_name_configs={
            names[n]: explicit_lut_config(layers[n].weight, cfg, importance[n]) for n, cfg in recipe.items()
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = ct.optimize.coreml.palettize_weights(model, config)
    path = tmp_path / "net.mlpackage"
    compressed.save(str(path))
    stored = package_weights(path)
    assert palettized_weight_names(path) == {names[layer] for layer in recipe}
    for layer, cfg in recipe.items():
        palette = fit_palette(layers[layer].weight, cfg, importance=importance[layer])
        plain = fit_palette(layers[layer].weight, PaletteConfig(cfg.nbits, "kmeans", cfg.granularity, cfg.group_size))
        theirs = stored[names[layer]]
        assert np.array_equal(palette.dense().view(np.uint16), theirs.view(np.uint16)), f"{layer} ({cfg.key})"
        assert not np.array_equal(palette.dense(), plain.dense()), "data-aware palettes differ from plain ones"


# ---------------------------------------------------------------------------------------------------------------
# `verify_package` must say so when a package is not what the torch model and plan make


PLAN = {"stem": PaletteConfig(4), "block.0": PaletteConfig(2), "head": PaletteConfig(8)}  # block.1, out: float16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(SmallNet, its Core ML weight names, a package of it palettized by `PLAN` and saved)."""
    net = _small_net()
    names = coreml_weight_names(compressible_layers(net, min_numel=0))
    config = ct.optimize.coreml.OptimizationConfig(
        op_name_configs={names[layer]: cfg.to_coreml() for layer, cfg in PLAN.items()}
    )
    with warnings.catch_warnings(), sklearn_single_thread():
        warnings.simplefilter("ignore")
        compressed = ct.optimize.coreml.palettize_weights(convert_small(net, ct.target.iOS17), config)
    path = tmp_path_factory.mktemp("verify") / "net.mlpackage"
    compressed.save(str(path))
    return net, names, path


def _verify(path, net, names, plan=PLAN):
    return verify_package(path, net, plan, component="net", names=names)


def _exact(verification) -> dict[str, bool]:
    return {c.layer: c.bit_exact for c in verification.layers}


def test_verify_package_passes_the_package_it_was_made_from(saved):
    net, names, path = saved
    verification = _verify(path, net, names)
    assert _exact(verification) == dict.fromkeys(PLAN, True)
    assert verification.float16_layers == 2 and verification.float16_exact == 2 and verification.all_bit_exact


def test_verify_package_reports_a_layer_planned_at_another_width(saved):
    net, names, path = saved
    verification = _verify(path, net, names, {**PLAN, "stem": PaletteConfig(6)})  # stored at 4 bits
    assert _exact(verification) == {"stem": False, "block.0": True, "head": True}
    assert not verification.all_bit_exact
    grouped = {**PLAN, "head": PaletteConfig(8, granularity="per_grouped_channel", group_size=16)}
    assert _exact(_verify(path, net, names, grouped))["head"] is False


def test_verify_package_reports_another_seeds_weights(saved):
    _, names, path = saved
    other = _small_net()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    verification = _verify(path, other, names)
    assert _exact(verification) == dict.fromkeys(PLAN, False)
    assert verification.float16_exact == 0 and not verification.all_bit_exact


def test_verify_package_reports_one_changed_torch_weight(saved):
    net, names, path = saved
    for layer, index in [("out", (3, 5)), ("head", (7, 11))]:  # a float16 layer, a palettized one
        changed = _small_net()
        with torch.no_grad():
            changed.get_submodule(layer).weight[index] = 1.0  # 20 sigma: its own float16 value, its own cluster
        verification = _verify(path, changed, names)
        assert not verification.all_bit_exact, layer
        if layer == "out":
            assert verification.float16_exact == 1 and all(_exact(verification).values())
        else:
            assert _exact(verification) == {"stem": True, "block.0": True, "head": False}


def test_verify_package_reports_a_palettized_layer_the_plan_does_not_name(saved):
    net, names, path = saved
    verification = _verify(path, net, names, {k: v for k, v in PLAN.items() if k != "head"})
    assert verification.unexpected_palettized == (names["head"],) and not verification.all_bit_exact


def _tamper(path, tmp_path, old: bytes, new: bytes):
    """A copy of the package at `path` whose weight file has `old` (found exactly once) replaced by `new`."""
    copy = tmp_path / "tampered.mlpackage"
    shutil.copytree(path, copy)
    (weights,) = (copy / "Data" / "com.apple.CoreML" / "weights").glob("*.bin")
    data = weights.read_bytes()
    assert data.count(old) == 1, "the bytes to tamper with must be found once"
    weights.write_bytes(data.replace(old, new))
    return copy


def test_verify_package_reports_a_tampered_float16_weight(saved, tmp_path):
    net, names, path = saved
    stored = net.out.weight.detach().half().numpy().copy()
    tampered = stored.copy()
    tampered.flat[100] = -tampered.flat[100]  # one sign bit
    copy = _tamper(path, tmp_path, stored.tobytes(), tampered.tobytes())
    verification = _verify(copy, net, names)
    assert verification.float16_layers == 2 and verification.float16_exact == 1
    assert all(_exact(verification).values()) and not verification.all_bit_exact


def test_verify_package_reports_a_tampered_palette(saved, tmp_path):
    net, names, path = saved
    lut = fit_palette(net.head.weight, PLAN["head"]).lut.copy()  # 256 float16 values, stored as the LUT
    tampered = lut.copy()
    tampered.flat[0] = np.nextafter(tampered.flat[0], np.float16(0))  # one value moved by one ulp
    copy = _tamper(path, tmp_path, lut.tobytes(), tampered.tobytes())
    verification = _verify(copy, net, names)
    assert _exact(verification) == {"stem": True, "block.0": True, "head": False}
    assert not verification.all_bit_exact


@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_the_export_hands_over_the_palettes_core_ml_would_fit(recipe_name, tmp_path):
    """`compress_model` with the torch module (what an export does: every palette fitted once, by `fit_palette`,
    and stored as fitted) writes exactly the package Core ML's own k-means and uniform fits write."""
    from workbench.coreml.compress import compress_model

    recipe = RECIPES[recipe_name]
    net = _small_net()
    model = convert_small(net, ct.target.iOS18 if any(cfg.needs_ios18 for cfg in recipe.values()) else ct.target.iOS17)
    stored = {}
    for mode, module in (("coreml", None), ("explicit", net)):
        path = tmp_path / f"{mode}.mlpackage"
        compress_model(model, recipe, prefix=None, names=coreml_weight_names(recipe), module=module).save(str(path))
        stored[mode] = (package_weights(path), palettized_weight_names(path))
    (theirs, their_names), (ours, our_names) = stored["coreml"], stored["explicit"]
    assert our_names == their_names == set(coreml_weight_names(recipe).values())
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert np.array_equal(theirs[name].view(np.uint16), ours[name].view(np.uint16)), name


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_unpack_indices_equals_coremltools(nbits):
    """The verifier's unpacking of stored indices is coremltools' own, for every width and for lengths that end
    mid-byte and mid-triple."""
    from coremltools.optimize._utils import pack_elements_into_bits, restore_elements_from_packed_bits

    from workbench.coreml.verify import unpack_indices

    rng = np.random.default_rng(nbits)
    for count in (1, 7, 8, 9, 24, 1001, 4096 + 5):
        indices = rng.integers(0, 1 << nbits, count, dtype=np.uint8)
        packed = pack_elements_into_bits(indices, nbits)
        ours = unpack_indices(packed, nbits, count)
        assert np.array_equal(ours, restore_elements_from_packed_bits(packed, nbits, count))
        assert np.array_equal(ours, indices)
