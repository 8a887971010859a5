"""Core ML export: recipes applied by name, packages read back bit-exact, emulation equal to the simulation."""

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import coremltools as ct
import numpy as np
import pytest
import torch

from workbench.cli.main import main
from workbench.coreml import (
    EMULATION_LABEL,
    CoreMLUnavailableError,
    ExportConfig,
    attach_predictors,
    compress_model,
    coreml_pipeline,
    export_pipeline,
    export_wrapper,
    package_weights,
    palette_plan,
    palettized_weight_names,
)
from workbench.metrics import image_psnr
from workbench.models.generation import generate_images
from workbench.models.layers import compressible_layers
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from workbench.palettes.apply import palettized
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.recipes.recipe import PreAnalysis, Recipe, RecipeError, load_recipe

MIN_NUMEL = 2048
GEN = {"steps": 2, "height": 32, "width": 32}  # 16x16 latents: fast, same code path


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mixed_recipe(unet) -> dict[str, int]:
    """Every candidate layer of the UNet, at every width the reference uses (16 = float16 included).

    Layers under 10,000 weights (scikit-learn's k-means in coremltools and in `fit_palette`, slow at 64-256
    clusters) cycle through 1, 2, 4 and 16 bits; larger ones (exact 1-D k-means) through 1, 2, 4, 6, 8, 16.
    """
    small, large = (1, 2, 4, 16), (1, 2, 4, 6, 8, 16)
    recipe = {}
    for i, (name, layer) in enumerate(compressible_layers(unet, MIN_NUMEL).items()):
        widths = small if layer.weight.numel() < 10_000 else large
        recipe[name] = widths[i % len(widths)]
    return recipe


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    """The tiny SD UNet exported with a mixed-bit recipe read from a file in the reference's format."""
    pipe = _quiet(tiny_sd_pipeline())
    bits = mixed_recipe(pipe.unet)
    out = tmp_path_factory.mktemp("sd_export")
    # a reference-style pre-analysis file with two recipes; the one we ask for by name is applied
    PreAnalysis(
        model_version="tiny-sd",
        baselines={"original": 200.0},
        recipes={"recipe_other": {next(iter(bits)): 8}, "recipe_mixed": bits},
    ).save(out / "pre_analysis.json")
    recipe = load_recipe(out / "pre_analysis.json", "recipe_mixed")
    report = export_pipeline(pipe, out / "packages", ExportConfig(recipe=recipe), source="tiny-sd")
    return pipe, bits, report


def test_mixed_recipe_from_reference_file_is_bit_exact_for_every_layer(sd_export):
    pipe, bits, report = sd_export
    package = report.package("unet")
    verification = package.verification
    planned = {name: b for name, b in bits.items() if b != 16}
    # every layer the recipe palettizes, and only those, is stored palettized, at its own width
    assert {c.layer: c.nbits for c in verification.layers} == planned
    assert all(c.bit_exact for c in verification.layers), [c.layer for c in verification.layers if not c.bit_exact]
    assert verification.unexpected_palettized == ()
    assert verification.float16_layers >= len(bits) - len(planned) and verification.float16_exact == (
        verification.float16_layers
    )
    assert report.all_bit_exact and "ALL BIT-EXACT" in report.summary()
    # independent re-check straight from the package on disk
    stored = package_weights(package.path)
    layers = compressible_layers(pipe.unet, MIN_NUMEL)
    for name in list(planned)[:6]:
        ours = fit_palette(layers[name].weight, PaletteConfig(planned[name])).dense()
        theirs = stored["unet_" + name.replace(".", "_") + "_weight_to_fp16"]
        assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16)), name
    # palettization pays: 1-8 bits on most weights
    numel = {n: m.weight.numel() for n, m in layers.items()}
    assert package.bits_per_param == pytest.approx(sum(bits[n] * k for n, k in numel.items()) / sum(numel.values()))
    assert package.nbytes < 0.7 * package.float16_nbytes
    assert min(c.psnr_db for c in verification.layers if c.nbits == 8) > 35.0


def test_package_has_names_metadata_and_verification_json(sd_export):
    _, bits, report = sd_export
    package = report.package("unet")
    spec = ct.utils.load_spec(package.path)
    assert [i.name for i in spec.description.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in spec.description.output] == ["noise_pred"]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["source_model"] == "tiny-sd" and meta["recipe"] == "recipe_mixed" and meta["component"] == "unet"
    assert float(meta["bits_per_param"]) == pytest.approx(package.bits_per_param, abs=1e-4)
    assert "recipe_mixed" in spec.description.metadata.shortDescription
    saved = json.loads((Path(report.out_dir) / "verification.json").read_text())
    assert saved["all_bit_exact"] is True
    # the settings the export ran with, as `ExportConfig.to_dict` writes them
    settings = ExportConfig.from_dict(saved["settings"])
    assert settings.recipe.name == "recipe_mixed" and settings.recipe.bits == bits and settings.components == ("unet",)
    assert len(saved["packages"][0]["verification"]["layers"]) == sum(b != 16 for b in bits.values())
    assert set(report.layers_frame().columns) >= {"layer", "nbits", "bit_exact", "psnr_db"}
    assert report.to_frame().loc[0, "n_palettized"] == sum(b != 16 for b in bits.values())


def test_emulate_gives_the_torch_simulation_image(sd_export):
    pipe, bits, report = sd_export
    before = {n: m.weight.detach().clone() for n, m in compressible_layers(pipe.unet, MIN_NUMEL).items()}
    float_image = generate_images(pipe, "a red circle", seed=7, **GEN)
    with palettized(pipe.unet, bits):
        simulated = generate_images(pipe, "a red circle", seed=7, **GEN)
    with coreml_pipeline(pipe, report, backend="emulate") as emulated:
        assert emulated.label == EMULATION_LABEL and EMULATION_LABEL in str(emulated)
        assert len(emulated.loaded["unet"]) == sum(b != 16 for b in bits.values())
        image = generate_images(emulated, "a red circle", seed=7, **GEN)
    assert image.dtype == np.uint8 and np.array_equal(image, simulated)  # the same weights: the same pixels
    # the recipe does change the image (28 dB measured), far more than uint8 rounding would (+-1 everywhere: 48 dB)
    assert image_psnr(float_image, image) < 40.0
    for name, weight in before.items():  # restored exactly
        assert torch.equal(compressible_layers(pipe.unet, MIN_NUMEL)[name].weight, weight), name
    # include_float16: the float layers take the package's float16 rounding too
    with coreml_pipeline(pipe, report.out_dir, backend="emulate", include_float16=True) as emulated:
        layers = compressible_layers(pipe.unet, MIN_NUMEL)
        assert set(emulated.loaded["unet"]) >= set(layers)
        for name in [n for n, b in bits.items() if b == 16][:5]:
            assert torch.equal(layers[name].weight, before[name].half().float()), name


def test_coreml_backend_glue_reproduces_torch_with_stand_in_predictors():
    """The code that routes UNet / text encoder / VAE calls through `MLModel.predict`, minus the Core ML runtime."""
    pipe, twin = _quiet(tiny_sd_pipeline()), tiny_sd_pipeline()

    class Predictor:  # an MLModel stand-in: named numpy inputs -> named numpy outputs
        def __init__(self, wrapper):
            self.wrapper = wrapper

        @torch.no_grad()
        def predict(self, inputs):
            outs = self.wrapper(*(torch.from_numpy(v) for v in inputs.values()))
            outs = outs if isinstance(outs, tuple) else (outs,)
            return {name: o.numpy() for name, o in zip(self.wrapper.output_names, outs)}

    expected = generate_images(pipe, "a blue square", seed=1, **GEN)
    predictors = {c: (Predictor(export_wrapper(twin, c)), 2 if c == "unet" else 1) for c in ("unet", "text_encoder")}
    predictors["vae_decoder"] = (Predictor(export_wrapper(twin, "vae_decoder")), 1)
    with attach_predictors(pipe, predictors) as routed:
        image = generate_images(routed, "a blue square", seed=1, **GEN)
    np.testing.assert_array_equal(image, expected)
    assert "forward" not in vars(pipe.unet) and "decode" not in vars(pipe.vae)  # restored


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML prediction exists on macOS")
def test_coreml_backend_off_macos_names_emulate(sd_export):
    pipe, _, report = sd_export
    with pytest.raises(CoreMLUnavailableError, match="backend='emulate'"):
        coreml_pipeline(pipe, report, backend="coreml")
    with pytest.raises(ValueError, match="valid: emulate, coreml"):
        coreml_pipeline(pipe, report, backend="ane")


def test_recipe_naming_missing_layers_lists_them_with_the_closest_names():
    pipe = tiny_sd_pipeline()
    with pytest.raises(RecipeError, match=r"2 layers not in UNet2DConditionModel: 'down_blocks\.9\.conv' \(closest: "):
        palette_plan(pipe.unet, {"down_blocks.9.conv": 4, "mid_block.nope": 2, "conv_in": 8})
    with pytest.raises(RecipeError, match=r"'mid_block\.resnets\.0\.conv2x' \(closest: mid_block\.resnets\.0\.conv2"):
        palette_plan(pipe.unet, Recipe("r", {"mid_block.resnets.0.conv2x": 4}))
    with pytest.raises(ValueError, match="not both"):
        palette_plan(pipe.unet, {"conv_in": 8}, nbits=4)


def test_export_config_checks_its_settings_when_made():
    config = ExportConfig(nbits=4, components=["unet", "vae_decoder"], layers="mid_block.*")
    assert config.components == ("unet", "vae_decoder") and config.layers == ("mid_block.*",)
    assert config.recipe_label == "uniform_4bit" and ExportConfig().recipe_label == ""
    assert ExportConfig(recipe={"conv_in": 4}).recipe_label == "custom recipe"
    for settings, message in (
        ({"components": ["vae"]}, "valid: unet, text_encoder, text_encoder_2, vae_decoder"),
        ({"components": []}, "no components to export"),
        ({"recipe": {"conv_in": 4}, "nbits": 4}, "not both"),
        ({"recipe": {"conv_in": 4}, "components": ["vae_decoder"]}, "a recipe applies to the UNet"),
        ({"nbits": 5}, "unsupported nbits 5"),
        ({"nbits": "4"}, "nbits must be an integer"),
        ({"layout": "swift"}, "valid: apple, workbench"),
        ({"min_numel": -1}, "min_numel must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"recipe": 4}, "recipe must be a Recipe or a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            ExportConfig(**settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.nbits = 8


def test_export_config_round_trips_through_json():
    recipe = Recipe("mixed", {"conv_in": 4, "mid_block.resnets.0.conv1": "kmeans3", "conv_out": 16})
    for config in (
        ExportConfig(recipe=recipe, components=("unet", "text_encoder"), layers=("mid_block.*",), layout="workbench"),
        ExportConfig(nbits=6, min_numel=0, exclude=("*.conv2",), batch_size=2, verify=False),
        ExportConfig(),
    ):
        assert ExportConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # a mapping of configs comes back as a recipe of their keys
    grouped = PaletteConfig(4, granularity="per_grouped_channel", group_size=16)
    back = ExportConfig.from_dict(json.loads(json.dumps(ExportConfig(recipe={"conv_in": grouped}).to_dict())))
    assert back.recipe == Recipe("custom recipe", {"conv_in": grouped.key})
    with pytest.raises(ValueError, match="unknown export settings"):
        ExportConfig.from_dict({"nbit": 4})


def test_recipe_naming_weights_the_package_lacks_lists_them(sd_export):
    _, _, report = sd_export
    model = ct.models.MLModel(report.package("unet").path, skip_model_load=True)
    plan = {"conv_in": PaletteConfig(4), "down_blocks.7.conv": PaletteConfig(4), "up_blocks.9.proj": PaletteConfig(2)}
    with pytest.raises(ValueError, match=r"no weight for 2 recipe layers: down_blocks\.7\.conv, up_blocks\.9\.proj"):
        compress_model(model, plan, prefix="unet")


@pytest.mark.slow  # grouped and 3-bit palettes stay in `make test` through apply (test_coreml_apply.py)
def test_tiny_sdxl_unet_exports_and_compresses_with_grouped_and_3bit_palettes(tmp_path):
    pipe = tiny_sdxl_pipeline()
    layers = compressible_layers(pipe.unet, MIN_NUMEL)
    large = [name for name, layer in layers.items() if layer.weight.numel() >= 10_000]
    # a few layers at each kind of palette keeps k-means (coremltools' and ours) cheap; the conversion dominates
    recipe = {"conv_in": 6, large[0]: PaletteConfig(3), large[1]: 8, large[-1]: 4, "time_embedding.linear_1": 2}
    recipe[large[2]] = PaletteConfig(4, granularity="per_grouped_channel", group_size=16)
    recipe["add_embedding.linear_1"] = 4  # SDXL's text_time conditioning
    report = export_pipeline(pipe, tmp_path, ExportConfig(recipe=recipe))
    package = report.package("unet")
    assert package.deployment_target == "iOS18"  # grouped and 3-bit LUTs need it
    assert report.all_bit_exact and len(package.verification.layers) == len(recipe)
    assert palettized_weight_names(package.path) == {c.weight for c in package.verification.layers}
    spec = ct.utils.load_spec(package.path)
    assert [i.name for i in spec.description.input] == [  # Apple's layout and order
        "sample",
        "timestep",
        "encoder_hidden_states",
        "time_ids",
        "text_embeds",
    ]
    assert package.nbytes < package.float16_nbytes


def test_cli_export(tmp_path, capsys):
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert (
        main(["export", str(tmp_path / "model"), "--out", str(out), "--nbits", "4", "--components", "vae_decoder"])
        == 0
    )
    printed = capsys.readouterr().out
    assert str(out / "VAEDecoder.mlpackage") in printed and "4.00 bits/param" in printed  # Apple's layout
    assert "ALL BIT-EXACT" in printed and (out / "verification.json").exists()
    assert f"sh {out}/compile_for_swift.sh" in printed
    # bad input: one line on stderr, exit 2, before anything is converted
    for argv in (
        ["--nbits", "5"],
        ["--components", "unet,vae"],
        ["--recipe", str(tmp_path / "missing.json")],
        ["--recipe-name", "x"],
        ["--layout", "swift"],
    ):
        assert main(["export", str(tmp_path / "model"), "--out", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("workbench export: error:") and err.count("\n") == 1, err


def test_cli_export_of_a_recipe_naming_unknown_layers_is_one_line_with_the_closest_names(tmp_path, capsys):
    recipe = {"conv_in": 4, "mid_block.resnets.0.conv1x": 4, "up_blocks.7.conv": 8}
    PreAnalysis(model_version="tiny-sd", baselines={}, recipes={"typo": recipe}).save(tmp_path / "recipe.json")
    out = tmp_path / "out"
    assert main(["export", "tiny-sd", "--out", str(out), "--recipe", str(tmp_path / "recipe.json")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("workbench export: error: recipe 'typo' names 2 layers not in the model")
        and err.count("\n") == 1
    ), err
    assert "'mid_block.resnets.0.conv1x' (closest: mid_block.resnets.0.conv1" in err and "'up_blocks.7.conv'" in err
    assert not out.exists() or not any(out.iterdir())  # nothing converted, nothing written


def test_layer_patterns_narrow_the_unet_plan():
    from workbench.coreml import plan_export
    from workbench.models.layers import LayerNotFoundError

    pipe = tiny_sd_pipeline()
    everything = plan_export(pipe, ExportConfig(nbits=4, min_numel=30_000))[0].palette
    mid = plan_export(pipe, ExportConfig(nbits=4, min_numel=30_000, layers=["mid_block.*"], exclude=["*.conv2"]))
    assert set(mid[0].palette) == {n for n in everything if n.startswith("mid_block.") and not n.endswith(".conv2")}
    with pytest.raises(LayerNotFoundError, match="'mid_blok.*' matches none"):
        plan_export(pipe, ExportConfig(nbits=4, min_numel=30_000, layers=["mid_blok.*"]))


def test_an_export_that_would_run_out_of_memory_fails_first_with_the_need(tmp_path, capsys, monkeypatch):
    import psutil

    from workbench.coreml import ExportMemoryError, check_export_memory, plan_export

    plans = plan_export(tiny_sd_pipeline(), ExportConfig(nbits=4, min_numel=30_000))
    check_export_memory(plans, available=10**12)  # plenty: no error
    with pytest.raises(
        ExportMemoryError,
        match=r"exporting the unet needs about 0\.0 GB .* this machine has 0\.0 GB free. Run it on a machine",
    ):
        check_export_memory(plans, available=1000)
    # from the command line: one line, exit 2, nothing converted
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    out = tmp_path / "out"
    assert main(["export", "tiny-sd", "--out", str(out), "--nbits", "4", "--components", "unet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench export: error: exporting the unet needs about") and err.count("\n") == 1, err
    assert not list(out.glob("*.mlpackage"))
