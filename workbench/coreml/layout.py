"""Package layouts: the inputs, outputs and file names of exported packages.

Two layouts (`LAYOUTS`):

- `"apple"` (the default): the contract of Apple's converter (`python_coreml_stable_diffusion.torch2coreml`), which
  Apple's Swift `StableDiffusion` package, its CLI and the Hugging Face Diffusers app load. Packages are named as
  the Swift resources expect (`Unet.mlpackage` -> `xcrun coremlcompiler compile` -> `Unet.mlmodelc`), every input
  is float32 (the Swift code feeds `MLShapedArray<Float32>`), and
    - UNet: `sample` (B, 4, H/8, W/8), `timestep` (B,), `encoder_hidden_states` (B, C, 1, 77): the text embeddings
      channels-first with a singleton axis; SDXL adds `time_ids` (B, 6) and `text_embeds` (B, 1280). Output
      `noise_pred`. B is 2 (classifier-free guidance) or 1.
    - text encoder: `input_ids` (1, 77) float32 -> `last_hidden_state`, `pooled_outputs`; SDXL's two encoders
      output `hidden_embeds` (the penultimate layer) and `pooled_outputs`.
    - VAE decoder: `z` (latents already divided by the scaling factor) -> `image` in [-1, 1].
- `"workbench"`: this package's earlier layout, named `<component>.mlpackage`: int32 `input_ids`,
  `encoder_hidden_states` as diffusers takes it (B, 77, C), and text encoders that output all of
  `last_hidden_state`, `pooled_output` and `penultimate_hidden_state` (`workbench.coreml.components`).

Both hold each torch module under the same attribute, so a layer's Core ML weight name is the same in both.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from workbench.coreml.components import (
    TextEncoderExport,
    UNetExport,
    VAEDecoderExport,
    component_module,
    example_inputs,
    export_wrapper,
)
from workbench.errors import InvalidValueError

LAYOUTS = ("apple", "workbench")
DEFAULT_LAYOUT = "apple"
# component -> the resource name Apple's Swift pipeline loads (`<name>.mlmodelc`)
APPLE_RESOURCE_NAMES = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "vae_decoder": "VAEDecoder",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
COMPILE_SCRIPT = "compile_for_swift.sh"


def check_layout(layout: str) -> str:
    """`layout` itself, or an `InvalidValueError` naming the valid ones."""
    if layout not in LAYOUTS:
        raise InvalidValueError(f"unknown package layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return layout


def is_sdxl(pipe) -> bool:
    """An SDXL pipeline: a UNet with "text_time" added conditioning (and two text encoders)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def package_name(component: str, layout: str) -> str:
    """The package's file name: `Unet.mlpackage` (apple) or `unet.mlpackage` (workbench)."""
    stem = APPLE_RESOURCE_NAMES[component] if check_layout(layout) == "apple" else component
    return f"{stem}.mlpackage"


def package_stems(component: str, layout: str, chunk: bool = False) -> tuple[str, ...]:
    """The package names without `.mlpackage`: one, or for a chunked UNet two (`UnetChunk1`, `UnetChunk2` as
    Apple's Swift pipeline loads them; `unet_chunk1`, `unet_chunk2` in ours)."""
    stem = package_name(component, layout).removesuffix(".mlpackage")
    if not chunk:
        return (stem,)
    if component != "unet":
        raise InvalidValueError(f"only the UNet is chunked, not the {component}")
    return (f"{stem}Chunk1", f"{stem}Chunk2") if layout == "apple" else (f"{stem}_chunk1", f"{stem}_chunk2")


class AppleUNet(UNetExport):
    """The UNet with Apple's inputs: `encoder_hidden_states` (B, C, 1, 77) channels-first, SDXL's `time_ids`
    before `text_embeds`. Holds the UNet as `self.unet`, so its weights have the workbench layout's names."""

    @property
    def input_names(self) -> tuple[str, ...]:
        base = ("sample", "timestep", "encoder_hidden_states")
        return base + (("time_ids", "text_embeds") if self.sdxl else ())

    def forward(self, sample, timestep, encoder_hidden_states, time_ids=None, text_embeds=None):
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)  # (B, C, 1, 77) -> diffusers' (B, 77, C)
        return super().forward(sample, timestep, hidden, text_embeds=text_embeds, time_ids=time_ids)


class AppleTextEncoder(TextEncoderExport):
    """A CLIP text encoder with Apple's outputs: `(last_hidden_state, pooled_outputs)`, or for SDXL's encoders
    `(hidden_embeds, pooled_outputs)` (the penultimate layer; `pooled_outputs` is encoder 2's projection).

    Traced with int32 ids; the package declares `input_ids` float32, as Apple's converter does, and Core ML casts.
    """

    def __init__(self, text_encoder: nn.Module, sdxl: bool):
        super().__init__(text_encoder)
        self.sdxl = sdxl
        self.output_names = ("hidden_embeds", "pooled_outputs") if sdxl else ("last_hidden_state", "pooled_outputs")

    def forward(self, input_ids):
        last, pooled, penultimate = super().forward(input_ids)
        return (penultimate if self.sdxl else last), pooled


def apple_wrapper(pipe, component: str) -> nn.Module:
    """The trace-friendly wrapper of one component in Apple's layout (no copy: it holds the pipeline's module)."""
    module = component_module(pipe, component)
    if component == "unet":
        return AppleUNet(module).eval()
    if component == "vae_decoder":
        return VAEDecoderExport(module).eval()  # `z` -> `image`: already Apple's
    return AppleTextEncoder(module, sdxl=is_sdxl(pipe)).eval()


def apple_inputs(pipe, component: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Zero-valued example inputs in Apple's layout, in the wrapper's argument order (`input_ids` int32 for the
    trace; the package declares every input float32, `host_dtype`)."""
    inputs = example_inputs(pipe, component, batch_size)
    if component != "unet":
        return inputs
    ordered = {
        "sample": inputs["sample"],
        "timestep": inputs["timestep"],
        "encoder_hidden_states": inputs["encoder_hidden_states"].transpose(1, 2).unsqueeze(2),  # -> (B, C, 1, 77)
    }
    if "time_ids" in inputs:
        ordered |= {"time_ids": inputs["time_ids"], "text_embeds": inputs["text_embeds"]}
    return ordered


def layout_wrapper(pipe, component: str, layout: str) -> nn.Module:
    """The export wrapper of `component` in `layout`."""
    return apple_wrapper(pipe, component) if check_layout(layout) == "apple" else export_wrapper(pipe, component)


def layout_inputs(pipe, component: str, layout: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Example inputs of `component` in `layout` (`apple_inputs`, `workbench.coreml.components.example_inputs`)."""
    if check_layout(layout) == "apple":
        return apple_inputs(pipe, component, batch_size)
    return example_inputs(pipe, component, batch_size)


def host_dtype(layout: str, example: torch.Tensor) -> str:
    """The dtype a package declares for an input: float32 everywhere in Apple's layout; int32 ids in ours."""
    return "int32" if check_layout(layout) == "workbench" and example.dtype == torch.int32 else "float32"


def write_tokenizer_files(pipe, out: str | os.PathLike) -> list[Path]:
    """Write the pipeline tokenizer's BPE files into `out`: `vocab.json` (token -> id) and `merges.txt` (a
    `#version` line, then one merge per line in rank order), what the Swift pipeline's `BPETokenizer` reads (SDXL's
    second tokenizer shares them). Read from the tokenizer's own model (`backend_tokenizer`), so it works however
    the tokenizer was loaded."""
    backend = getattr(pipe.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(pipe.tokenizer).__name__} has no BPE backend to write vocab.json / merges.txt from")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer's model is {model.get('type')!r}, not the BPE the Swift pipeline reads")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab, merges_path = (Path(out) / name for name in TOKENIZER_FILES)
    vocab.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    return [vocab, merges_path]


_SCRIPT = """#!/bin/sh
# Compile the Core ML packages beside this script into the resources folder Apple's Swift StableDiffusion
# pipeline loads (its CLI's --resource-path; the Diffusers app's model folder). macOS with Xcode only.
# Usage: sh {script} [RESOURCES_DIR]   (default: Resources/ beside this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${{1:-"$here/Resources"}}
mkdir -p "$out"
for name in {names}; do
    xcrun coremlcompiler compile "$here/$name.mlpackage" "$out/"
done
cp "$here/vocab.json" "$here/merges.txt" "$out/"
echo "Swift resources in $out: {resources} vocab.json merges.txt"
"""


def write_compile_script(out: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write `<out>/compile_for_swift.sh` (POSIX sh, executable): `xcrun coremlcompiler compile` of each named
    Apple-layout package (`Unet`, `UnetChunk1`, `TextEncoder`...) into a resources folder, plus the tokenizer
    files."""
    names = list(names)
    resources = " ".join(f"{n}.mlmodelc" for n in names)
    path = Path(out) / COMPILE_SCRIPT
    path.write_text(_SCRIPT.format(script=COMPILE_SCRIPT, names=" ".join(names), resources=resources))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def write_swift_files(pipe, out: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Beside Apple-layout packages: the tokenizer files and `compile_for_swift.sh` for the packages `names`."""
    return [*write_tokenizer_files(pipe, out), write_compile_script(out, names)]
