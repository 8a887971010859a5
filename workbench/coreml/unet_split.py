"""The UNet as a straight line of units, cut into pieces that convert one at a time and chunks that ship apart.

A diffusers `UNet2DConditionModel` runs a prologue (time embedding, SDXL's added conditioning, `conv_in`), then
each down block's resnet (+ transformer) pairs and downsampler, pushing every output on a skip stack, the mid
block, each up block's pairs (each popping one skip and concatenating it) and upsampler, and an epilogue
(`conv_norm_out`, `conv_out`). `unet_units` lists those steps; `UNetPiece` runs a contiguous range of them in
exactly diffusers' order of operations (`tests/test_unet_split.py` checks the chained pieces equal the UNet bit
for bit), taking and returning the tensors that cross its borders by name:

- `emb`: the time (+ added) embedding, written by the prologue;
- `hidden_<u>`: the hidden state after unit `u` (the skips are some of these);
- the package inputs (`sample`, `timestep`, `encoder_hidden_states`, SDXL's `time_ids`, `text_embeds`) and the
  output `noise_pred`.

Two uses: `workbench.coreml.export` converts the UNet a piece at a time (`pieces_by_size`, so conversion
memory follows the largest piece, not the whole UNet) and stitches the converted pieces into one program
(`workbench.coreml.stitch`); with `--chunk-unet` the pieces are stitched into two halves of about equal weight
bytes (`halves`), Apple's `UnetChunk1` / `UnetChunk2`, whose borders Apple's Swift pipeline feeds by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workbench.coreml.layout import check_layout
from workbench.errors import InvalidValueError

EMBEDDING = "emb"
OUTPUT = "noise_pred"


@dataclass(frozen=True)
class Unit:
    """One step of the UNet's forward pass.

    Attributes:
        kind: "prologue", "down" (a resnet, then its block's transformer if any), "downsample", "mid" (index 0:
            the first resnet; index i: transformer i-1, then resnet i), "up" (pop a skip, concatenate, resnet,
            transformer), "upsample" or "epilogue".
        block: the block's module path ("down_blocks.1", "mid_block", ...); "" for the prologue and epilogue.
        index: the resnet's index in its block.
        reads / writes: the names of the tensors it takes and gives (see the module docstring).
    """

    kind: str
    block: str
    index: int
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    def module_paths(self, unet: nn.Module) -> list[str]:
        """The UNet submodules whose parameters this unit uses."""
        if self.kind == "prologue":
            names = ["time_embedding", "add_embedding", "conv_in"]
            return [name for name in names if getattr(unet, name, None) is not None]
        if self.kind == "epilogue":
            return [name for name in ("conv_norm_out", "conv_out") if getattr(unet, name, None) is not None]
        if self.kind in ("downsample", "upsample"):
            return [f"{self.block}.{self.kind}rs"]
        block = unet.get_submodule(self.block)
        paths = [f"{self.block}.resnets.{self.index}"]
        attentions = getattr(block, "attentions", None)
        if attentions is not None and self.kind in ("down", "up"):
            paths.append(f"{self.block}.attentions.{self.index}")
        elif attentions is not None and self.kind == "mid" and self.index > 0:
            paths.insert(0, f"{self.block}.attentions.{self.index - 1}")
        return paths

    def nbytes(self, unet: nn.Module) -> int:
        """Bytes of its parameters in float32."""
        return sum(p.numel() * 4 for path in self.module_paths(unet) for p in unet.get_submodule(path).parameters())


def _hidden(u: int) -> str:
    return f"hidden_{u}"


def unet_units(unet: nn.Module) -> list[Unit]:
    """The UNet's forward pass as units, with the names each reads and writes (see the module docstring).

    Raises:
        InvalidValueError: a UNet this split does not cover (FreeU on, or a block type it does not know).
    """
    units: list[Unit] = []
    skips: list[str] = []

    def add(kind: str, block: str, index: int, extra: tuple[str, ...] = ()) -> None:
        u = len(units)
        sampler = kind in ("downsample", "upsample")
        reads = (_hidden(u - 1),) if sampler else (_hidden(u - 1), EMBEDDING, *extra)
        units.append(Unit(kind, block, index, reads, (_hidden(u),)))

    units.append(Unit("prologue", "", 0, (), (EMBEDDING, _hidden(0))))
    skips.append(_hidden(0))
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            add("down", f"down_blocks.{b}", i)
            skips.append(_hidden(len(units) - 1))
        if block.downsamplers is not None:
            add("downsample", f"down_blocks.{b}", 0)
            skips.append(_hidden(len(units) - 1))
    if unet.mid_block is not None:
        for i in range(len(unet.mid_block.resnets)):
            add("mid", "mid_block", i)
    for b, block in enumerate(unet.up_blocks):
        if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
            raise InvalidValueError(f"up_blocks.{b} has FreeU enabled; disable it (unet.disable_freeu()) to export")
        for i in range(len(block.resnets)):
            add("up", f"up_blocks.{b}", i, (skips.pop(),))
        if block.upsamplers is not None:
            add("upsample", f"up_blocks.{b}", 0)
    units.append(Unit("epilogue", "", 0, (_hidden(len(units) - 1),), (OUTPUT,)))
    return units


def _context(encoder_hidden_states: torch.Tensor, layout: str) -> torch.Tensor:
    """The text embeddings as diffusers takes them: Apple's (B, C, 1, 77) -> (B, 77, C); ours as they are."""
    if layout == "apple":
        return encoder_hidden_states.squeeze(2).transpose(1, 2)
    return encoder_hidden_states


class UNetPiece(nn.Module):
    """Units `units[start:stop]` of a UNet, as a traceable module: named tensors in, named tensors out.

    Holds the UNet under `unet` as the export wrappers do, so a layer's Core ML weight name is the same as in a
    whole-UNet package. `input_names` are what it reads from before `start` (package inputs and earlier units'
    tensors, in a fixed order); `output_names` are what it writes that a unit at or after `stop` reads (and
    `noise_pred` if it holds the epilogue).
    """

    prefix = "unet"

    def __init__(self, unet: nn.Module, units: Sequence[Unit], start: int, stop: int, layout: str = "apple"):
        super().__init__()
        self.unet, self.layout = unet, check_layout(layout)
        self.units = list(units[start:stop])
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        written = {name for unit in self.units for name in unit.writes}
        needed: list[str] = []
        for unit in self.units:
            needed += [name for name in self._unit_reads(unit) if name not in written and name not in needed]
        self.input_names = tuple(needed)
        later = {name for unit in units[stop:] for name in unit.reads}
        self.output_names = tuple(
            name for unit in self.units for name in unit.writes if name in later or name == OUTPUT
        )

    def _unit_reads(self, unit: Unit) -> tuple[str, ...]:
        """What a unit reads, with the package inputs it needs spelled out."""
        if unit.kind == "prologue":
            return ("sample", "timestep") + (("time_ids", "text_embeds") if self.sdxl else ())
        attends = unit.kind in ("down", "mid", "up") and self._attention(unit) is not None
        return unit.reads + (("encoder_hidden_states",) if attends else ())

    def _attention(self, unit: Unit) -> nn.Module | None:
        attentions = getattr(self.unet.get_submodule(unit.block), "attentions", None)
        if attentions is None or (unit.kind == "mid" and unit.index == 0):
            return None
        return attentions[unit.index - 1 if unit.kind == "mid" else unit.index]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, tensors, strict=True))
        if "encoder_hidden_states" in env:
            env["context"] = _context(env["encoder_hidden_states"], self.layout)
        for unit in self.units:
            env.update(zip(unit.writes, self._run(unit, env), strict=True))
        return tuple(env[name] for name in self.output_names)

    def _run(self, unit: Unit, env: dict) -> tuple[torch.Tensor, ...]:
        unet = self.unet
        if unit.kind == "prologue":
            return _prologue(unet, env, self.sdxl)
        if unit.kind == "epilogue":
            return (_epilogue(unet, env[unit.reads[0]]),)
        hidden, block = env[unit.reads[0]], unet.get_submodule(unit.block)
        if unit.kind == "downsample":
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            return (hidden,)
        if unit.kind == "upsample":
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, None)
            return (hidden,)
        attention = self._attention(unit)
        if unit.kind == "up":
            hidden = torch.cat([hidden, env[unit.reads[2]]], dim=1)
        if unit.kind == "mid" and attention is not None:
            hidden = attention(hidden, encoder_hidden_states=env["context"], return_dict=False)[0]
        hidden = block.resnets[unit.index](hidden, env[EMBEDDING])
        if unit.kind != "mid" and attention is not None:
            hidden = attention(hidden, encoder_hidden_states=env["context"], return_dict=False)[0]
        return (hidden,)


def _prologue(unet: nn.Module, env: dict, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' forward up to `conv_in`: (emb, hidden)."""
    sample = env["sample"]
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=env["timestep"]), None)
    if sdxl:
        added = {"text_embeds": env["text_embeds"], "time_ids": env["time_ids"]}
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=None, added_cond_kwargs=added)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, unet.conv_in(sample)


def _epilogue(unet: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def check_splittable(unet: nn.Module, sample_shape: Sequence[int]) -> None:
    """The split runs diffusers' default path: no class embeddings, latents divisible by the upsampling factor.

    Raises:
        InvalidValueError: naming what the split does not cover.
    """
    cfg = unet.config
    if getattr(unet, "class_embedding", None) is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise InvalidValueError("the piecewise UNet export covers SD 1.x/2.x and SDXL UNets (no class embeddings)")
    if cfg.center_input_sample:
        raise InvalidValueError("the piecewise UNet export does not cover center_input_sample=True")
    factor = 2**unet.num_upsamplers
    if any(dim % factor for dim in sample_shape[-2:]):
        raise InvalidValueError(f"latent size {tuple(sample_shape[-2:])} is not divisible by {factor}")


def pieces_by_size(units: Sequence[Unit], unet: nn.Module, max_bytes: int) -> list[tuple[int, int]]:
    """Contiguous `(start, stop)` ranges of units, each holding at most `max_bytes` of float32 parameters (a
    single unit above it stands alone), greedily from the front."""
    ranges, start, size = [], 0, 0
    for u, unit in enumerate(units):
        nbytes = unit.nbytes(unet)
        if u > start and size + nbytes > max_bytes:
            ranges.append((start, u))
            start, size = u, 0
        size += nbytes
    ranges.append((start, len(units)))
    return ranges


def halves(units: Sequence[Unit], unet: nn.Module) -> int:
    """The unit index that splits the UNet into two chunks of most nearly equal parameter bytes."""
    sizes = [unit.nbytes(unet) for unit in units]
    total, running, best, best_gap = sum(sizes), 0, 1, None
    for u in range(1, len(units)):
        running += sizes[u - 1]
        gap = abs(total - 2 * running)
        if best_gap is None or gap < best_gap:
            best, best_gap = u, gap
    return best
