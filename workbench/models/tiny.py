"""Tiny, offline, deterministic Stable Diffusion pipelines for tests, notebooks and benchmarks.

The pipelines have the real SD-1.x and SDXL architectures (the same block types, cross-attention, text
encoders, schedulers and a real byte-level BPE `CLIPTokenizer`) at a size that runs in milliseconds on a CPU.
Their weights are random, built from configs under a seeded, forked RNG: nothing is downloaded and the caller's
global RNG state is left untouched.

Example:

    >>> from workbench.models.tiny import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    >>> image.size
    (64, 64)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from workbench.models.assemble import clip_text_config, sd_pipeline, sdxl_pipeline
from workbench.models.tokenizer import clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for the body only; the caller's RNG state (and `torch.initial_seed()`) come back after."""
    with torch.random.fork_rng(devices=[]):  # models are built on CPU, so only the CPU generator is used
        torch.random.default_generator.manual_seed(seed)
        yield


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    """The tiny pipelines' text encoders: 4 layers, 4 heads, MLP twice as wide, pooled projection 32."""
    return clip_text_config(
        tokenizer,
        hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=4,
        num_heads=4,
        projection_dim=32,
        hidden_act=hidden_act,
    )


# Both tiny UNets: SD's block types at two levels, 32x32 latents; SDXL's adds its own settings to these.
_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
}
# SD's scaled-linear betas, "leading" spacing from step 1, as both published schedulers.
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # two blocks: one 2x downsampling, so 32x32 latents decode to 64x64 images
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight Stable Diffusion 1.x pipeline, small enough for CPU tests: 64x64 images, 32x32 latents.

    UNet: SD-1.x blocks at `block_out_channels=(32, 64)`, `layers_per_block=2`, cross-attention dim 32
    (1.43M parameters, 104 Linear/Conv2d layers over 2048 weights). Text encoder: `CLIPTextModel`, hidden size
    32, 4 layers, quick-GELU as in CLIP ViT-L. VAE: `AutoencoderKL`, 2 blocks, scaling factor 0.18215.
    Scheduler: SD 1.x's PNDM (scaled-linear betas, "leading" spacing, steps_offset=1). Tokenizer: a real
    `CLIPTokenizer` over `workbench.models.tokenizer.DEFAULT_WORDS`. No safety checker.

    Args:
        seed (int, defaults to 0): weights are a function of the seed alone; the global RNG is not touched.

    Returns:
        StableDiffusionPipeline: on CPU, float32.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(**_UNET, cross_attention_dim=32)
        vae = _tiny_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu"))
    scheduler = PNDMScheduler(**_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
    return sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight SDXL pipeline, small enough for CPU tests: 64x64 images, 32x32 latents.

    As SDXL: two text encoders (`CLIPTextModel`, hidden 32, quick-GELU; `CLIPTextModelWithProjection`, hidden 48,
    GELU, projection 32) whose penultimate hidden states are concatenated into the UNet's cross-attention
    (dim 32 + 48 = 80); "text_time" added conditioning from the pooled projection and the 6 size/crop ids
    (`projection_class_embeddings_input_dim` = 6 * 8 + 32 = 80); linear-projection transformers,
    `transformer_layers_per_block=(1, 2)`; the second tokenizer pads with "!"; Euler scheduler ("leading",
    steps_offset=1); VAE scaling factor 0.13025. UNet `block_out_channels=(32, 64)`, `layers_per_block=2`.

    Args:
        seed (int, defaults to 0): weights are a function of the seed alone; the global RNG is not touched.

    Returns:
        StableDiffusionXLPipeline: on CPU, float32, no watermarker.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    time_embed_dim, n_time_ids = 8, 6  # time ids: original size, crop top-left, target size
    with _seeded(seed):
        text_config = _text_config(tokenizer, 32, "quick_gelu")
        text_config_2 = _text_config(tokenizer_2, 48, "gelu")
        unet = UNet2DConditionModel(
            **_UNET,
            attention_head_dim=(2, 4),  # diffusers' name for the number of heads, as in SDXL's config
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=n_time_ids * time_embed_dim + text_config_2.projection_dim,
        )
        vae = _tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    scheduler = EulerDiscreteScheduler(**_SCHEDULER, prediction_type="epsilon", interpolation_type="linear")
    return sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler)
