"""Palettize a model's layers in place for the duration of a `with` block (`palettized`) and restore them exactly."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from workbench.models.layers import get_layer
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import (
    PaletteConfig,
    as_config,
)
from workbench.palettes.fit import linear_quantize_tensor, palettize_tensor
from workbench.palettes.given import GivenPalettes
from workbench.palettes.stash import WeightStash


def replacement_weight(
    name: str, layer: nn.Module, spec, cache: PaletteCache | None = None, importance=None, given=None
) -> torch.Tensor | None:
    """The weight `layer` (named `name`) takes under a recipe entry `spec` (`palettized`'s), or None (float16).
    A layer of `given` (`GivenPalettes`) takes its given palette, checked against `spec` and the weight's shape."""
    if spec == "linear8" or spec == "linear8_per_channel":
        return linear_quantize_tensor(layer.weight, per_channel=spec == "linear8_per_channel")
    config = as_config(spec)
    if config is None:
        return None
    if given is not None and name in given:
        dense = given.palette(name, tuple(layer.weight.shape), config).dense()
        return torch.from_numpy(dense).to(device=layer.weight.device, dtype=layer.weight.dtype)
    if cache is not None:
        return cache.get(name, layer.weight, config)
    weights = importance.for_weight(name, tuple(layer.weight.shape)) if importance and config.data_aware else None
    return palettize_tensor(layer.weight, config, importance=weights)


def _check_importance(cache: PaletteCache | None, importance) -> None:
    if cache is not None and importance is not None and cache.importance is not importance:
        raise ValueError("pass the importance to the PaletteCache (PaletteCache(importance=...)), not beside it")


@contextmanager
@torch.no_grad()
def palettized(
    model: nn.Module,
    recipe: Mapping[str, int | PaletteConfig | str | None],
    cache: PaletteCache | None = None,
    stash: WeightStash | None = None,
    importance=None,
    given: GivenPalettes | None = None,
) -> Iterator[nn.Module]:
    """Palettize `model`'s layers in place for the duration of a `with` block, then restore them exactly.

    Nothing is deep-copied. Each listed layer's weight takes its palettized values and its original comes back
    bitwise on exit, also on error: kept as the original tensor (the same object) while the originals fit in the
    stash's memory budget, else written to the stash's temporary file and the palettized values written into
    the weight's own storage, so palettizing a whole full-size model does not hold it twice
    (`workbench.palettes.stash`).

    Args:
        model (`nn.Module`): e.g. `pipe.unet`.
        recipe (`Mapping[str, int | PaletteConfig | str | None]`): layer name -> bit width (16 or None:
            leave it), a `PaletteConfig` or its key (`"wkmeans4_g16"`), or `"linear8"` / `"linear8_per_channel"`
            for the int8 baselines.
        cache (`PaletteCache`, *optional*): reuse palettes across calls (data-aware ones with its importance).
        stash (`WeightStash`, *optional*): where originals wait, shared by nested blocks (a cumulative curve);
            None = a stash of this block's own with the default memory budget.
        importance (`workbench.palettes.importance.Importance`, *optional*): for data-aware palettes without a cache.
        given (`GivenPalettes`, *optional*): palettes used as given (learned ones) for the layers it holds, each
            checked against its recipe entry; the recipe's other layers are fitted as usual. `given.configs` is
            the recipe of the given palettes alone.
    """
    _check_importance(cache, importance)
    own = stash is None
    stash = WeightStash() if own else stash
    replaced: list[str] = []
    try:
        for name, spec in recipe.items():
            layer = get_layer(model, name)
            new = replacement_weight(name, layer, spec, cache, importance, given)
            if new is not None:
                stash.swap(name, layer.weight, new, cache)
                replaced.append(name)
                del new  # on the disk path its values now live in the weight's storage
        yield model
    finally:
        for name in reversed(replaced):
            stash.restore(name, get_layer(model, name).weight)
        if own:
            stash.close()
