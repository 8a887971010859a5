"""The parts every pipeline the workbench builds shares: the tiny test pipelines (`workbench.models.tiny`), the
full-size random builds (`workbench.models.architectures`) and the demo model (`workbench.demo.components`).

`clip_text_config` is the CLIP text encoder's config, sized by the caller and tied to its tokenizer;
`sd_pipeline` and `sdxl_pipeline` are the pipelines around built components.

Example:
    >>> tokenizer = clip_tokenizer()
    >>> config = clip_text_config(tokenizer, 32, intermediate_size=64, num_layers=4, num_heads=4)
    >>> CLIPTextModel(config)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer


def clip_text_config(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    *,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    projection_dim: int | None = None,
    hidden_act: str = "quick_gelu",
) -> CLIPTextConfig:
    """A `CLIPTextConfig` for `tokenizer`: its vocabulary, its length as the positions, its special tokens.

    Args:
        tokenizer (`CLIPTokenizer`): the encoder's tokenizer.
        hidden_size (`int`): the width (what the UNet's cross-attention reads).
        intermediate_size (`int`): the MLP's width.
        num_layers (`int`), num_heads (`int`): depth and attention heads.
        projection_dim (`int`, *optional*): the pooled projection's width (`CLIPTextModelWithProjection`);
            None = `hidden_size`.
        hidden_act (`str`, defaults to "quick_gelu"): the MLP's activation (quick-GELU as CLIP ViT-L; SDXL's
            second encoder uses "gelu").
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        hidden_act=hidden_act,
        # the pooled output is read at the first eos; CLIP's legacy eos_token_id=2 would mean "argmax id" instead
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
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


def sdxl_pipeline(
    vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler
) -> StableDiffusionXLPipeline:
    """A `StableDiffusionXLPipeline` around these components (put in eval mode), as SDXL-base is configured
    (`force_zeros_for_empty_prompt`), without the invisible watermarker (it would change every image)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
