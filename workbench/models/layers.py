"""Which layers of a model palettization applies to, by their diffusers module path."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Iterator, Sequence

from torch import nn

from workbench.errors import UserError

REFERENCE_MIN_NUMEL = 100_000  # the reference's candidates: weight.numel() > 1e5


class LayerNotFoundError(UserError, KeyError):
    """A layer name that is not in the model; the message lists the closest real names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def compressible_layers(module: nn.Module, min_numel: int = REFERENCE_MIN_NUMEL) -> dict[str, nn.Module]:
    """The `nn.Linear` and `nn.Conv2d` layers whose weight has more than `min_numel` elements.

    Args:
        module (`nn.Module`): a UNet, text encoder or VAE.
        min_numel (`int`, defaults to 100,000): strict lower bound on `weight.numel()`, as in the reference.
            Tiny models need a lower one (coremltools' own default is 2,048).

    Returns:
        `dict[str, nn.Module]`: module path -> layer, in the model's module order.
    """
    if min_numel < 0:
        raise ValueError(f"min_numel must be >= 0, got {min_numel}")
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight.numel() > min_numel
    }


def closest_names(name: str, names, n: int = 5) -> list[str]:
    """Up to `n` names from `names` that look most like `name`."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if len(close) < n:
        # Long dotted paths differ in one index; fall back to the shared-prefix neighbours.
        tail = name.rsplit(".", 1)[-1]
        close += [c for c in names if c.endswith("." + tail) and c not in close][: n - len(close)]
    return close


def get_layer(module: nn.Module, name: str) -> nn.Module:
    """The submodule at `name`, or a `LayerNotFoundError` that names the closest real layers."""
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        layer = None
    if layer is None or not hasattr(layer, "weight"):
        candidates = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        hint = ", ".join(closest_names(name, candidates)) or "none"
        raise LayerNotFoundError(f"no layer {name!r} with a weight in {type(module).__name__}; closest: {hint}")
    return layer


def select_layers(
    layers: dict[str, nn.Module], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The layers whose names match any `include` glob (all when empty) and no `exclude` glob, in module order.

    Patterns are shell-style (`fnmatch.fnmatchcase`, as optimum-quanto's include/exclude): `*` spans dots, so
    `"mid_block.*"` is every layer of the middle block and `"*.attn2.*"` every cross-attention projection.

    Raises:
        LayerNotFoundError: a pattern matches no layer (the message shows names that look like it), or nothing
            is left after the exclusions.
    """
    names = list(layers)
    for pattern in (*include, *exclude):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            hint = ", ".join(closest_names(pattern.replace("*", ""), names, 3)) or names[0]
            raise LayerNotFoundError(f"layer pattern {pattern!r} matches none of the {len(names)} layers; e.g. {hint}")
    chosen = {
        name: layer
        for name, layer in layers.items()
        if (not include or any(fnmatch.fnmatchcase(name, p) for p in include))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        raise LayerNotFoundError(f"no layer left after include={list(include)} and exclude={list(exclude)}")
    return chosen


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, `model`'s gradient checkpointing (diffusers': each resnet and transformer keeps only its
    input and runs again in the backward pass) is on, if `enabled` and the model supports it; yields whether it is.
    The same operations run on the same values, so gradients are unchanged; activation memory falls to about one
    block's, for one more forward pass. The model's own setting is restored after."""
    supported = enabled and getattr(model, "_supports_gradient_checkpointing", False)
    was_on = supported and model.is_gradient_checkpointing
    if supported and not was_on:
        model.enable_gradient_checkpointing()
    try:
        yield bool(supported)
    finally:
        if supported and not was_on:
            model.disable_gradient_checkpointing()
