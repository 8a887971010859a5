"""load_pipeline and pick_device: the one loader (demo model, built-in test pipelines, local folders, the offline
HF cache), helpful errors, never the network."""

import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from workbench.cli import main as cli
from workbench.models.loader import (
    BUILTIN_MODELS,
    DEMO_MODEL,
    ModelNotAvailableError,
    check_model,
    default_min_numel,
    is_demo_model,
    load_pipeline,
    model_from_text,
    pick_device,
)
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty HF cache of our own under tmp_path/hub (no network and HF offline mode: conftest's `no_network`)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def assert_same_image(pipe, image):
    # weights load bitwise-identical; unaligned views into the file may change the last bit of a reduction
    np.testing.assert_allclose(generate(pipe), image, rtol=0, atol=1e-5)


def generate(pipe):
    out = pipe("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    """(folder of a saved tiny SD pipeline, the image it makes)."""
    pipe = tiny_sd_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(folder)
    return folder, generate(pipe)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device() == torch.device("cpu")
        with pytest.raises(ValueError, match=r"'cuda' is not available here; available: cpu"):
            pick_device("cuda")
    with pytest.raises(ValueError, match=r"'gpu' is not a device name"):
        pick_device("gpu")


def test_demo_model_is_package_data():
    import workbench

    assert DEMO_MODEL == Path(workbench.__file__).resolve().parent.parent / "data" / "tiny-shapes"
    assert (DEMO_MODEL / "model_index.json").is_file()


def test_one_sentinel_for_the_demo_model():
    assert model_from_text("") is None and model_from_text("tiny-sd") == "tiny-sd"
    assert is_demo_model(None) and is_demo_model(DEMO_MODEL) and is_demo_model(str(DEMO_MODEL))
    assert not is_demo_model("tiny-sd") and not is_demo_model("runwayml/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="pass None for the demo model"):
        load_pipeline("")


def test_default_threshold_keeps_the_reference_for_real_models_and_the_small_layers_of_ours():
    assert default_min_numel("runwayml/stable-diffusion-v1-5") == 100_000
    assert default_min_numel(None) == default_min_numel(DEMO_MODEL) == 2048
    assert default_min_numel("tiny-sd") == default_min_numel("tiny-sdxl") == 2048


@pytest.mark.parametrize(
    "name, pipeline_type", [("tiny-sd", StableDiffusionPipeline), ("tiny-sdxl", StableDiffusionXLPipeline)]
)
def test_builtin_test_pipelines_load_by_name(name, pipeline_type, offline):
    assert name in BUILTIN_MODELS
    check_model(name)  # nothing to find on disk
    pipe = load_pipeline(name, device="cpu", progress=False)
    assert type(pipe) is pipeline_type and pipe.unet.dtype == torch.float32
    assert pipe._progress_bar_config == {"disable": True}
    reference = (tiny_sd_pipeline if name == "tiny-sd" else tiny_sdxl_pipeline)(seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values())
    )


def test_demo_model_loads_through_the_sentinel(offline):
    pipe = load_pipeline(None, device="cpu", progress=False)
    assert Path(pipe.name_or_path) == DEMO_MODEL and pipe.unet.dtype == torch.float32


def test_missing_demo_model_says_how_to_build_it(monkeypatch, tmp_path):
    import workbench.models.loader as pipelines

    monkeypatch.setattr(pipelines, "DEMO_MODEL", tmp_path / "tiny-shapes")
    with pytest.raises(ModelNotAvailableError, match="the demo model is not built.*workbench train --out"):
        check_model(None)


def test_load_pipeline_from_a_local_folder(saved_sd, offline):
    folder, image = saved_sd
    pipe = load_pipeline(folder, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert pipe.device == torch.device("cpu") and pipe.unet.dtype == torch.float32
    assert_same_image(pipe, image)
    half = load_pipeline(str(folder), dtype=torch.float16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.float16


def test_load_pipeline_detects_sdxl(tmp_path, offline):
    tiny_sdxl_pipeline(seed=0).save_pretrained(tmp_path / "xl")
    assert isinstance(load_pipeline(tmp_path / "xl"), StableDiffusionXLPipeline)


def test_load_pipeline_from_the_hf_cache(saved_sd, offline):
    # lay the saved pipeline out as `huggingface-cli download workbench-tests/tiny-sd` would
    folder, image = saved_sd
    repo = offline / "models--workbench-tests--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).symlink_to(folder, target_is_directory=True)
    pipe = load_pipeline("workbench-tests/tiny-sd", device="cpu")
    assert pipe.name_or_path == "workbench-tests/tiny-sd"
    assert_same_image(pipe, image)


@pytest.mark.parametrize("model_id", ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"])
def test_uncached_hub_id_says_how_to_get_it(offline, model_id, capsys):
    with pytest.raises(FileNotFoundError) as err:  # what callers of the loader have always caught
        load_pipeline(model_id)
    message = str(err.value)
    assert f"'{model_id}' is not available locally" in message
    assert f"huggingface-cli download {model_id}" in message and "HF_HOME" in message and "local" in message
    assert cli.main(["layers", model_id]) == 2  # a user's error: that message, one line, from the command
    assert capsys.readouterr().err == f"workbench layers: error: {message}\n"


@pytest.mark.parametrize("missing", ["./no-such-model", "/no/such/model", "data/models/no-such-model"])
def test_missing_path_names_it(offline, missing):
    with pytest.raises(ModelNotAvailableError, match=f"no such file or folder: '{missing}'"):
        load_pipeline(missing)


def test_folder_without_model_index(tmp_path, offline):
    with pytest.raises(ModelNotAvailableError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_cli_layers_lists_the_unet_layers(saved_sd, offline, capsys):
    folder, _ = saved_sd
    assert cli.main(["layers", str(folder), "--min-numel", "2048"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 104  # header + the tiny UNet's Linear/Conv2d layers over 2048 weights
    assert cli.main(["layers", str(folder / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_every_test_is_refused_the_network_but_not_this_machine(no_network):
    with pytest.raises(ConnectionRefusedError, match="tests never use the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: refused before any packet
    assert no_network[-1] == ("192.0.2.1", 443)
    no_network.pop()  # asked for here: not a failure of this test
    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback stays open (Ray, Jupyter kernels)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
