"""Single-file checkpoints (`workbench.models.single_file`): tiny SD and SDXL pipelines written in the original layout
(`tests/ldm_layout.py`) load back bit-identical to their folders, go through `analyze` and `export` with the folder's
results, and every bad file or config is one line."""

import json

import huggingface_hub
import pandas as pd
import pytest
import torch
from ldm_layout import single_file_state_dict
from safetensors.torch import save_file

from workbench.cli.main import main
from workbench.errors import InvalidValueError
from workbench.models.loader import ModelNotAvailableError, load_pipeline
from workbench.models.single_file import CheckpointError, SingleFile
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from workbench.report.notebook import open_model

pytestmark = pytest.mark.usefixtures("one_thread")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"sd" | "sdxl": (pipeline folder, the same pipeline as an original-layout .safetensors)}."""
    out = {}
    for name, build in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline)):
        folder = tmp_path_factory.mktemp(name)
        pipe = build(seed=0)
        pipe.save_pretrained(folder / "pipeline")
        save_file(single_file_state_dict(pipe), folder / f"{name}.safetensors")
        out[name] = (folder / "pipeline", folder / f"{name}.safetensors")
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty HF cache (nothing inferred can be found there)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def assert_same_pipeline(loaded, reference):
    assert type(loaded) is type(reference) and type(loaded.scheduler) is type(reference.scheduler)
    for name in COMPONENTS:
        if getattr(reference, name, None) is None:
            continue
        got, expected = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}.{key}"


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_original_layout_round_trip_is_bit_identical_to_the_folder(saved, name):
    folder, file = saved[name]
    reference = load_pipeline(folder, device="cpu", progress=False)
    single = load_pipeline(SingleFile(str(file), config=str(folder)), device="cpu", progress=False)
    assert_same_pipeline(single, reference)
    assert single.vae.config.scaling_factor == reference.vae.config.scaling_factor


def test_ckpt_loads_without_pickle_and_one_that_needs_pickle_only_when_allowed(saved, tmp_path, capsys):
    import argparse

    from safetensors.torch import load_file

    folder, file = saved["sd"]
    reference = load_pipeline(folder, device="cpu", progress=False)
    state = load_file(file)
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "plain.ckpt")
    assert_same_pipeline(load_pipeline(SingleFile(str(tmp_path / "plain.ckpt"), str(folder)), device="cpu"), reference)
    # a Lightning-style checkpoint with hyper-parameters as an object: pickle would run code the file names
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match=r"needs pickle to load.*argparse.Namespace.*--allow-pickle"):
        load_pipeline(SingleFile(str(tmp_path / "lightning.ckpt"), str(folder)), device="cpu")
    argv = ["layers", str(tmp_path / "lightning.ckpt"), "--config", str(folder), "--min-numel", "2048"]
    capsys.readouterr()  # the loads' progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench layers: error:") and err.count("\n") == 1 and "--allow-pickle" in err, err
    assert main([*argv, "--allow-pickle"]) == 0 and "down_blocks.0.resnets.0.conv1" in capsys.readouterr().out


def test_bad_files_and_configs_are_one_line_naming_the_problem(saved, tmp_path, capsys, offline):
    sd_folder, sd_file = saved["sd"]
    sdxl_folder, sdxl_file = saved["sdxl"]
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        ([str(tmp_path / "junk.safetensors")], "is not a safetensors file"),
        ([str(tmp_path / "junk.ckpt")], "is not a PyTorch checkpoint"),
        ([str(tmp_path / "notes.txt")], "is not a checkpoint file; valid suffixes: .safetensors, .ckpt"),
        (  # a diffusers component file is not a single-file checkpoint
            [str(sd_folder / "unet" / "diffusion_pytorch_model.safetensors")],
            "no UNet weights under 'model.diffusion_model.' (its keys start like",
        ),
        ([str(sd_file), "--config", str(sdxl_folder)], "is an SD 1.x checkpoint (keys under 'cond_stage_model."),
        ([str(sdxl_file), "--config", str(sd_folder)], "is an SDXL checkpoint (keys under 'conditioner.embedders."),
        (  # same family, another architecture (the demo model's UNet has four levels)
            [str(sd_file), "--config", "data/tiny-shapes"],
            "does not match the architecture of 'data/tiny-shapes': its unet does not load",
        ),
        ([str(sd_file)], "inferred from its keys, is stable-diffusion-v1-5/stable-diffusion-v1-5's, which is not in"),
        ([str(sdxl_file)], "cannot be inferred from its keys: an SDXL checkpoint whose blocks are not a published"),
        ([str(sd_file), "--config", str(tmp_path / "nowhere")], "no such file or folder"),
        (["tiny-sd", "--config", str(sd_folder)], "--config is for a single-file checkpoint"),
    ]
    for argv, message in cases:
        capsys.readouterr()  # progress bars of loads that fail late
        assert main(["layers", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("workbench layers: error:") and err.count("\n") == 1 and message in err, (argv, err)
    with pytest.raises(ModelNotAvailableError, match="pass --config"):
        load_pipeline(str(sd_file), device="cpu")


def _analyze(model, out, *extra):
    argv = ["analyze", model, *extra, "--out", str(out), "--nbits", "2", "--min-numel", "30000", "--resolution",
            "48", "--num-recipes", "1", "--strategies", "apple", "--threads", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    evaluations = pd.read_csv(out / "evaluations.csv").drop(columns="forward_s")  # all but the timing
    return {name: (out / name).read_text() for name in ("preanalysis.json", "recipes.csv")}, evaluations


@pytest.mark.slow  # ~45 s each; the round trip above proves the load bit-identical in the quick suite
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_analyze_of_the_single_file_gives_the_folders_results(saved, tmp_path, name, capsys):
    folder, file = saved[name]
    files, evaluations = _analyze(str(folder), tmp_path / "folder")
    files_from_file, evaluations_from_file = _analyze(str(file), tmp_path / "file", "--config", str(folder))
    assert files_from_file == files  # the recipes, their measurements and the model's fingerprint
    pd.testing.assert_frame_equal(evaluations_from_file, evaluations, check_exact=True)
    assert json.loads(files["preanalysis.json"])["recipes"]  # recipes were made


@pytest.mark.slow  # four tiny-UNet conversions (1-3 min on a shared 2-core machine)
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_export_of_the_single_file_gives_the_folders_packages(saved, tmp_path, name, capsys):
    from workbench.coreml.verify import package_weights

    folder, file = saved[name]
    weights = {}
    for label, argv in (("folder", [str(folder)]), ("file", [str(file), "--config", str(folder)])):
        out = tmp_path / label
        assert main(["export", *argv, "--out", str(out), "--nbits", "4", "--min-numel", "2048"]) == 0
        assert "ALL BIT-EXACT" in capsys.readouterr().out
        weights[label] = package_weights(out / "Unet.mlpackage")
    assert weights["file"].keys() == weights["folder"].keys()
    for key, value in weights["folder"].items():
        assert value.tobytes() == weights["file"][key].tobytes(), key


@pytest.mark.slow  # one smoke notebook through papermill (~1 min on a shared 2-core machine)
def test_report_takes_a_single_file_with_its_config(saved, tmp_path, monkeypatch, capsys, offline):
    """`workbench report --model FILE --config FOLDER`: the notebooks load the checkpoint with its architecture (the
    empty HF cache proves nothing was inferred), given as absolute paths since they run in the report folder."""
    folder, file = saved["sd"]
    monkeypatch.chdir(file.parent)  # relative paths, as a user types them
    argv = ["report", "--model", file.name, "--config", str(folder.relative_to(file.parent)), "--smoke",
            "--notebooks", "1", "--out-root", str(tmp_path), "--run", "file", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "file" / "parameters.json").read_text())
    parameters = record["notebooks"]["01_palettization_basics"]["parameters"]
    assert parameters["model"] == str(file.resolve()) and parameters["model_config"] == str(folder.resolve())
    assert parameters["allow_pickle"] is False and record["notebooks"]["01_palettization_basics"]["ok"]
    assert list((tmp_path / "file" / "figures").glob("01_*.png"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-sd", "--config", "x"], "--config is for a single-file checkpoint"),
        (["--allow-pickle"], "--allow-pickle is for a single-file checkpoint"),
    ],
)
def test_report_refuses_checkpoint_options_without_a_checkpoint(argv, message, tmp_path, capsys):
    assert main(["report", *argv, "--out-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


def test_a_notebook_names_its_own_parameter_when_refusing_a_config():
    with pytest.raises(InvalidValueError, match="model_config is for a single-file checkpoint"):
        open_model("tiny-sd", config="some/folder")
