"""Hand Core ML a palette we fitted: its LUT and indices, stored as they are.

Core ML's `palettize_weights` fits k-means and uniform palettes itself (and `fit_palette` reproduces those bit for
bit, far faster), but not data-aware ones. An export hands it every palette fitted here: `explicit_lut_config`
gives coremltools an `OpPalettizerConfig` in `mode="custom"` whose `lut_function` returns our fitted LUT and
indices, group by group: the package stores our LUT (all 2**nbits entries, so the width is the config's) and our
indices, and its decompressed weight is
`fit_palette(...).dense()` exactly, as `verify_package` then checks on the saved package. (`mode="unique"` on the
simulated weights would store the same dense weight, but picks the width from the number of distinct values,
which can fall below the config's, e.g. to a 3-bit LUT iOS17 cannot store.)

A palette given explicitly (`workbench.palettes.given.GivenPalettes`: a learned LUT) is stored the same way, as
given, instead of fitted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from workbench.errors import InvalidValueError
from workbench.models.layers import get_layer
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import Palette, fit_palette


class ExplicitLut:
    """A coremltools `lut_function` returning one fitted palette's LUT and indices, one channel group per call.

    coremltools splits the weight into groups of `group_size` output channels (axis 0; one group per tensor) and
    calls the function once per group, in order, with that group's float16 values. Each call is checked against
    the float16 weight the palette was fitted on, so a different split or order fails instead of storing a wrong
    LUT. The palette is fitted on the first call and released after the last.

    Args:
        weight (`torch.Tensor`): the torch layer's weight (the converted program holds it cast to float16).
        config (`PaletteConfig`): how to palettize it.
        importance (`np.ndarray`, *optional*): for data-aware configs, see `fit_palette`.
        given (`Palette`, *optional*): store this palette (its LUT and indices) instead of fitting one; still checked
            group by group against `weight`, which must be the weight the converted program holds.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        config: PaletteConfig,
        importance: np.ndarray | None = None,
        given: Palette | None = None,
    ):
        self.weight, self.config, self.importance, self.given = weight, config, importance, given
        self._palette = None
        self._source: np.ndarray | None = None
        self._next = 0

    def fit(self) -> None:
        """Fit the palette now (e.g. in a worker thread: the k-means kernels release the GIL), not at the first
        call."""
        if self._palette is None:
            self._palette = self.given
            if self._palette is None:
                self._palette = fit_palette(self.weight, self.config, importance=self.importance)
            self._source = self.weight.detach().to("cpu", torch.float16).numpy()
            self._next = 0

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.fit()
        palette, group = self._palette, self._next
        rows = palette.indices.shape[0] // palette.lut.shape[0]
        expected = self._source[group * rows : (group + 1) * rows]
        if values.size != expected.size or not np.array_equal(
            np.asarray(values, np.float16).reshape(-1).view(np.uint16), expected.reshape(-1).view(np.uint16)
        ):
            raise RuntimeError(
                f"coremltools asked for a LUT of {values.shape} values that are not group {group} of the "
                f"{self.config.key} palette's weight {tuple(self.weight.shape)}"
            )
        lut, indices = palette.lut[group], palette.indices[group * rows : (group + 1) * rows].reshape(-1)
        self._next += 1
        if self._next == palette.lut.shape[0]:  # the last group: let the palette go
            self._palette = self._source = None
        return lut, indices


def explicit_lut_config(
    weight: torch.Tensor, config: PaletteConfig, importance: np.ndarray | None = None, given: Palette | None = None
):
    """An `OpPalettizerConfig` storing `fit_palette(weight, config, importance=importance)` as fitted, or the
    palette `given` as it is.

    Returns:
        `coremltools.optimize.coreml.OpPalettizerConfig` (`mode="custom"`, the config's granularity).
    """
    import coremltools as ct

    kwargs = {"mode": "custom", "lut_function": ExplicitLut(weight, config, importance, given), "weight_threshold": 0}
    if config.granularity == "per_grouped_channel":
        kwargs.update(granularity="per_grouped_channel", group_size=config.group_size, channel_axis=0)
    return ct.optimize.coreml.OpPalettizerConfig(**kwargs)


def op_config(layer: str, config: PaletteConfig, module: nn.Module | None, importance, given=None):
    """The `OpPalettizerConfig` of torch layer `layer` of `module`.

    A layer of `given` (`workbench.palettes.given.GivenPalettes`, which needs the module) stores its given palette,
    checked against `config` and the weight's shape.

    With the torch module (an export), every palette is fitted here (`fit_palette`: the analysis' own fit, bit-exact
    with Core ML's k-means and uniform fits and far faster) and stored as fitted (`explicit_lut_config`), so no
    palette is fitted twice; a data-aware one with `importance` (`workbench.palettes.importance.Importance`).
    Without it (a package converted elsewhere, whose weights need not be laid out as the torch layer's), Core ML
    fits k-means and uniform palettes itself (`PaletteConfig.to_coreml`: the same LUTs).
    """
    if module is None:
        if given is not None and layer in given:
            raise ValueError(f"the given palette of {layer!r} needs the torch module it is checked against")
        if config.data_aware:
            raise ValueError(f"the data-aware palette {config.key} of {layer!r} needs the torch module and importance")
        return config.to_coreml()
    weight = get_layer(module, layer).weight
    if given is not None and layer in given:
        return explicit_lut_config(weight, config, given=given.palette(layer, tuple(weight.shape), config))
    if not config.data_aware:
        return explicit_lut_config(weight, config)
    if importance is None:
        raise ValueError(f"the data-aware palette {config.key} of {layer!r} needs the torch module and importance")
    return explicit_lut_config(weight, config, importance.for_weight(layer, tuple(weight.shape)))


def check_importance(module: nn.Module, palette: Mapping[str, PaletteConfig], importance, given=None):
    """`importance` if some palette of the plan is data-aware and not `given` (checked to cover each of those
    layers), else None.

    Raises:
        InvalidValueError: data-aware palettes without importances, or importances missing or misshapen for one.
    """
    data_aware = [name for name, cfg in palette.items() if cfg.data_aware and (given is None or name not in given)]
    if not data_aware:
        return None
    if importance is None:
        raise InvalidValueError(
            f"{len(data_aware)} layers have data-aware palettes (e.g. {data_aware[0]!r}: "
            f"{palette[data_aware[0]].key}), which need the analysis' importances: pass --importance "
            "<analysis dir>/importance.npz"
        )
    for name in data_aware:
        importance.for_weight(name, tuple(get_layer(module, name).weight.shape))
    return importance
