"""The `coreml` backend for real: `MLModel.predict` on macOS, compared with torch (skipped elsewhere).

Run on a Mac with `pytest -m macos tests/test_coreml_macos.py`. Packages have fixed shapes: the tiny pipelines'
64x64 images (32x32 latents), UNet batch 2 (classifier-free guidance).
"""

import sys

import coremltools as ct
import numpy as np
import pytest
import torch

from workbench.coreml import COREML_LABEL, ExportConfig, coreml_pipeline, export_pipeline
from workbench.metrics import image_psnr
from workbench.models.generation import generate_images
from workbench.models.layers import compressible_layers
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = [
    pytest.mark.macos,
    pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction runs on macOS only"),
]

GEN = {"steps": 4, "height": 64, "width": 64}


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of a float tensor (noise predictions): 20 * log10(max|reference| / rmse), float64."""
    ref = reference.astype(np.float64)
    rmse = np.sqrt(np.mean((ref - test.astype(np.float64)) ** 2))
    return float("inf") if rmse == 0 else float(20 * np.log10(np.abs(ref).max() / rmse))


@pytest.fixture(scope="module")
def exports(pipe, tmp_path_factory):
    """(the tiny SD pipeline, its float16 packages, its 6-bit UNet package)."""
    float16 = export_pipeline(
        pipe, tmp_path_factory.mktemp("float16"), ExportConfig(components=("unet", "text_encoder", "vae_decoder"))
    )
    palettized = export_pipeline(pipe, tmp_path_factory.mktemp("6bit"), ExportConfig(nbits=6))
    return pipe, float16, palettized


def test_float16_packages_predict_like_torch(exports):
    pipe, float16, _ = exports
    expected = generate_images(pipe, "a red circle", seed=0, **GEN)
    with coreml_pipeline(pipe, float16, backend="coreml") as coreml:
        assert coreml.label == COREML_LABEL
        image = generate_images(coreml, "a red circle", seed=0, **GEN)
    assert image.shape == expected.shape and image.dtype == np.uint8
    assert image_psnr(expected, image) >= 30.0  # float16 arithmetic on the Core ML runtime vs float32 torch


def test_unet_noise_prediction_matches_torch(exports):
    pipe, float16, _ = exports
    model = ct.models.MLModel(str(float16.package("unet").path))
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    timestep = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        expected = pipe.unet(sample, timestep, encoder_hidden_states=hidden).sample.numpy()
    hidden_apple = hidden.transpose(1, 2).unsqueeze(2).numpy()  # Apple's layout: (B, C, 1, 77)
    out = model.predict(
        {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": hidden_apple}
    )["noise_pred"]
    assert psnr_db(expected, out) >= 40.0


def test_palettized_package_predicts_like_its_emulation(exports):
    pipe, _, palettized = exports
    with coreml_pipeline(pipe, palettized, backend="emulate") as emulated:
        expected = generate_images(emulated, "a blue square", seed=1, **GEN)
    with coreml_pipeline(pipe, palettized, backend="coreml") as coreml:
        image = generate_images(coreml, "a blue square", seed=1, **GEN)
    # same weights bit for bit; only the runtime's float16 arithmetic differs
    assert image_psnr(expected, image) >= 30.0
    assert len(compressible_layers(pipe.unet, 2048)) == palettized.package("unet").n_palettized


def test_sdxl_unet_package_runs_in_the_pipeline(tmp_path):
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    report = export_pipeline(pipe, tmp_path, ExportConfig(nbits=8))
    with coreml_pipeline(pipe, report, backend="emulate") as emulated:
        expected = generate_images(emulated, "a red circle", seed=0, **GEN)
    with coreml_pipeline(pipe, report, backend="coreml") as coreml:
        image = generate_images(coreml, "a red circle", seed=0, **GEN)
    assert image_psnr(expected, image) >= 30.0


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_apple_layout_packages_compile_and_predict_like_torch(builder, tmp_path):
    """What the Swift pipeline does: compile every package with the written script, load the .mlmodelc, predict."""
    import subprocess

    from workbench.coreml.layout import APPLE_RESOURCE_NAMES, apple_wrapper, layout_inputs

    pipe = builder()
    components = ["unet", "text_encoder", "vae_decoder"]
    components += ["text_encoder_2"] if builder is tiny_sdxl_pipeline else []
    export_pipeline(pipe, tmp_path, ExportConfig(components=components, layout="apple", verify=False))
    subprocess.run(["sh", str(tmp_path / "compile_for_swift.sh")], check=True)
    resources = tmp_path / "Resources"
    assert (resources / "vocab.json").exists() and (resources / "merges.txt").exists()
    g = torch.Generator().manual_seed(0)
    for component in components:
        model = ct.models.CompiledMLModel(str(resources / f"{APPLE_RESOURCE_NAMES[component]}.mlmodelc"))
        shapes = {name: x.shape for name, x in layout_inputs(pipe, component, "apple").items()}
        feed = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
        if "input_ids" in feed:
            feed["input_ids"] = torch.randint(0, 400, shapes["input_ids"], generator=g).float()
        if "timestep" in feed:
            feed["timestep"] = torch.full(shapes["timestep"], 500.0)
        args = [v.long() if name == "input_ids" else v for name, v in feed.items()]
        wrapper = apple_wrapper(pipe, component)
        with torch.no_grad():
            expected = wrapper(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = model.predict({k: v.numpy() for k, v in feed.items()})
        for name, want in zip(wrapper.output_names, expected):
            assert got[name].shape == tuple(want.shape), (component, name)
            assert psnr_db(want.numpy(), got[name]) >= 35.0, (component, name)


def test_chunked_unet_predicts_like_the_unchunked_package(pipe, tmp_path):
    """UnetChunk1 then UnetChunk2, fed as Apple's Swift pipeline feeds them, against one Unet package."""
    whole = export_pipeline(pipe, tmp_path / "whole", ExportConfig(nbits=6))
    chunked = export_pipeline(pipe, tmp_path / "chunks", ExportConfig(nbits=6, chunk_unet=True))
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": np.asarray(torch.randn(2, 4, 32, 32, generator=g)),
        "timestep": np.array([10.0, 700.0], np.float32),
        "encoder_hidden_states": np.asarray(torch.randn(2, 32, 1, 77, generator=g)),
    }
    expected = ct.models.MLModel(whole.package("unet").path).predict(inputs)["noise_pred"]
    outputs: dict = {}
    for path in chunked.paths()["unet"]:
        model = ct.models.MLModel(str(path))
        names = [i.name for i in model.get_spec().description.input]
        available = {**inputs, **outputs}
        outputs = model.predict({n: available[n] for n in names})
    assert set(outputs) == {"noise_pred"}
    assert psnr_db(expected, outputs["noise_pred"]) >= 40.0  # the same program, run as two (float16 borders)
