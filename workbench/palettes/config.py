"""How to palettize one weight: `PaletteConfig`, its short keys, and what each Core ML deployment target stores.

A config is a width (1, 2, 3, 4, 6 or 8 bits), a mode (`"kmeans"` and `"uniform"` as Core ML fits them,
`"wkmeans"` data-aware k-means) and a granularity (one LUT per tensor, or one per group of output channels).
Its key names it in recipes and tables: `kmeans4`, `kmeans4_g16`, `wkmeans3` (`PaletteConfig.from_key`).
iOS17 stores per-tensor LUTs of 1, 2, 4, 6 or 8 bits; grouped and 3-bit LUTs need iOS18 (`PaletteConfig.target`).

Example:
    >>> PaletteConfig.from_key("wkmeans4_g16")
    PaletteConfig(nbits=4, mode='wkmeans', granularity='per_grouped_channel', group_size=16)
    >>> [PaletteConfig.from_key(k).target for k in ("kmeans4", "kmeans3", "kmeans4_g16")]
    ['iOS17', 'iOS18', 'iOS18']
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from workbench.errors import InvalidValueError

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)
FLOAT_BITS = 16  # a recipe's "leave this layer float16"
MODES = ("kmeans", "uniform", "wkmeans")
DATA_AWARE_MODES = ("wkmeans",)  # fitted with per-weight importances
GRANULARITIES = ("per_tensor", "per_grouped_channel")
KMEANS_1D_MIN_NUMEL = 10_000  # coremltools' switch from scikit-learn to exact 1-D k-means
_KEY = re.compile(r"(?P<mode>[a-z]+?)(?P<nbits>\d+)(?:_g(?P<group_size>\d+))?")


@dataclass(frozen=True)
class PaletteConfig:
    """How to palettize one weight.

    Args:
        nbits (`int`, defaults to 6): bits per index, one of 1, 2, 3, 4, 6, 8 (a LUT of 2**nbits values).
        mode (`str`, defaults to `"kmeans"`): `"kmeans"` (exact 1-D k-means, as Core ML fits it), `"uniform"`
            (evenly spaced), or `"wkmeans"` (data-aware: exact 1-D k-means weighted by per-weight importances;
            fitting one needs them, see `fit_palette`).
        granularity (`str`, defaults to `"per_tensor"`): one LUT per tensor, or `"per_grouped_channel"`:
            one LUT per `group_size` output channels (Core ML iOS18/macOS15).
        group_size (`int`, defaults to 0): output channels per LUT; must be > 0 for grouped palettes.
    """

    nbits: int = 6
    mode: str = "kmeans"
    granularity: str = "per_tensor"
    group_size: int = 0

    def __post_init__(self):
        if self.nbits not in SUPPORTED_NBITS:
            raise InvalidValueError(f"unsupported nbits {self.nbits!r}; valid: {', '.join(map(str, SUPPORTED_NBITS))}")
        if self.mode not in MODES:
            raise InvalidValueError(f"unknown palettization mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.granularity not in GRANULARITIES:
            raise InvalidValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.granularity == "per_grouped_channel" and self.group_size < 1:
            raise InvalidValueError(f"per_grouped_channel needs group_size >= 1, got {self.group_size}")
        if self.granularity == "per_tensor" and self.group_size != 0:
            raise InvalidValueError(f"group_size={self.group_size} only applies to per_grouped_channel palettes")

    @property
    def key(self) -> str:
        """A short stable name, e.g. `kmeans4`, `kmeans4_g16` or `wkmeans3_g8`; `from_key` reads it back."""
        suffix = f"_g{self.group_size}" if self.granularity == "per_grouped_channel" else ""
        return f"{self.mode}{self.nbits}{suffix}"

    @classmethod
    def from_key(cls, key: str) -> PaletteConfig:
        """The config named by `key` (`<mode><nbits>[_g<group_size>]`, e.g. `"wkmeans4_g16"`).

        Raises:
            InvalidValueError: `key` is not of that form, or names an unsupported mode, width or group size.
        """
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidValueError(
                f"{key!r} is not a palette config key; valid: <mode><nbits>[_g<group_size>] with mode one of "
                f"{', '.join(MODES)}, e.g. kmeans4, kmeans4_g16, wkmeans3"
            )
        group_size = int(match["group_size"] or 0)
        granularity = "per_grouped_channel" if match["group_size"] else "per_tensor"
        return cls(int(match["nbits"]), match["mode"], granularity, group_size)

    @property
    def data_aware(self) -> bool:
        """Whether fitting it needs per-weight importances (`mode="wkmeans"`)."""
        return self.mode in DATA_AWARE_MODES

    @property
    def target(self) -> str:
        """The oldest Core ML deployment target that stores it: `"iOS18"` if `needs_ios18`, else `"iOS17"`."""
        return "iOS18" if self.needs_ios18 else "iOS17"

    def nbytes(self, numel: int, out_channels: int) -> int:
        """Stored bytes of a weight of `numel` elements and `out_channels` output channels palettized this way:
        indices packed at `nbits` each, `ceil(numel * nbits / 8)`, plus every float16 LUT, 2 bytes an entry."""
        groups = out_channels // self.group_size if self.granularity == "per_grouped_channel" else 1
        return math.ceil(numel * self.nbits / 8) + groups * (1 << self.nbits) * 2

    @property
    def needs_ios18(self) -> bool:
        """Grouped palettes and 3-bit LUTs need the iOS18/macOS15 `constexpr_lut_to_dense` op."""
        return self.granularity == "per_grouped_channel" or self.nbits == 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PaletteConfig:
        unknown = set(d) - {"nbits", "mode", "granularity", "group_size"}
        if unknown:
            raise ValueError(f"unknown PaletteConfig keys {sorted(unknown)}")
        return cls(**d)

    def to_coreml(self):
        """The equivalent `coremltools.optimize.coreml.OpPalettizerConfig` (k-means and uniform; a data-aware
        palette is handed to Core ML as its LUT, `workbench.coreml.explicit_lut`)."""
        import coremltools as ct

        if self.data_aware:
            raise InvalidValueError(f"{self.key}: Core ML cannot fit data-aware palettes; export their LUTs instead")

        # weight_threshold=0: these are per-op configs, so compress whatever they name.
        kwargs = {"mode": self.mode, "nbits": self.nbits, "weight_threshold": 0}
        if self.granularity == "per_grouped_channel":
            kwargs.update(granularity="per_grouped_channel", group_size=self.group_size)
        return ct.optimize.coreml.OpPalettizerConfig(**kwargs)


def as_config(spec: int | str | PaletteConfig | None) -> PaletteConfig | None:
    """A recipe entry as a config: an int is k-means per tensor at that width; 16 or None means float16; a
    string is a config key (`PaletteConfig.from_key`, e.g. `"wkmeans4_g16"`)."""
    if spec is None or isinstance(spec, PaletteConfig):
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return None if spec == FLOAT_BITS else PaletteConfig(nbits=int(spec))
    if isinstance(spec, str):
        return PaletteConfig.from_key(spec)
    raise TypeError(f"a recipe entry must be an int bit width, a config key or a PaletteConfig, got {spec!r}")
