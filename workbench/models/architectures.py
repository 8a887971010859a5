"""Full-size Stable Diffusion UNets from their published configs, with random weights, for dry runs and scale tests.

No checkpoint is downloaded: the UNets are built from the architecture settings of the public model configs
(SD-1.5, SD-2.1-base, SDXL-base 1.0), so they have the real layer names, shapes and parameter counts, and their
weights are random (seeded). They say nothing about image quality; they measure time, memory and whether every
step of the workbench copes with the real architecture. Pipelines built here pair the full-size UNet with
small text encoders of the right output width and a small 8x VAE, since only the UNet is analysed.

Example:
    >>> unet = build_unet("sd15", device="meta")       # shapes only, no memory
    >>> sum(p.numel() for p in unet.parameters())
    859520964
    >>> save_pipeline("sd15", "models/sd15-random", sample_size=8)   # then: workbench analyze models/sd15-random

From the command line: `workbench build-model sd15 --out models/sd15-random --sample-size 8`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workbench.models.assemble import clip_text_config, sd_pipeline, sdxl_pipeline
from workbench.models.tokenizer import clip_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, UNet2DConditionModel


_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}

# The architecture fields of the published UNet configs (everything else is diffusers' default).
UNET_CONFIGS: dict[str, dict] = {
    "sd15": {**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64},
    "sd21-base": {
        **_SD_BLOCKS,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "sample_size": 64,
    },
    "sdxl-base": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
    },
}
ARCHITECTURES = tuple(UNET_CONFIGS)

# Measured from the builds (tests check them): parameters and Linear/Conv2d layers over the reference's 1e5.
PUBLISHED_PARAMETERS = {"sd15": 859_520_964, "sd21-base": 865_910_724, "sdxl-base": 2_567_463_684}

RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: built by workbench.models.architectures from the published {arch} UNet config for dry runs and "
    "scale tests. Not a trained model: its images are noise; time, memory and layer shapes are real."
)


def _check(arch: str) -> str:
    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    return arch


def unet_config(arch: str, sample_size: int | None = None) -> dict:
    """The UNet config of `arch` ("sd15", "sd21-base", "sdxl-base"), with `sample_size` (latent side) if given."""
    config = dict(UNET_CONFIGS[_check(arch)])
    if sample_size is not None:
        if sample_size < 8 or sample_size % 8:
            raise ValueError(f"sample_size must be a multiple of 8 (the UNet downsamples 3 times), got {sample_size}")
        config["sample_size"] = sample_size
    return config


def build_unet(
    arch: str,
    *,
    sample_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet2DConditionModel:
    """A full-size UNet of `arch` with random weights (a function of `seed` alone; the global RNG is untouched).

    Args:
        arch (`str`): "sd15", "sd21-base" or "sdxl-base".
        sample_size (`int`, *optional*): latent side the pipeline defaults to (64 px images per 8); None = published.
        seed (`int`, defaults to 0): weight seed.
        device (`str | torch.device`, defaults to "cpu"): "meta" builds shapes only (no memory, instant).
        dtype (`torch.dtype`, defaults to float32).
    """
    from diffusers import UNet2DConditionModel

    config = unet_config(arch, sample_size)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return (unet if dtype == torch.float32 else unet.to(dtype=dtype)).eval()


def _text_encoder(tokenizer, hidden_size: int, *, projection_dim: int | None = None, act: str = "quick_gelu"):
    """A one-layer CLIP text encoder of the right width: the UNet sees real-shaped embeddings."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # SDXL reads the penultimate layer: 2 layers
    config = clip_text_config(
        tokenizer,
        hidden_size,
        intermediate_size=hidden_size,
        num_layers=2,
        num_heads=8,
        projection_dim=projection_dim,
        hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config).eval()


def _small_vae(scaling_factor: float):
    """An 8x VAE (4 blocks, 3 downsamplings) with few channels: the published latent layout at little cost."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=scaling_factor,
    ).eval()


def _scheduler(arch: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if arch == "sdxl-base":
        return EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear")
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)


def build_pipeline(arch: str, *, sample_size: int = 8, seed: int = 0) -> DiffusionPipeline:
    """A pipeline around the full-size UNet of `arch`: small text encoders of the published widths (SD-1.5 768,
    SD-2.1 1024, SDXL 768 + 1280 with a 1280 pooled projection), a small 8x VAE, the published scheduler type.

    Args:
        arch (`str`): "sd15", "sd21-base" or "sdxl-base".
        sample_size (`int`, defaults to 8): latent side, so images are `8 * sample_size` px (8 -> 64 px, which a
            CPU can afford; the reference analyses SD at 96 and SDXL at 128).
        seed (`int`, defaults to 0): weight seed.

    Returns:
        `StableDiffusionPipeline` or `StableDiffusionXLPipeline` on CPU, float32, random weights.
    """
    unet = build_unet(arch, sample_size=sample_size, seed=seed)
    vae_scale = 0.13025 if arch == "sdxl-base" else 0.18215
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = _small_vae(vae_scale)
        tokenizer = clip_tokenizer()
        if arch != "sdxl-base":
            text_encoder = _text_encoder(tokenizer, unet.config.cross_attention_dim)
            return sd_pipeline(vae, text_encoder, tokenizer, unet, _scheduler(arch))
        tokenizer_2 = clip_tokenizer(pad_token="!")
        text_encoder = _text_encoder(tokenizer, 768)
        text_encoder_2 = _text_encoder(tokenizer_2, 1280, projection_dim=1280, act="gelu")
    return sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, _scheduler(arch))


def save_pipeline(arch: str, out_dir: str | os.PathLike, *, sample_size: int = 8, seed: int = 0) -> Path:
    """Write `build_pipeline(arch, ...)` as a diffusers pipeline folder (safetensors) that every workbench command
    loads like a downloaded model, with a README.md and `random_weights.json` that label it as random weights.

    Returns:
        `Path`: the folder.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a pipeline; pick an empty folder")
    pipe = build_pipeline(arch, sample_size=sample_size, seed=seed)
    pipe.save_pretrained(out, safe_serialization=True)
    note = RANDOM_WEIGHTS_NOTE.format(arch=arch)
    info = {"architecture": arch, "sample_size": sample_size, "seed": seed, "note": note}
    (out / "random_weights.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        f"# {arch}, random weights\n\n{note}\n\nLatents {sample_size}x{sample_size} "
        f"({8 * sample_size} px images), seed {seed}.\n",
        encoding="utf-8",
    )
    return out
