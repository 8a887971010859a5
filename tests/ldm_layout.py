"""Write a diffusers pipeline as an original (LDM / Stability) single-file checkpoint, for the loader's tests.

The reverse of diffusers' own conversion (`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), derived from the
original repositories' module layout and driven by the model's config, so the tiny pipelines (two UNet levels)
map as the full-size ones do:

- UNet under `model.diffusion_model.`: `input_blocks.0.0` is `conv_in`; down block b, layer j is
  `input_blocks.{1 + b * (L + 1) + j}` (`.0` the resnet, `.1` its transformer), its downsampler
  `input_blocks.{1 + b * (L + 1) + L}.0.op`; the mid block is `middle_block.0/1/2`; up block b, layer j is
  `output_blocks.{b * (L + 1) + j}` (`.0` resnet, `.1` transformer, the upsampler after them); resnets name
  `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection`; `time_embed.0/2`, `label_emb.0.0/2`,
  `out.0/2`.
- VAE under `first_stage_model.`: `down.{i}.block.{j}`, `up.{n - 1 - i}` (the decoder's blocks are numbered from
  the bottom), `mid.block_1/2`, `mid.attn_1` with `q/k/v/proj_out` as 1x1 convolutions, `norm_out`,
  `nin_shortcut`.
- CLIP text encoders keep transformers' names under `cond_stage_model.transformer.` (SD 1.x) or
  `conditioner.embedders.0.transformer.` (SDXL); SDXL's second one is OpenCLIP under
  `conditioner.embedders.1.model.`: `resblocks.{i}` with fused `attn.in_proj_weight` (q, k, v stacked), `ln_1/2`,
  `mlp.c_fc/c_proj`, `positional_embedding`, `ln_final`, and `text_projection` stored transposed.

The tests prove it by loading the file back through the workbench's loader (diffusers' forward conversion) and
comparing every tensor with the pipeline's, bit for bit.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET[layer]}.{param}"


def unet_key(key: str, layers_per_block: int) -> str:
    """The original name of UNet parameter `key` (without the `model.diffusion_model.` prefix)."""
    step = layers_per_block + 1
    module, _, param = key.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * step + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = int(m[1]) * step + int(m[3])
        return f"output_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
    raise KeyError(f"no original name for UNet parameter {key!r}")


def unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's parameters under their original names; an up block's upsampler follows its last layer's modules
    (`.1.conv` without a transformer, `.2.conv` with one)."""
    step = unet.config.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = unet.up_blocks[int(m[1])]
            index = int(m[1]) * step + unet.config.layers_per_block
            slot = 2 if getattr(block, "attentions", None) else 1
            out[f"output_blocks.{index}.{slot}.conv.{m[2]}"] = value
        else:
            out[unet_key(key, unet.config.layers_per_block)] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's parameters under their original names; attention projections as 1x1 convolutions."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        up = lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}."  # noqa: E731
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", up, new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        out[new] = value
    return out


def clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's parameters as the original checkpoints hold them: transformers' names,
    under `text_model.` (recent transformers flatten `CLIPTextModel`, so the prefix is put back)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def open_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection` as OpenCLIP names it: q, k and v fused into `in_proj_*` (stacked in that
    order), the projection transposed."""
    sd = text_encoder.state_dict()
    out = {
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    for key, value in sd.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            continue
        block, module, param = f"transformer.resblocks.{m[1]}", m[2], m[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":
                parts = [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{block}.attn.in_proj_{param}"] = torch.cat(parts)
            continue
        out[f"{block}.{_OPEN_CLIP[module]}.{param}"] = value
    return out


def single_file_state_dict(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x or SDXL pipeline as one original-layout state dict (contiguous tensors, ready for safetensors)."""
    prefixed = {"model.diffusion_model.": unet_state_dict(pipe.unet), "first_stage_model.": vae_state_dict(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is None:
        prefixed["cond_stage_model.transformer."] = clip_state_dict(pipe.text_encoder)
    else:
        prefixed["conditioner.embedders.0.transformer."] = clip_state_dict(pipe.text_encoder)
        prefixed["conditioner.embedders.1.model."] = open_clip_state_dict(pipe.text_encoder_2)
    return {
        prefix + key: value.detach().contiguous().clone()
        for prefix, sd in prefixed.items()
        for key, value in sd.items()
    }
