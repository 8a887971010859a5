"""The components of the tiny-shapes demo model, built from a `TrainConfig`, and the pipeline around them.

SD 1.x's components at toy scale: a `CLIPTokenizer` with one token per caption word, a `CLIPTextModel`, an
`AutoencoderKL` and a `UNet2DConditionModel` with cross-attention, SD 1.x's scaled-linear noise schedule, and a
`StableDiffusionPipeline` around them (`assemble_pipeline`). How they are trained: `workbench.demo.train`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.demo.world import CAPTION_WORDS
from workbench.models.assemble import clip_text_config, sd_pipeline
from workbench.models.tokenizer import write_clip_tokenizer

if TYPE_CHECKING:
    from workbench.demo.config import TrainConfig


def build_tokenizer(directory: str | Path, config: TrainConfig):
    """A `CLIPTokenizer` in which every caption word is one token, written to `directory`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(directory, CAPTION_WORDS, model_max_length=config.max_length)
    )


def build_text_encoder(tokenizer, config: TrainConfig):
    """`CLIPTextModel` with quick-GELU (as CLIP ViT-L), positions = tokenizer length."""
    from transformers import CLIPTextModel

    text_config = clip_text_config(
        tokenizer,
        config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_layers=config.text_layers,
        num_heads=config.text_heads,
    )
    return CLIPTextModel(text_config)


def build_vae(config: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(16, config.vae_channels[0]),
        sample_size=config.image_size,
    )


def build_unet(config: TrainConfig):
    """SD 1.x block types; no attention at full latent resolution (like SD's last level, but at the top: on a
    CPU, self-attention over 16x16 tokens costs more than the rest of the UNet).

    Where a shape goes needs absolute position, which a UNet has no embedding for: convolutions only see it
    through zero padding (the CoordConv problem, Liu et al. 2018). A 3-level UNet (16 -> 4x4) trained like this
    drew the asked-for colour and shape at a position set by the noise alone (position adherence at chance).
    Two stock settings make padding say more: a 2x2 bottom level, where every cell has its own set of padded
    neighbours, and a 7x7 `conv_in`, whose output statistics differ with the distance to the border.
    """
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=8,
        norm_num_groups=min(16, config.unet_channels[0]),
        conv_in_kernel=config.unet_conv_in_kernel,
    )


_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_schedulers(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """(training DDPM, inference scheduler) with SD 1.x's scaled-linear betas.

    Without `zero_terminal_snr`: SD 1.x's PNDM, "leading" spacing, steps_offset=1. With it: the betas rescaled
    so that the last step is pure noise, and DDIM with "trailing" spacing so that sampling starts there (Lin et
    al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; needs v-prediction).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    rescale = {"rescale_betas_zero_snr": True} if zero_terminal_snr else {}
    train = DDPMScheduler(**_SD_BETAS, clip_sample=False, prediction_type=prediction_type, **rescale)
    if zero_terminal_snr:
        infer = DDIMScheduler(
            **_SD_BETAS,
            **rescale,
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="trailing",
            prediction_type=prediction_type,
        )
        return train, infer
    infer = PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return train, infer


@dataclass(frozen=True)
class Components:
    """The untrained models of a run: a function of `config` (and its seed) alone."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any


def build_components(config: TrainConfig) -> Components:
    """Build the tokenizer and the three models under `config.seed`; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = build_vae(config)  # built in this order: each model's weights are the next draws of the seed
        with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the tokenizer into `out` later
            tokenizer = build_tokenizer(tmp, config)
        text_encoder = build_text_encoder(tokenizer, config)
        unet = build_unet(config)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)


def assemble_pipeline(
    vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon", zero_terminal_snr: bool = False
):
    """A `StableDiffusionPipeline` around trained components, with `build_schedulers`' inference scheduler and
    no safety checker."""
    _, scheduler = build_schedulers(prediction_type, zero_terminal_snr)
    return sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
