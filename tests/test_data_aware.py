"""Data-aware palettes: importances from calibration, configs and targets, recipes of config keys, exact export."""

import numpy as np
import pytest
import torch
from torch import nn

from workbench.errors import InvalidValueError
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import SUPPORTED_NBITS, PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.palettes.importance import (
    Importance,
    capture_inputs,
    collect_importance,
    expand_importance,
    layer_output_mse,
    palette_error,
)
from workbench.palettes.size import layer_nbytes
from workbench.recipes.recipe import PreAnalysis, Recipe, RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def net(seeded_net):
    """Convs (one grouped) and a linear."""
    layers = (
        nn.Conv2d(8, 64, 3, padding=1),
        nn.Conv2d(64, 64, 3, groups=4),
        nn.Flatten(1, 3),
        nn.Linear(64 * 6 * 6, 256),
    )
    return seeded_net(*layers)


def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.1, 3.0, 8).view(1, 8, 1, 1)  # input channels of very different energy
    return [torch.randn(2, 8, 8, 8, generator=g) * scale for _ in range(n)]


def _run(net, inputs):
    return lambda: [net(x) for x in inputs]


@torch.no_grad()
def test_importance_is_the_input_channel_second_moment_and_hooks_go_away(net):
    inputs = _inputs()
    names = {"0": net[0], "1": net[1], "3": net[3]}
    importance = collect_importance(net, names, _run(net, inputs))
    assert all(not layer._forward_pre_hooks for layer in net)
    x = torch.cat(inputs).double()
    expected = x.square().mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(importance.channels("0"), expected, rtol=1e-12)
    assert importance.for_weight("0", net[0].weight.shape).shape == net[0].weight.shape
    # a grouped conv: output channel o reads input channels of its own group
    h = torch.cat([net[0](xi) for xi in inputs]).double()
    moments = h.square().mean(dim=(0, 2, 3)).numpy()
    full = importance.for_weight("1", net[1].weight.shape)
    np.testing.assert_allclose(full[17, :, 0, 0], moments[16:32], rtol=1e-9)  # output 17 is in group 1
    flat = torch.cat([net[2](net[1](net[0](xi))) for xi in inputs]).double()
    np.testing.assert_allclose(importance.channels("3"), flat.square().mean(0).numpy(), rtol=1e-9)
    again = collect_importance(net, names, _run(net, inputs))
    assert again.digest == importance.digest  # deterministic
    with pytest.raises(RuntimeError, match="never called"):
        collect_importance(net, {"extra": nn.Linear(3, 3)}, _run(net, inputs))


def test_importance_file_round_trip_and_clear_errors(net, tmp_path):
    importance = Importance({"0": expand_importance(net[0], np.arange(8.0)), "3": np.ones((1, 2304))})
    path = importance.save(tmp_path / "importance.npz")
    loaded = Importance.load(path)
    assert loaded.digest == importance.digest and set(loaded.arrays) == {"0", "3"}
    assert np.array_equal(loaded.channels("0"), np.arange(8.0))
    with pytest.raises(InvalidValueError, match="no importance for layer '4'.*closest"):
        loaded.for_weight("4", (3, 3))
    with pytest.raises(InvalidValueError, match="does not fit its weight"):
        loaded.for_weight("0", (64, 9, 3, 3))
    with pytest.raises(InvalidValueError, match="not found"):
        Importance.load(tmp_path / "missing.npz")
    with pytest.raises(InvalidValueError, match=">= 0"):
        Importance({"0": -np.ones(3)})


def test_data_aware_palette_lowers_the_weighted_error_and_the_output_error(net):
    inputs = _inputs()
    importance = collect_importance(net, {"0": net[0]}, _run(net, inputs))
    weight, imp = net[0].weight, importance.for_weight("0", net[0].weight.shape)
    captured = capture_inputs(net, ["0"], _run(net, inputs))["0"]
    assert len(captured) == 3 and torch.equal(captured[0], inputs[0])
    assert layer_output_mse(net[0], captured, weight) == 0.0
    for nbits in (2, 3, 4):
        plain = fit_palette(weight, PaletteConfig(nbits))
        aware = fit_palette(weight, PaletteConfig(nbits, "wkmeans"), importance=imp)
        # optimal for the weighted error over the float16 values, so below plain k-means' weighted error
        w16 = weight.detach().half().double().numpy()
        assert palette_error(w16, aware, imp) <= palette_error(w16, plain, imp)
        assert layer_output_mse(net[0], captured, aware.dense()) < layer_output_mse(net[0], captured, plain.dense())
    assert palette_error(weight, PaletteConfig(4, "wkmeans"), imp) == palette_error(weight, aware, imp)
    dense = fit_palette(weight, PaletteConfig(4)).dense().astype(np.float64)
    w = weight.detach().double().numpy()
    assert palette_error(weight, PaletteConfig(4)) == pytest.approx(np.sum((w - dense) ** 2), rel=1e-12)
    with pytest.raises(InvalidValueError, match="needs per-weight importances"):
        fit_palette(weight, PaletteConfig(4, "wkmeans"))


def test_uniform_importance_gives_the_exact_plain_kmeans():
    weight = torch.randn(64, 400, generator=torch.Generator().manual_seed(3)) * 0.02  # groups >= 10,000 weights
    for cfg in (PaletteConfig(4), PaletteConfig(3, granularity="per_grouped_channel", group_size=32)):
        aware = PaletteConfig(cfg.nbits, "wkmeans", cfg.granularity, cfg.group_size)
        a, b = fit_palette(weight, cfg), fit_palette(weight, aware, importance=np.ones((1, 400)))
        assert np.array_equal(a.lut.view(np.uint16), b.lut.view(np.uint16)) and np.array_equal(a.indices, b.indices)


def test_config_keys_targets_and_exact_bytes():
    per_tensor = [PaletteConfig(n, mode) for mode in ("kmeans", "wkmeans") for n in SUPPORTED_NBITS]
    configs = per_tensor + [
        PaletteConfig(c.nbits, c.mode, "per_grouped_channel", g) for c in per_tensor for g in (8, 16)
    ]
    assert len({c.key for c in configs}) == len(configs) == 36
    assert all(PaletteConfig.from_key(c.key) == c for c in configs)
    # iOS17 stores per-tensor LUTs of 1, 2, 4, 6 or 8 bits; grouped and 3-bit ones need iOS18
    ios17 = {c.key for c in configs if not c.needs_ios18}
    assert ios17 == {f"{mode}{n}" for mode in ("kmeans", "wkmeans") for n in (1, 2, 4, 6, 8)}
    assert "wkmeans3_g16" in {c.key for c in configs} and PaletteConfig.from_key("wkmeans3_g16").needs_ios18
    for bad in ("kmeans5", "kmeans", "median4", "kmeans4_g0", "4"):
        with pytest.raises(InvalidValueError):
            PaletteConfig.from_key(bad)
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for cfg in (PaletteConfig(3, "wkmeans", "per_grouped_channel", 16), PaletteConfig(6)):
        palette = fit_palette(weight, cfg, importance=np.ones((1, 48)))
        assert palette.nbytes == layer_nbytes(64 * 48, 64, cfg) == -(-64 * 48 * cfg.nbits // 8) + palette.lut.size * 2


def test_cache_and_palettized_fit_data_aware_palettes_with_their_importance(net):
    inputs = _inputs()
    importance = collect_importance(net, ["0", "3"], _run(net, inputs))
    recipe = {"0": "wkmeans4", "3": "wkmeans2_g16"}
    expected = {
        n: fit_palette(
            net[int(n)].weight,
            PaletteConfig.from_key(k),
            importance=importance.for_weight(n, net[int(n)].weight.shape),
        ).dense()
        for n, k in recipe.items()
    }
    cache = PaletteCache(importance=importance)
    for kwargs in ({"importance": importance}, {"cache": cache}):
        with palettized(net, recipe, **kwargs):
            for n in recipe:
                assert np.array_equal(net[int(n)].weight.detach().half().numpy(), expected[n]), (n, kwargs)
    assert cache.fits == 2 and all(key[2] == importance.digest for key in cache._palettes)
    with pytest.raises(ValueError, match="PaletteCache"):
        with palettized(net, recipe, cache=PaletteCache(), importance=importance):
            pass


def test_recipes_carry_config_keys_and_say_their_target():
    recipe = Recipe("r", {"a": 4, "b": "wkmeans3", "c": "kmeans4_g16", "d": 16})
    assert recipe.configs == {
        "a": PaletteConfig(4),
        "b": PaletteConfig(3, "wkmeans"),
        "c": PaletteConfig(4, granularity="per_grouped_channel", group_size=16),
    }
    assert recipe.needs_ios18 and recipe.target == "iOS18" and recipe.needs_importance
    plain = Recipe("p", {"a": 4, "b": 6})
    assert not plain.needs_ios18 and plain.target == "iOS17" and not plain.needs_importance
    assert plain.bits == {"a": 4, "b": 6} and Recipe("q", {"a": "wkmeans4"}).target == "iOS17"
    assert Recipe("k", {"a": "kmeans4", "b": "kmeans3_g8"}).bits == {"a": 4, "b": "kmeans3_g8"}  # Apple's ints
    numels = {"a": 100, "b": 100, "c": 100, "d": 100}
    assert recipe.bits_per_param(numels) == (4 + 3 + 4 + 16) / 4
    with pytest.raises(RecipeError, match="unsupported palette config key 'kmeans5'.*config key"):
        Recipe("bad", {"a": "kmeans5"})
    analysis = PreAnalysis.from_dict({"recipes": {"r": dict(recipe.bits)}})
    assert analysis.recipe("r").bits == {"a": 4, "b": "wkmeans3", "c": "kmeans4_g16", "d": 16}


@pytest.mark.slow  # converts the tiny UNet (15-70 s on a shared 2-core machine)
def test_cli_exports_a_data_aware_recipe_bit_exact(pipe, tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.models.layers import compressible_layers
    from workbench.sweep.probe import OneStepProbe

    layers = compressible_layers(pipe.unet, 2048)
    large = [n for n, m in layers.items() if m.weight.numel() >= 10_000]
    probe = OneStepProbe(pipe, ["a red circle"], seed=0)
    importance = collect_importance(pipe.unet, layers, probe)
    importance.save(tmp_path / "importance.npz")
    bits = {large[0]: "wkmeans4", large[1]: "wkmeans3_g8", large[2]: "kmeans2_g16", large[3]: 6}
    small = next(n for n, m in layers.items() if m.weight.numel() < 10_000)
    bits[small] = "wkmeans2"  # a small layer: no scikit-learn on the data-aware path
    Recipe("recipe_data_aware", bits).save(tmp_path / "recipe.json")
    pipe.save_pretrained(tmp_path / "model")
    argv = [
        "export",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "out"),
        "--recipe",
        str(tmp_path / "recipe.json"),
    ]
    assert main(argv) == 2 and "--importance" in capsys.readouterr().err  # fails before converting
    assert main([*argv, "--importance", str(tmp_path / "importance.npz")]) == 0
    printed = capsys.readouterr().out
    assert "ALL BIT-EXACT" in printed and "iOS18" in printed and f"{len(bits)}/{len(bits)} palettized" in printed
