"""The tiny offline pipelines: real tokenizer, deterministic weights and images, save/load round trip."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of a red circle"


pytestmark = pytest.mark.usefixtures("one_thread")


def generate(pipe, seed=0):
    """The 64x64 image for PROMPT after 2 steps, HWC float32 in [0, 1]."""
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def assert_same_images(loaded, image):
    # weights load bitwise-identical, but as views into the file at unaligned offsets, which can change which
    # CPU kernel runs and so the last bit of a reduction (seen for SDXL's 48-wide text encoder: 1e-6)
    np.testing.assert_allclose(generate(loaded), image, rtol=0, atol=1e-5)


def state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_building_leaves_the_global_rng_alone():
    seed, state = torch.initial_seed(), torch.get_rng_state()
    tiny_sd_pipeline(seed=3)
    tiny_sdxl_pipeline(seed=3)
    assert torch.initial_seed() == seed
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def sd_image(pipe):
    return generate(pipe)


def test_tiny_sd_pipeline_architecture(pipe):
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert sum(p.numel() for p in pipe.unet.parameters()) == 1_427_012  # REFERENCE.md's tiny UNet
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.timestep_spacing) == (1, "leading")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 32


def test_tiny_sd_pipeline_is_deterministic(pipe, sd_image):
    again = tiny_sd_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(pipe, name), getattr(again, name)), name
    assert not state_dicts_equal(pipe.unet, tiny_sd_pipeline(seed=1).unet)
    assert sd_image.shape == (64, 64, 3) and sd_image.std() > 0.02  # an image, not a constant
    np.testing.assert_array_equal(generate(again), sd_image)
    # pins the seed -> weights -> image chain (diffusers-style slice; tolerant of BLAS rounding only)
    expected = np.array([0.3171, 0.3562, 0.4324, 0.4434, 0.4207, 0.4991, 0.5341, 0.4516, 0.4921])
    np.testing.assert_allclose(sd_image[-3:, -3:, -1].ravel(), expected, atol=1e-3)


def test_tiny_sd_pipeline_round_trips_through_save_pretrained(pipe, sd_image, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    for name in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(pipe, name), getattr(loaded, name)), name
    assert_same_images(loaded, sd_image)


def test_tiny_sdxl_pipeline(tmp_path):
    pipe = tiny_sdxl_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.unet.config.projection_class_embeddings_input_dim == 6 * 8 + pipe.text_encoder_2.config.projection_dim
    assert pipe.tokenizer_2.pad_token == "!"
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and image.std() > 0.02

    again = tiny_sdxl_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert state_dicts_equal(getattr(pipe, name), getattr(again, name)), name
    np.testing.assert_array_equal(generate(again), image)
    expected = np.array([0.3433, 0.4082, 0.3203, 0.3145, 0.3676, 0.4151, 0.4865, 0.4311, 0.4952])
    np.testing.assert_allclose(image[-3:, -3:, -1].ravel(), expected, atol=1e-3)

    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path, local_files_only=True, add_watermarker=False)
    assert loaded.tokenizer_2.pad_token == "!"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert state_dicts_equal(getattr(pipe, name), getattr(loaded, name)), name
    assert_same_images(loaded, image)
