"""Applying recipes to Core ML packages converted elsewhere (matched by content), and Apple's package layout."""

import subprocess
import warnings
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
from torch import nn

from workbench.coreml import package_weights
from workbench.coreml.apply import (
    DeploymentTargetError,
    PackageMismatchError,
    apply_recipe,
    canonical_weight,
    content_key,
)
from workbench.coreml.components import weight_layers
from workbench.coreml.layout import (
    COMPILE_SCRIPT,
    TOKENIZER_FILES,
    check_layout,
    host_dtype,
    layout_inputs,
    layout_wrapper,
    write_compile_script,
)
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette

pytestmark = pytest.mark.usefixtures("one_thread")


class ForeignUNet(nn.Module):
    """Another converter's view of (some layers of) a UNet: each layer under a name of its own (`w0`, `w1`, ...),
    Linear layers stored as 1x1 convolutions (Apple's `linear_to_conv2d_map`), each applied to a slice of one input."""

    def __init__(self, unet: nn.Module, names: list[str]):
        super().__init__()
        self.convs = nn.ModuleDict()
        layers = weight_layers(unet)
        for i, layer in enumerate(layers[name] for name in names):
            w = layer.weight.detach()
            w = w[:, :, None, None] if w.ndim == 2 else w  # (out, in) -> (out, in, 1, 1)
            conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
            conv.weight.data = w.clone()
            self.convs[f"w{i}"] = conv
        self.in_max = max(c.in_channels for c in self.convs.values())
        self.k_max = max(c.kernel_size[0] for c in self.convs.values())

    def forward(self, x):
        sums = [c(x[:, : c.in_channels, : c.kernel_size[0], : c.kernel_size[1]]).sum() for c in self.convs.values()]
        return torch.stack(sums).sum()


def foreign_package(unet: nn.Module, path, names: list[str], target: str = "iOS17"):
    """Convert `ForeignUNet(unet, names)` to a float16 package at `path`; returns the path."""
    net = ForeignUNet(unet, names).eval()
    x = torch.zeros(1, net.in_max, net.k_max, net.k_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(
            torch.jit.trace(net, x),
            inputs=[ct.TensorType(name="x", shape=x.shape)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, target),
        )
    model.save(str(path))
    return path


def subset(unet: nn.Module, n: int = 24) -> list[str]:
    """Every `len // n`-th Linear/Conv2d layer over 2048 weights (Linear and Conv2d, both k-means paths): a
    package of these converts in seconds."""
    names = list(compressible_layers(unet, 2048))
    return names[:: max(1, len(names) // n)]


def mixed_bits(unet: nn.Module, names: list[str]) -> dict[str, int]:
    """Widths cycling through 1, 2, 4, 6, 8 and 16 (float16); layers under 10,000 weights (scikit-learn's k-means,
    slow at 64-256 clusters) through 1, 2, 4, 16."""
    layers = weight_layers(unet)
    small, large = (1, 2, 4, 16), (1, 2, 4, 6, 8, 16)
    bits = {}
    for i, name in enumerate(names):
        widths = small if layers[name].weight.numel() < 10_000 else large
        bits[name] = widths[i % len(widths)]
    return bits


@pytest.fixture(scope="module")
def foreign(pipe, tmp_path_factory):
    """(the tiny SD pipeline, the UNet layers of `subset`, their package as another converter names them)."""
    names = subset(pipe.unet)
    return pipe, names, foreign_package(pipe.unet, tmp_path_factory.mktemp("foreign") / "Unet.mlpackage", names)


def test_canonical_weight_ignores_singleton_axes_only():
    w = torch.randn(8, 4)
    assert content_key(w) == content_key(w[:, :, None, None].numpy())
    assert content_key(w) != content_key(w.T.contiguous())
    assert content_key(torch.zeros(4)) != content_key(-torch.zeros(4))  # exact bits: -0.0 is not 0.0
    assert canonical_weight(w[:, :, None, None]).shape == (8, 4)


def test_recipe_applies_bit_exactly_to_a_package_with_foreign_names_and_1x1_linears(foreign, tmp_path):
    pipe, names, package = foreign
    stored = package_weights(package)
    assert not any(name.startswith("unet_") for name in stored) and all(v.ndim == 4 for v in stored.values())
    assert any(isinstance(weight_layers(pipe.unet)[n], nn.Linear) for n in names)
    bits = mixed_bits(pipe.unet, names)
    report = apply_recipe(package, pipe.unet, bits, tmp_path / "out", source="tiny-sd")
    applied = report.package("unet")
    v = applied.verification
    planned = {n: b for n, b in bits.items() if b != 16}
    assert {c.layer: c.nbits for c in v.layers} == planned
    assert all(c.bit_exact for c in v.layers) and v.unexpected_palettized == ()
    assert v.float16_layers == len(names) - len(planned) == v.float16_exact
    assert report.all_bit_exact and applied.path.endswith("out/Unet.mlpackage")
    assert applied.nbytes < 0.6 * applied.float16_nbytes
    # read back independently: the stored weight under the foreign name equals the simulation
    back = package_weights(applied.path)
    layers = weight_layers(pipe.unet)
    index = {name: i for i, name in enumerate(names)}
    for name in list(planned)[:5]:
        expected = fit_palette(layers[name].weight, PaletteConfig(planned[name])).dense()
        got = back[f"convs_w{index[name]}_weight_to_fp16"].reshape(expected.shape)
        assert np.array_equal(expected.view(np.uint16), got.view(np.uint16)), name
    # a palettized package is named as such, not taken for another model's
    with pytest.raises(PackageMismatchError, match="is palettized already"):
        apply_recipe(applied.path, pipe.unet, bits, tmp_path / "again")


@pytest.mark.slow
def test_applied_package_chunked_for_ios_keeps_every_weight(pipe, tmp_path):
    """`apply --chunk-unet` on a float16 UNet package: two chunks the Swift pipeline can wire, every planned layer
    verified bit-exact in the chunk that holds it; the whole package is not kept; chunks in the wrong order are
    refused."""
    from workbench.coreml.chunks import check_chunk_interfaces
    from workbench.coreml.config import ExportConfig
    from workbench.coreml.export import export_pipeline

    package = Path(export_pipeline(pipe, tmp_path / "f16", ExportConfig()).package("unet").path)
    bits = mixed_bits(pipe.unet, subset(pipe.unet))
    report = apply_recipe(package, pipe.unet, bits, tmp_path / "out", source="tiny-sd", chunk=True)
    paths = [Path(p.path) for p in report.packages]
    assert [p.name for p in paths] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    assert not (tmp_path / "out" / "Unet.mlpackage").exists() and report.all_bit_exact
    planned = {n for n, b in bits.items() if b != 16}
    checked = [c.layer for p in report.packages for c in p.verification.layers]
    assert sorted(checked) == sorted(planned)  # each planned layer verified once, in the chunk that holds it
    assert all(p.verification.float16_layers > 0 for p in report.packages)
    check_chunk_interfaces(package, paths)
    with pytest.raises(ValueError, match="reads"):
        check_chunk_interfaces(package, paths[::-1])


def test_package_of_another_model_fails_naming_what_did_not_match(foreign, tmp_path):
    pipe, names, _ = foreign
    other = foreign_package(tiny_sd_pipeline(seed=1).unet, tmp_path / "Unet.mlpackage", names[:8])
    bits = mixed_bits(pipe.unet, names[:8])
    with pytest.raises(PackageMismatchError) as err:
        apply_recipe(other, pipe.unet, bits, tmp_path / "out", source="tiny-sd")
    message = str(err.value)
    planned = [n for n, b in bits.items() if b != 16]
    assert f"{len(planned)} of the recipe's {len(planned)} layers" in message
    assert planned[0] in message and "convs_w0_weight_to_fp16" in message and "--model" in message
    assert not (tmp_path / "out" / "Unet.mlpackage").exists()


def test_identical_layers_need_the_same_width(tmp_path):
    pipe = tiny_sd_pipeline()
    layers = weight_layers(pipe.unet)
    by_shape = {}
    for name, m in layers.items():
        by_shape.setdefault(tuple(m.weight.shape), []).append(name)
    a, b = next(names for shape, names in by_shape.items() if len(names) > 1 and np.prod(shape) > 10_000)[:2]
    layers[b].weight.data = layers[a].weight.data.clone()
    package = foreign_package(pipe.unet, tmp_path / "Unet.mlpackage", [a, b])
    with pytest.raises(PackageMismatchError, match="hold identical weights") as err:
        apply_recipe(package, pipe.unet, {a: 4, b: 8}, tmp_path / "out")
    assert a in str(err.value) and b in str(err.value)
    report = apply_recipe(package, pipe.unet, {a: 4, b: 4}, tmp_path / "out")
    assert report.all_bit_exact and len(report.package("unet").verification.layers) == 2
    note = next(line for line in report.summary().splitlines() if "hold identical weights" in line)
    assert a in note and b in note and note.endswith("all kmeans4")


def test_grouped_and_3bit_palettes_need_an_ios18_package(tmp_path):
    pipe = tiny_sdxl_pipeline()
    names = subset(pipe.unet, 6)[:6]
    grouped = PaletteConfig(4, granularity="per_grouped_channel", group_size=16)
    recipe = {name: (PaletteConfig(3) if i % 2 else grouped) for i, name in enumerate(names)}
    ios17 = foreign_package(pipe.unet, tmp_path / "ios17" / "Unet.mlpackage", names)
    with pytest.raises(DeploymentTargetError, match="iOS18"):
        apply_recipe(ios17, pipe.unet, recipe, tmp_path / "out17")
    ios18 = foreign_package(pipe.unet, tmp_path / "ios18" / "Unet.mlpackage", names, target="iOS18")
    report = apply_recipe(ios18, pipe.unet, recipe, tmp_path / "out18")
    assert report.all_bit_exact and report.package("unet").deployment_target == "iOS18"
    assert {c.config for c in report.package("unet").verification.layers} == {"kmeans3", "kmeans4_g16"}


@torch.no_grad()
def _declared(pipe, component: str) -> tuple[list, list]:
    """(inputs, outputs) of `component`'s Apple-layout package as (name, shape, dtype): the inputs the exporter
    declares (`layout_inputs`, `host_dtype`), the outputs its wrapper names and the shapes the wrapper returns."""
    inputs = layout_inputs(pipe, component, "apple")
    wrapper = layout_wrapper(pipe, component, "apple")
    outputs = wrapper(*inputs.values())
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return (
        [(name, tuple(x.shape), host_dtype("apple", x)) for name, x in inputs.items()],
        [(name, tuple(y.shape), "float32") for name, y in zip(wrapper.output_names, outputs)],
    )


def _described(spec_features) -> list[tuple[str, tuple[int, ...], str]]:
    dtypes = {ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32"}
    return [
        (f.name, tuple(int(d) for d in f.type.multiArrayType.shape), dtypes.get(f.type.multiArrayType.dataType, "?"))
        for f in spec_features
    ]


@pytest.mark.slow
@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_apple_layout_packages_have_the_swift_contract(builder, tmp_path):
    from workbench.coreml import ExportConfig, export_pipeline

    pipe = builder()
    components = ["unet", "text_encoder", "text_encoder_2"] if builder is tiny_sdxl_pipeline else ["unet"]
    components += ["vae_decoder"] if builder is tiny_sd_pipeline else []
    components += ["text_encoder"] if builder is tiny_sd_pipeline else []
    report = export_pipeline(pipe, tmp_path, ExportConfig(components=components, layout="apple", verify=False))
    names = {
        "unet": "Unet",
        "text_encoder": "TextEncoder",
        "text_encoder_2": "TextEncoder2",
        "vae_decoder": "VAEDecoder",
    }
    for component in components:
        path = tmp_path / f"{names[component]}.mlpackage"
        assert report.package(component).path == str(path)
        spec = ct.utils.load_spec(str(path))
        inputs, outputs = _declared(pipe, component)
        assert _described(spec.description.input) == inputs, component
        assert _described(spec.description.output) == outputs, component
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).stat().st_size > 0
    script = (tmp_path / COMPILE_SCRIPT).read_text()
    assert all('"$here/$name.mlpackage"' in script and names[c] in script for c in components)
    assert subprocess.run(["sh", "-n", str(tmp_path / COMPILE_SCRIPT)]).returncode == 0


def test_apple_layout_fields():
    """Apple's contract (module docstring of `workbench.coreml.layout`), as the exporter declares it."""
    sd, sdxl = tiny_sd_pipeline(), tiny_sdxl_pipeline()
    unet_in, unet_out = _declared(sd, "unet")
    c = sd.unet.config.cross_attention_dim
    assert unet_in == [
        ("sample", (2, 4, 32, 32), "float32"),
        ("timestep", (2,), "float32"),
        ("encoder_hidden_states", (2, c, 1, 77), "float32"),
    ]
    assert unet_out == [("noise_pred", (2, 4, 32, 32), "float32")]
    xl_in = layout_inputs(sdxl, "unet", "apple", batch_size=1)
    assert list(xl_in)[3:] == ["time_ids", "text_embeds"] and xl_in["time_ids"].shape == (1, 6)
    assert [name for name, _, _ in _declared(sd, "text_encoder")[1]] == ["last_hidden_state", "pooled_outputs"]
    for component in ("text_encoder", "text_encoder_2"):
        ins, outs = _declared(sdxl, component)
        assert ins == [("input_ids", (1, 77), "float32")]
        assert [name for name, _, _ in outs] == ["hidden_embeds", "pooled_outputs"]
    assert list(layout_inputs(sd, "vae_decoder", "apple")) == ["z"]
    with pytest.raises(InvalidValueError, match="valid: apple, workbench"):
        check_layout("swift")


def test_compile_script_is_valid_sh(tmp_path):
    script = write_compile_script(tmp_path, ["TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"])
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "for name in TextEncoder TextEncoder2 Unet VAEDecoder; do" in text
    assert "xcrun coremlcompiler compile" in text and script.stat().st_mode & 0o100


class StandInPredictor:
    """An Apple-layout `MLModel` stand-in: float32 inputs (ids cast back, as Core ML does) -> named outputs, with
    the `shapes` and `dtypes` of the package it stands for."""

    def __init__(self, pipe, component):
        from workbench.coreml.layout import apple_wrapper

        self.wrapper = apple_wrapper(pipe, component)
        inputs = layout_inputs(pipe, component, "apple")
        self.shapes = {name: tuple(x.shape) for name, x in inputs.items()}
        self.dtypes = dict.fromkeys(inputs, np.float32)

    @torch.no_grad()
    def predict(self, inputs):
        assert all(v.dtype == np.float32 for v in inputs.values())
        assert set(inputs) == set(self.shapes)  # Core ML takes them by name; the wrapper in the contract's order
        args = [
            torch.from_numpy(inputs[k]).long() if k == "input_ids" else torch.from_numpy(inputs[k])
            for k in self.shapes
        ]
        outs = self.wrapper(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {name: o.numpy() for name, o in zip(self.wrapper.output_names, outs)}


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_coreml_backend_glue_drives_apple_layout_packages(builder):
    """The Python Core ML runtime speaks Apple's layout: channels-first hidden states, float32 ids, its outputs."""
    from workbench.coreml import attach_predictors
    from workbench.models.generation import generate_images

    pipe, twin = builder(), builder()
    pipe.set_progress_bar_config(disable=True)
    gen = {"steps": 2, "height": 32, "width": 32}
    expected = generate_images(pipe, "a blue square", seed=1, **gen)
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if builder is tiny_sdxl_pipeline else [])
    predictors = {c: (StandInPredictor(twin, c), 2 if c == "unet" else 1) for c in components}
    with attach_predictors(pipe, predictors) as routed:
        image = generate_images(routed, "a blue square", seed=1, **gen)
    np.testing.assert_array_equal(image, expected)


def test_cli_apply(foreign, tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.recipes.recipe import PreAnalysis

    pipe, names, package = foreign
    PreAnalysis(model_version="tiny-sd", baselines={}, recipes={"mixed": mixed_bits(pipe.unet, names[:6])}).save(
        tmp_path / "recipe.json"
    )
    argv = ["apply", str(package), "--recipe", str(tmp_path / "recipe.json"), "--model", "tiny-sd"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "Unet.mlpackage") in printed and "ALL BIT-EXACT" in printed
    # another model's package, a missing package: one line on stderr, exit 2
    other = foreign_package(tiny_sd_pipeline(seed=1).unet, tmp_path / "other" / "Unet.mlpackage", names[:6])
    capsys.readouterr()  # the conversion's progress bars
    for bad in (other, tmp_path / "missing.mlpackage"):
        argv[1] = str(bad)
        assert main([*argv, "--out", str(tmp_path / "out2")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("workbench apply: error:") and err.count("\n") == 1, err


def test_cli_apply_of_a_recipe_naming_unknown_layers_is_one_line_with_the_closest_names(foreign, tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.recipes.recipe import PreAnalysis

    _, names, package = foreign
    recipe = {names[0]: 4, "mid_block.attentions.0.proj_outx": 4}
    PreAnalysis(model_version="tiny-sd", baselines={}, recipes={"typo": recipe}).save(tmp_path / "recipe.json")
    out = tmp_path / "out"
    argv = ["apply", str(package), "--recipe", str(tmp_path / "recipe.json"), "--model", "tiny-sd", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("workbench apply: error: recipe 'typo' names 1 layers not in the model")
        and err.count("\n") == 1
    ), err
    assert "'mid_block.attentions.0.proj_outx' (closest: mid_block.attentions.0.proj_out" in err
    assert not out.exists() or not any(out.iterdir())  # nothing palettized, nothing written


def _data_aware_setup(pipe, names, tmp_path):
    """A data-aware recipe over the package's layers (`wkmeans2` on a small layer, `wkmeans4` on a large one, a
    plain width on a third) and the importances an analysis would have written for it."""
    from workbench.palettes.importance import collect_importance
    from workbench.recipes.recipe import Recipe
    from workbench.sweep.probe import OneStepProbe

    layers = weight_layers(pipe.unet)
    small = next(n for n in names if layers[n].weight.numel() < 10_000)
    large = next(n for n in names if layers[n].weight.numel() >= 10_000)
    other = next(n for n in names if n not in (small, large))
    bits = {small: "wkmeans2", large: "wkmeans4", other: 4}
    importance = collect_importance(pipe.unet, {n: layers[n] for n in bits}, OneStepProbe(pipe, ["a red circle"]))
    importance.save(tmp_path / "importance.npz")
    Recipe("recipe_2.39_bit_refined", bits).save(tmp_path / "recipe.json")
    return bits, importance


def test_cli_apply_takes_the_importances_of_a_data_aware_recipe(foreign, tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.coreml.verify import package_weights, palettized_weight_names

    pipe, names, package = foreign
    bits, importance = _data_aware_setup(pipe, names, tmp_path)
    argv = ["apply", str(package), "--recipe", str(tmp_path / "recipe.json"), "--model", "tiny-sd"]
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2  # no importances: one line naming the option
    err = capsys.readouterr().err
    assert err.startswith("workbench apply: error:") and err.count("\n") == 1 and "--importance" in err, err
    assert not (tmp_path / "none").exists()
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--importance", str(tmp_path / "importance.npz")]) == 0
    printed = capsys.readouterr().out
    assert "ALL BIT-EXACT" in printed and f"{len(bits)}/{len(bits)} palettized" in printed, printed
    # the stored palettes are the data-aware fits (verify_package proved it; here, one directly)
    small = next(n for n, key in bits.items() if key == "wkmeans2")
    weight = weight_layers(pipe.unet)[small].weight
    config = PaletteConfig.from_key("wkmeans2")
    expected = fit_palette(weight, config, importance=importance.for_weight(small, tuple(weight.shape))).dense()
    name = f"w{names.index(small)}"
    stored = {k: v for k, v in package_weights(out / "Unet.mlpackage").items() if name in k}
    assert len(palettized_weight_names(out / "Unet.mlpackage")) == len(bits)
    assert any(np.array_equal(canonical_weight(v), canonical_weight(expected)) for v in stored.values()), stored.keys()


def test_cli_apply_refuses_an_out_that_names_a_package_and_checks_memory_first(foreign, tmp_path, capsys, monkeypatch):
    import psutil

    from workbench.cli.main import main
    from workbench.recipes.recipe import PreAnalysis

    pipe, names, package = foreign
    PreAnalysis(model_version="tiny-sd", baselines={}, recipes={"r": {names[0]: 4}}).save(tmp_path / "recipe.json")
    argv = ["apply", str(package), "--recipe", str(tmp_path / "recipe.json"), "--model", "tiny-sd"]
    assert main([*argv, "--out", str(tmp_path / "x.mlpackage")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'x.mlpackage'} names a package" in err, err
    assert f"e.g. --out {tmp_path / 'x'}" in err and not (tmp_path / "x.mlpackage").exists()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 1000})())
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "applying the recipe to the unet needs about" in err, err
    assert not (tmp_path / "out").exists()
