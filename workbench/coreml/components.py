"""The exportable pipeline components: trace-friendly wrappers, example inputs, and their weights' Core ML names.

The torch frontend of coremltools names the float16 constant of a module's weight after the module's
path: `down_blocks.0.attentions.0.proj_in.weight` becomes `down_blocks_0_attentions_0_proj_in_weight_to_fp16`.
Since we convert the model ourselves, that mapping is known by construction (no weight hashing, unlike
the reference), and `coreml_weight_names` checks it is one-to-one before anything relies on it. The export
wrappers hold the pipeline's module under an attribute (`UNetExport.unet`, `TextEncoderExport.text_encoder`,
`VAEDecoderExport.vae`), so in an exported package the UNet layer `L` is `coreml_weight_name("unet." + L)`,
e.g. `unet_down_blocks_0_attentions_0_proj_in_weight_to_fp16`, for Conv2d and Linear layers alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# component -> the pipeline attribute holding its torch module
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae_decoder": "vae"}


def coreml_weight_name(layer: str) -> str:
    """The name coremltools gives the float16 weight constant of torch module `layer`."""
    return layer.replace(".", "_") + "_weight_to_fp16"


def coreml_weight_names(layers: Iterable[str]) -> dict[str, str]:
    """`{torch layer name: Core ML weight name}`, refusing mappings that would be ambiguous."""
    mapping = {layer: coreml_weight_name(layer) for layer in layers}
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for layer, name in mapping.items():
            if name in seen:
                raise ValueError(f"layers {seen[name]!r} and {layer!r} both map to Core ML weight {name!r}")
            seen[name] = layer
    return mapping


def weight_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The module's Linear and Conv2d layers by name: the layers whose weights a package stores and palettizes."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_weight_names(layers: Iterable[str], prefix: str) -> dict[str, str]:
    """`{torch layer name: Core ML weight name}` for layers of a wrapper's module held under `prefix`."""
    layers = list(layers)
    names = coreml_weight_names(f"{prefix}.{layer}" for layer in layers)
    return {layer: names[f"{prefix}.{layer}"] for layer in layers}


def check_component(component: str) -> str:
    """`component` itself, or a `ValueError` listing the valid ones."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; valid: {', '.join(COMPONENTS)}")
    return component


def component_module(pipe, component: str) -> nn.Module:
    """The torch module behind `component` (`"vae_decoder"` -> `pipe.vae`)."""
    module = getattr(pipe, COMPONENTS[check_component(component)], None)
    if module is None:
        have = [c for c, attr in COMPONENTS.items() if getattr(pipe, attr, None) is not None]
        raise ValueError(f"{type(pipe).__name__} has no {component!r}; it has: {', '.join(have)}")
    return module


class UNetExport(nn.Module):
    """The UNet with plain tensor inputs and one output, for `torch.jit.trace`.

    SD-1.x/2.x signature: `(sample, timestep, encoder_hidden_states) -> noise_pred`; SDXL ("text_time" added
    conditioning) adds `text_embeds` and `time_ids`. `sample` is NCHW float32 latents, `timestep` one float per
    batch item.
    """

    prefix = "unet"  # the attribute the module sits under; Core ML weight names start with it

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    @property
    def input_names(self) -> tuple[str, ...]:
        base = ("sample", "timestep", "encoder_hidden_states")
        return base + (("text_embeds", "time_ids") if self.sdxl else ())

    output_names = ("noise_pred",)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class TextEncoderExport(nn.Module):
    """A CLIP text encoder: `input_ids` (int32, padded to the context length) -> the tensors SD pipelines read.

    Outputs `last_hidden_state`, `pooled_output` (the pooler output, or `text_embeds` of a
    `CLIPTextModelWithProjection`) and `penultimate_hidden_state` (SDXL's prompt embedding).
    """

    prefix = "text_encoder"
    input_names = ("input_ids",)
    output_names = ("last_hidden_state", "pooled_output", "penultimate_hidden_state")

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return out.last_hidden_state, pooled, out.hidden_states[-2]


class VAEDecoderExport(nn.Module):
    """The VAE decoder: `z` (NCHW latents already divided by the scaling factor) -> `image` (NCHW, about [-1, 1])."""

    prefix = "vae"
    input_names = ("z",)
    output_names = ("image",)

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


# component -> its export wrapper; `WRAPPERS[c].prefix` starts the Core ML names of its weights
WRAPPERS = {
    "unet": UNetExport,
    "text_encoder": TextEncoderExport,
    "text_encoder_2": TextEncoderExport,
    "vae_decoder": VAEDecoderExport,
}


def export_wrapper(pipe, component: str) -> nn.Module:
    """The trace-friendly wrapper of one pipeline component (no copy: it holds the pipeline's own module)."""
    module = component_module(pipe, component)  # checks the name first
    return WRAPPERS[component](module).eval()


def _unet_inputs(config, batch: int) -> dict[str, torch.Tensor]:
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    inputs = {
        "sample": torch.zeros(batch, config.in_channels, size, size),
        "timestep": torch.ones(batch),
        "encoder_hidden_states": torch.zeros(batch, 77, config.cross_attention_dim),
    }
    if getattr(config, "addition_embed_type", None) == "text_time":
        n_ids = 6  # original size, crop top-left, target size
        pooled_dim = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        inputs |= {"text_embeds": torch.zeros(batch, pooled_dim), "time_ids": torch.zeros(batch, n_ids)}
    return inputs


def example_inputs(pipe, component: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Zero-valued example inputs fixing the package's shapes (float32; `input_ids` int32).

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline.
        component (`str`): one of `COMPONENTS`.
        batch_size (`int`, *optional*): defaults to 2 for the UNet (classifier-free guidance), 1 otherwise.

    Returns:
        `dict[str, torch.Tensor]`: input name -> tensor, in the wrapper's argument order.
    """
    module = component_module(pipe, component)
    batch = batch_size or (2 if component == "unet" else 1)
    if component == "unet":
        return _unet_inputs(module.config, batch)
    if component == "vae_decoder":
        cfg = module.config
        size = cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)
        return {"z": torch.zeros(batch, cfg.latent_channels, size, size)}
    return {"input_ids": torch.zeros(batch, module.config.max_position_embeddings, dtype=torch.int32)}
