"""Palettes given explicitly (`GivenPalettes`) and learned LUTs (`workbench.tune`): stored, simulated, exported and
read back exactly as given."""

import numpy as np
import pytest
import torch
from small_convert import convert_small

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
    model = compress_model(convert_small(net, ct.target.iOS18), recipe, names=names, module=net, given=given)
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


# ---------------------------------------------------------------------------------------------------------------
# learned LUTs


def test_the_gradient_of_a_lut_entry_is_the_finite_difference_of_the_loss():
    from workbench.tune.luts import _Gather

    generator = torch.Generator().manual_seed(0)
    lut = torch.randn(2, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    indices = torch.randint(0, 4, (2, 12), generator=generator, dtype=torch.uint8)
    probe = torch.randn(2, 12, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda t: (_Gather.apply(t, indices) * probe).sin().sum(), (lut,))


def test_learnable_luts_give_each_entry_the_sum_of_its_weights_gradients_and_restore_the_layer(pipe):
    from workbench.tune.luts import learnable_luts, learned_palettes

    given = GivenPalettes.fit(pipe.unet, _recipe(pipe.unet))
    name, palette = next((n, p) for n, p in given.items() if p.config == GROUPED)
    layer = get_layer(pipe.unet, name)
    original = layer.weight
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, layer.weight.shape[1], *([4, 4] if layer.weight.dim() == 4 else []), generator=generator)
    forward = torch.nn.functional.conv2d if layer.weight.dim() == 4 else torch.nn.functional.linear

    dense = torch.from_numpy(palette.dense().astype(np.float32)).requires_grad_(True)
    forward(x, dense).square().sum().backward()  # the weights' gradients, computed apart
    groups = palette.lut.shape[0]
    expected = torch.zeros(groups, palette.lut.shape[1], dtype=torch.float64)
    expected.scatter_add_(
        1, torch.from_numpy(palette.indices.reshape(groups, -1)).long(), dense.grad.reshape(groups, -1).double()
    )
    with learnable_luts(pipe.unet, GivenPalettes({name: palette})) as luts:
        forward(x, layer.weight).square().sum().backward()
        # float32 sums in another order: equal to 1e-5 of the largest entry's gradient
        scale = float(expected.abs().max())
        assert torch.allclose(luts[name].lut.grad.double(), expected, rtol=1e-5, atol=1e-5 * scale)
        assert learned_palettes(luts).digest == GivenPalettes({name: palette}).digest  # unchanged: no step taken
    assert layer.weight is original and type(layer) in (torch.nn.Linear, torch.nn.Conv2d)


# 16x16 pixels (8x8 latents): a tiny UNet call is cheap; the whole calibration set (4 samples) is the batch
TINY_TUNE = {"steps": 4, "lr": 0.01, "prompts": 2, "timesteps": 2, "sampling_steps": 3, "resolution": 16, "batch": 4}


@pytest.fixture(scope="module")
def tuned(pipe):
    """Two short tunes of the same recipe with the same seed, and the starting palettes."""
    from workbench.tune.config import TuneConfig
    from workbench.tune.learn import tune_luts

    recipe = _recipe(pipe.unet)
    config = TuneConfig(**TINY_TUNE, eval_every=2)
    prompts = ["a red circle", "a blue square"]
    first = tune_luts(pipe, recipe, config, prompts=prompts, progress=False)
    second = tune_luts(pipe, recipe, config, prompts=prompts, progress=False)
    return first, second, GivenPalettes.fit(pipe.unet, recipe)


def test_a_tune_is_deterministic_for_a_seed(tuned):
    first, second, start = tuned
    assert first.palettes.digest == second.palettes.digest and first.history == second.history
    assert first.palettes.digest != start.digest  # it learned something
    for name, p in first.palettes.items():
        assert np.array_equal(p.indices, start[name].indices)  # the cluster assignment is kept


def test_a_short_tune_lowers_the_distillation_loss_on_its_calibration_set(tuned):
    first, _, _ = tuned
    assert first.history[0][1] == first.start_loss and first.best_step > 0
    assert first.loss <= 0.985 * first.start_loss, f"{first.start_loss} -> {first.loss}"
    assert first.loss == min(loss for _, loss in first.history)


def test_tuned_luts_are_what_the_calibration_loss_measured(pipe, tuned):
    """The loss reported is the loss of the palettes returned (float16 LUTs as stored), not of float32 masters."""
    from workbench.tune.calibration import record_calibration
    from workbench.tune.learn import CALIBRATION_SEED_OFFSET, calibration_loss

    first, _, _ = tuned
    calibration = record_calibration(
        pipe, ["a red circle", "a blue square"], timesteps=2, seed=CALIBRATION_SEED_OFFSET, steps=3, resolution=16
    )
    with palettized(pipe.unet, first.palettes.configs, given=first.palettes):
        assert calibration_loss(pipe.unet, calibration, "guided") == pytest.approx(first.loss, rel=1e-5)


def test_tune_config_is_checked():
    from workbench.tune.config import TuneConfig

    with pytest.raises(InvalidValueError, match="loss='l1'"):
        TuneConfig(loss="l1")
    with pytest.raises(InvalidValueError, match="lr=0"):
        TuneConfig(lr=0)
    assert TuneConfig.from_dict(TuneConfig(steps=3).to_dict()) == TuneConfig(steps=3)


def test_cli_tune_rejects_bad_settings_before_loading_anything(tmp_path, capsys):
    from workbench.cli.main import main

    assert main(["tune", "--nbits", "2", "--out", str(tmp_path), "--lr", "5"]) == 2
    assert "lr=5.0 must be a number in (0, 1)" in capsys.readouterr().err
    assert main(["tune", "--nbits", "2", "--out", str(tmp_path), "--recipe-name", "x"]) == 2
    assert main(["export", "--palettes", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "given-palettes file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_tune_then_export_the_tuned_palettes_bit_exact(tmp_path):
    import json

    from workbench.cli.main import main
    from workbench.models.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    model, out = str(tmp_path / "model"), tmp_path / "tuned"
    settings = ["--steps", "2", "--prompts", "2", "--timesteps", "2", "--sampling-steps", "3", "--resolution", "16"]
    assert main(["tune", model, "--nbits", "2", "--min-numel", "20000", "--out", str(out), *settings]) == 0
    given = GivenPalettes.load(out / "palettes.npz")
    assert json.loads((out / "tune.json").read_text())["palettes_digest"] == given.digest
    assert main(["export", model, "--palettes", str(out / "palettes.npz"), "--out", str(tmp_path / "coreml")]) == 0
    report = json.loads((tmp_path / "coreml" / "verification.json").read_text())
    unet = next(p for p in report["packages"] if p["component"] == "unet")
    assert unet["verification"]["all_bit_exact"] and len(unet["verification"]["layers"]) == len(given)
