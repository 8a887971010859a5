"""LUT entries as the trainable parameters of a palettized layer: `weight = lut[group, indices]`.

Each palettized layer's weight becomes a parametrization (`torch.nn.utils.parametrize`) of its palette: a float32
master copy of the LUT (one row per channel group) is the parameter, the cluster assignment (the uint8 indices of
the post-training fit) is fixed, and the weight the layer computes with is the LUT rounded to float16 (as Core ML
stores it) gathered by the indices. Autograd of the gather is a scatter-add: the gradient of a LUT entry is the
sum of the gradients of the weights that take it. The float16 rounding passes the gradient straight through.

Example:
    >>> with learnable_luts(pipe.unet, given) as luts:     # given: GivenPalettes (the post-training fit)
    ...     loss = distillation_loss(...); loss.backward()  # luts[name].lut.grad: per LUT entry
    ...     tuned = learned_palettes(luts)                   # GivenPalettes with the current LUTs
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from workbench.models.layers import get_layer
from workbench.palettes.fit import Palette
from workbench.palettes.given import GivenPalettes


class _Gather(torch.autograd.Function):
    """`lut.gather(1, indices)` that keeps only the uint8 indices for backward (not int64 ones: 8x less memory);
    backward scatter-adds the weights' gradients into their LUT entries."""

    @staticmethod
    def forward(ctx, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.entries = lut.shape[1]
        return torch.gather(lut, 1, indices.long())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        out = torch.zeros(grad.shape[0], ctx.entries, dtype=grad.dtype, device=grad.device)
        return out.scatter_add_(1, indices.long(), grad), None


class LutWeight(nn.Module):
    """The parametrization `weight = float16(lut)[group, indices]` of one palettized layer.

    Args:
        palette (`Palette`): the starting LUT (float16, (groups, 2**nbits)) and the fixed indices (uint8, the
            weight's shape).

    Attributes:
        lut (`nn.Parameter`): float32 master, (groups, 2**nbits).
    """

    def __init__(self, palette: Palette):
        super().__init__()
        groups = palette.lut.shape[0]
        self.config, self.shape = palette.config, tuple(palette.indices.shape)
        self.lut = nn.Parameter(torch.from_numpy(palette.lut.astype(np.float32)))
        self.register_buffer("indices", torch.from_numpy(palette.indices.reshape(groups, -1).copy()), persistent=False)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        stored = self.lut + (self.lut.to(torch.float16).float() - self.lut).detach()  # float16 as stored, STE
        return _Gather.apply(stored, self.indices).view(self.shape).to(original.dtype)

    def rms(self) -> float:
        """The RMS of the palettized weight (each entry's count times its square, over all weights): the scale of
        the layer, which step sizes are taken relative to."""
        counts = torch.zeros_like(self.lut).scatter_add_(1, self.indices.long(), torch.ones(self.indices.shape))
        return float(((counts * self.lut.detach() ** 2).sum() / counts.sum()).sqrt())

    def palette(self) -> Palette:
        """The current LUT as a `Palette` (float16, as Core ML stores it) with the fixed indices."""
        lut = self.lut.detach().to("cpu", torch.float16).numpy()
        return Palette(lut, self.indices.cpu().numpy().reshape(self.shape), self.config)


@contextmanager
def learnable_luts(model: nn.Module, given: GivenPalettes) -> Iterator[dict[str, LutWeight]]:
    """For the block, each layer of `given` computes with `LutWeight(given[layer])`, whose `lut` is the only
    parameter of `model` that requires a gradient; on exit the parametrizations are removed and the original
    weights (the same tensors, never written) and every parameter's `requires_grad` come back.

    Yields:
        `dict[str, LutWeight]`: layer -> its parametrization (`.lut` to optimise, `.palette()` to read).
    """
    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    luts: dict[str, LutWeight] = {}
    try:
        for name, palette in given.items():
            layer = get_layer(model, name)
            given.palette(name, tuple(layer.weight.shape), palette.config)  # the shape checked
            lut = LutWeight(palette).to(layer.weight.device)
            parametrize.register_parametrization(layer, "weight", lut)
            luts[name] = lut
        yield luts
    finally:
        for name in luts:
            parametrize.remove_parametrizations(get_layer(model, name), "weight", leave_parametrized=False)
        for p, flag in requires.items():
            p.requires_grad_(flag)


def learned_palettes(luts: Mapping[str, LutWeight]) -> GivenPalettes:
    """The LUTs of `luts` now, float16, with their fixed indices, as `GivenPalettes`."""
    return GivenPalettes({name: lut.palette() for name, lut in luts.items()})
