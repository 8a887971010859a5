"""Assemble a Stable Diffusion pipeline from its components (the one place that picks the pipeline class)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """An SD 1.x/2.x `StableDiffusionPipeline` around these components (put in eval mode) with no safety checker:
    how the workbench assembles the pipelines it builds (tiny test models, the demo model, full-size builds)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
