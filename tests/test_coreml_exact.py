"""The simulation is the shipped model: Core ML's palettized weights equal ours, bit for bit."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from workbench.coreml import coreml_weight_names, package_weights, palettized_weight_names
from workbench.models.layers import compressible_layers
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.threads import sklearn_single_thread

ct = pytest.importorskip("coremltools")
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


def _convert(net, target):
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
    model = _convert(net, ct.target.iOS18 if ios18 else ct.target.iOS17)
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
    model = _convert(net, ct.target.iOS18 if ios18 else ct.target.iOS17)
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
