"""Per-weight importance from calibration: the second moment of each layer's input channels.

A layer computes `y = W x`; palettizing `W` to `Q` changes its output by `(W - Q) x`, whose expected square
is `sum_o sum_j (w_oj - q_oj)**2 * E[x_j**2]` when the input channels are uncorrelated. So `E[x_j**2]`, the
mean square of input channel j over the calibration inputs, is the importance of every weight that
multiplies channel j, and `sum(importance * (w - q)**2)` (`palette_error`) is a cheap proxy of the output
error that data-aware (`"wkmeans"`) palettes minimise exactly.

`collect_importance` gathers `E[x_j**2]` by forward pre-hooks on the chosen layers while running a callable
(the analysis' one-step probe: the UNet on the exact inputs the analysis measures on). Linear: mean over every
token of the batch; Conv2d: mean over the batch and the spatial positions of the input, so `w[o, j, kh, kw]`
gets channel j's importance. The result, an `Importance`, holds per layer an array broadcastable to the
weight's shape, and is saved beside the analysis as `importance.npz` so an export re-fits the same palettes.

Example:
    >>> probe = OneStepProbe(pipe, prompts)
    >>> importance = collect_importance(pipe.unet, compressible_layers(pipe.unet, 2048), probe)
    >>> config = PaletteConfig(4, "wkmeans")
    >>> with palettized(pipe.unet, {name: config}, importance=importance):
    ...     probe.psnr()
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InvalidValueError
from workbench.io import atomic_path
from workbench.metrics import weight_snr_db
from workbench.models.layers import closest_names, get_layer
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import Palette, fit_palette

IMPORTANCE_FILE = "importance.npz"  # beside an analysis' outputs


def expand_importance(layer: nn.Module, moments: np.ndarray) -> np.ndarray:
    """Per-input-channel importance as an array broadcastable to `layer.weight`'s shape.

    Args:
        layer (`nn.Linear` or `nn.Conv2d`): the layer.
        moments (`np.ndarray`): float64, one value per input channel of the layer (`in_features` /
            `in_channels`).

    Returns:
        `np.ndarray`: float64; Linear `(1, in)`, Conv2d `(1, in, 1, 1)`, a grouped Conv2d `(out, in / groups, 1,
        1)` (output channel o of group g reads input channels `g * in / groups ...`).
    """
    moments = np.asarray(moments, dtype=np.float64).reshape(-1)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        expected = weight.shape[1]
    elif isinstance(layer, nn.Conv2d):
        expected = weight.shape[1] * layer.groups
    else:
        raise TypeError(f"importance is defined for nn.Linear and nn.Conv2d, got {type(layer).__name__}")
    if moments.size != expected:
        raise ValueError(f"{moments.size} channel moments for a layer with {expected} input channels")
    if isinstance(layer, nn.Linear):
        return moments[None, :]
    groups = layer.groups
    per_group = moments.reshape(groups, -1)  # (groups, in / groups)
    if groups == 1:
        return per_group[:, :, None, None]
    return np.repeat(per_group, weight.shape[0] // groups, axis=0)[:, :, None, None]


@dataclass(frozen=True, eq=False)
class Importance:
    """Per-layer weight importances: layer name -> float64 array (>= 0) broadcastable to the layer's weight.

    Attributes:
        arrays (`Mapping[str, np.ndarray]`): as `expand_importance` returns them.
    """

    arrays: Mapping[str, np.ndarray]

    def __post_init__(self):
        arrays = {str(k): np.array(v, dtype=np.float64) for k, v in self.arrays.items()}  # copies: frozen below
        bad = [k for k, v in arrays.items() if not (np.all(np.isfinite(v)) and np.all(v >= 0))]
        if bad:
            raise InvalidValueError(
                f"importances must be finite and >= 0; not so for {len(bad)} layers, e.g. {bad[0]!r}"
            )
        for value in arrays.values():
            value.setflags(write=False)
        object.__setattr__(self, "arrays", arrays)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def for_weight(self, name: str, shape: Iterable[int]) -> np.ndarray:
        """The importance of every weight of layer `name` (a read-only broadcast view of the weight's `shape`).

        Raises:
            InvalidValueError: no importance for `name` (the closest names are listed), or one of another shape.
        """
        shape = tuple(shape)
        if name not in self.arrays:
            hint = ", ".join(closest_names(name, self.arrays, 3)) or "none"
            raise InvalidValueError(
                f"no importance for layer {name!r} ({len(self.arrays)} layers have one; closest: {hint}); "
                "collect it with collect_importance over that layer"
            )
        array = self.arrays[name]
        try:
            return np.broadcast_to(array, shape)
        except ValueError:
            raise InvalidValueError(
                f"the importance of {name!r} has shape {array.shape}, which does not fit its weight {shape}: "
                "was it collected on another model?"
            ) from None

    def channels(self, name: str) -> np.ndarray:
        """Layer `name`'s importance per input channel of its weight, `E[x_j**2]` (float64, 1-D; for a grouped
        conv, those of output channel 0's group)."""
        array = self.arrays[name]
        return array.reshape(-1) if array.shape[0] == 1 else array.reshape(array.shape[0], -1)[0]

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the names, shapes and values: equal digests, equal importances (cache keys, records)."""
        h = hashlib.sha256()
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            h.update(f"{name}:{array.shape};".encode())
            h.update(array.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (`.npz`, one array per layer, keyed by its name) atomically."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.arrays)  # a file object: np.savez would add ".npz" to a path that lacks it
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Importance:
        """Read a file `save` wrote.

        Raises:
            InvalidValueError: the file is missing or not an importance file.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidValueError(f"importance file not found: {path} (an analysis writes {IMPORTANCE_FILE})")
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls({name: data[name] for name in data.files})
        except (ValueError, OSError) as err:
            raise InvalidValueError(f"{path} is not an importance file ({IMPORTANCE_FILE}): {err}") from None


def _resolve(model: nn.Module, layers: Iterable[str] | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    if isinstance(layers, Mapping):
        return dict(layers)
    return {name: get_layer(model, name) for name in layers}


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _run_seeing_inputs(
    layers: Mapping[str, nn.Module], see: Callable[[str, torch.Tensor], None], run: Callable[[], object]
) -> None:
    """`run()`, with `see(name, x)` called on every input `x` the layer `name` of `layers` receives (forward
    pre-hooks, removed afterwards, also on error)."""
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: see(name, _layer_input(args, kwargs)), with_kwargs=True
        )
        for name, layer in layers.items()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()


def _square_sum(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per input channel `sum(x**2)` in float64 (float32, then float64, on MPS, which has no float64), and the
    number of values summed per channel. Linear inputs are (..., in); Conv2d inputs (N, C, H, W) or (C, H, W)."""
    x = x.detach()
    if isinstance(layer, nn.Linear):
        dims, channels = list(range(x.dim() - 1)), x.shape[-1]
    else:
        dims, channels = [d for d in range(x.dim()) if d != x.dim() - 3], x.shape[-3]
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    sums = x.to(wide).square().sum(dim=dims).to("cpu", torch.float64)
    return sums, x.numel() // channels


@torch.no_grad()
def collect_importance(
    model: nn.Module, layers: Iterable[str] | Mapping[str, nn.Module], run: Callable[[], object]
) -> Importance:
    """The input-channel second moments `E[x_j**2]` of `layers` while `run()` runs, as an `Importance`.

    Forward pre-hooks on the layers add up `x**2` per input channel in float64 (every call of a layer counts);
    they are removed afterwards, also on error. Run it with the float weights: the moments are those of the
    model as it is.

    Args:
        model (`nn.Module`): e.g. `pipe.unet`.
        layers (`Iterable[str]` or `Mapping[str, nn.Module]`): layer names in `model` (e.g.
            `compressible_layers(pipe.unet, 2048)`), Linear or Conv2d.
        run (`Callable[[], object]`): runs the model on the calibration inputs, e.g. a `OneStepProbe`.

    Returns:
        `Importance`: per layer `expand_importance(layer, E[x_j**2])`.

    Raises:
        RuntimeError: `run()` did not call some of the layers (named).
    """
    chosen = _resolve(model, layers)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(chosen, 0)

    def add(name: str, x: torch.Tensor) -> None:
        square, count = _square_sum(chosen[name], x)
        sums[name] = square if name not in sums else sums[name] + square
        counts[name] += count

    _run_seeing_inputs(chosen, add, run)
    missing = [name for name in chosen if name not in sums]
    if missing:
        raise RuntimeError(f"run() never called {len(missing)} of the layers, e.g. {', '.join(missing[:3])}")
    return Importance({n: expand_importance(chosen[n], (sums[n] / counts[n]).numpy()) for n in chosen})


@torch.no_grad()
def capture_inputs(
    model: nn.Module, layers: Iterable[str] | Mapping[str, nn.Module], run: Callable[[], object]
) -> dict[str, list[torch.Tensor]]:
    """The inputs each of `layers` received while `run()` ran (one tensor per call, detached copies), for
    measuring a layer's output error (`layer_output_mse`). Holds them all in memory: use it on a few layers or
    a small model."""
    chosen = _resolve(model, layers)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in chosen}
    _run_seeing_inputs(chosen, lambda name, x: inputs[name].append(x.detach().clone()), run)
    return inputs


def _forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if layer.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={layer.padding_mode!r}")
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@torch.no_grad()
def layer_output_mse(layer: nn.Module, inputs: Iterable[torch.Tensor], weight) -> float:
    """Mean squared difference of the layer's outputs with `weight` instead of its own, over `inputs`, in float64.

    Args:
        layer (`nn.Linear` or `nn.Conv2d`): the layer, with its float weight.
        inputs (`Iterable[torch.Tensor]`): what it received (`capture_inputs`).
        weight (`torch.Tensor` or `np.ndarray`): the replacement, e.g. `Palette.dense()`, the weight's shape.

    Returns:
        `float`: `mean((f(x; weight) - f(x; layer.weight))**2)` over every output value of every input.
    """
    reference = layer.weight.detach().to("cpu", torch.float64)
    test = torch.as_tensor(np.asarray(weight) if not isinstance(weight, torch.Tensor) else weight)
    test = test.to("cpu", torch.float64).reshape(reference.shape)
    total, count = 0.0, 0
    for x in inputs:
        x = x.to("cpu", torch.float64)
        diff = _forward(layer, x, test) - _forward(layer, x, reference)
        total += float(diff.square().sum())
        count += diff.numel()
    if count == 0:
        raise ValueError("layer_output_mse needs at least one input")
    return total / count


def palette_error(
    weight: torch.Tensor | np.ndarray, palette: Palette | PaletteConfig, importance: np.ndarray | None = None
) -> float:
    """The importance-weighted squared error of a palettized weight: `sum(importance * (w - q)**2)`, float64.

    `w` is the weight as given (its float16 rounding counts as error too), `q` the palette's dense weight; with
    `importance=None` every weight counts 1 (the plain squared error). With input-channel second moments as the
    importance (`Importance.for_weight`) this estimates the layer's summed output error per input vector.

    Args:
        weight (`torch.Tensor` or `np.ndarray`): the float weight, axis 0 = output channels.
        palette (`Palette` or `PaletteConfig`): a fitted palette of `weight`, or a config to fit (a data-aware one
            is fitted with `importance`).
        importance (`np.ndarray`, *optional*): >= 0, broadcastable to the weight's shape.

    Returns:
        `float`.
    """
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    w = np.asarray(weight, dtype=np.float64)
    if isinstance(palette, PaletteConfig):
        palette = fit_palette(weight, palette, importance=importance)
    error = np.square(w - palette.dense().astype(np.float64))
    if importance is not None:
        error *= np.broadcast_to(np.asarray(importance, dtype=np.float64), w.shape)
    return float(error.sum())


@torch.no_grad()
def data_aware_table(layer: nn.Module, palettes: Mapping[str, Palette], importance: np.ndarray, inputs):
    """How palettes of one layer compare: weight SNR, importance-weighted error, and the layer's output error.

    Args:
        layer (`nn.Linear` or `nn.Conv2d`): the layer, with its float weight.
        palettes (`Mapping[str, Palette]`): label -> a palette of `layer.weight` (e.g. plain and data-aware).
        importance (`np.ndarray`): broadcastable to the weight (`Importance.for_weight`).
        inputs (`Iterable[torch.Tensor]`): the layer's captured inputs (`capture_inputs`).

    Returns:
        `pd.DataFrame`: one row per palette: `palette`, `weight_snr_db` (`weight_snr_db` of the float16 weight),
        `weighted_error` (`palette_error` with `importance`), `output_mse` (`layer_output_mse`) and
        `output_snr_db` = `10 * log10(mean(y**2) / output_mse)`, y the float layer's outputs.
    """
    import pandas as pd

    inputs = list(inputs)
    w16 = layer.weight.detach().to("cpu", torch.float16).numpy()
    weight = layer.weight.detach().to("cpu", torch.float64)
    outputs = [_forward(layer, x.to("cpu", torch.float64), weight) for x in inputs]
    signal = sum(float(y.square().sum()) for y in outputs) / sum(y.numel() for y in outputs)
    rows = []
    for label, palette in palettes.items():
        mse = layer_output_mse(layer, inputs, palette.dense())
        rows.append(
            {
                "palette": label,
                "weight_snr_db": weight_snr_db(w16, palette.dense()),
                "weighted_error": palette_error(layer.weight, palette, importance),
                "output_mse": mse,
                "output_snr_db": 10 * np.log10(signal / mse),
            }
        )
    return pd.DataFrame(rows)
