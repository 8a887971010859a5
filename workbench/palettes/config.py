"""How to palettize one weight: `PaletteConfig`, its short keys, and what each Core ML deployment target stores.

A config is a width (1, 2, 3, 4, 6 or 8 bits), a mode (`"kmeans"` and `"uniform"` as Core ML fits them,
`"wkmeans"` data-aware k-means) and a granularity (one LUT per tensor, or one per group of output channels).
Its key names it in recipes and tables: `kmeans4`, `kmeans4_g16`, `wkmeans3` (`PaletteConfig.from_key`).
iOS17 stores per-tensor LUTs of 1, 2, 4, 6 or 8 bits; grouped and 3-bit LUTs need iOS18 (`check_target`,
`candidate_configs`).

Example:
    >>> PaletteConfig.from_key("wkmeans4_g16")
    PaletteConfig(nbits=4, mode='wkmeans', granularity='per_grouped_channel', group_size=16)
    >>> [c.key for c in candidate_configs("iOS17", nbits=(2, 3, 4), modes=("kmeans",))]
    ['kmeans2', 'kmeans4']
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from workbench.errors import InvalidValueError

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)
FLOAT_BITS = 16  # a recipe's "leave this layer float16"
MODES = ("kmeans", "uniform", "wkmeans")
DATA_AWARE_MODES = ("wkmeans",)  # fitted with per-weight importances
GRANULARITIES = ("per_tensor", "per_grouped_channel")
GROUP_SIZES = (8, 16, 32)  # output channels per LUT among the candidate grouped palettes
KMEANS_1D_MIN_NUMEL = 10_000  # coremltools' switch from scikit-learn to exact 1-D k-means
TARGETS = ("iOS17", "iOS18")  # Core ML deployment targets: iOS17 = per-tensor 1/2/4/6/8-bit LUTs only
IOS17_NBITS = (1, 2, 4, 6, 8)
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


def check_target(config: PaletteConfig, target: str) -> PaletteConfig:
    """`config` if Core ML's `target` can store it, else an `InvalidValueError` saying why and what is valid.

    iOS17 (macOS14) stores per-tensor LUTs of 1, 2, 4, 6 or 8 bits; iOS18 (macOS15) also grouped and 3-bit ones.
    """
    if target not in TARGETS:
        raise InvalidValueError(f"unknown deployment target {target!r}; valid: {', '.join(TARGETS)}")
    if TARGETS.index(config.target) > TARGETS.index(target):
        raise InvalidValueError(
            f"palette {config.key} needs {config.target} (grouped or 3-bit LUTs); {target} stores per-tensor "
            f"palettes of {', '.join(map(str, IOS17_NBITS))} bits only"
        )
    return config


def candidate_configs(
    target: str = "iOS18",
    *,
    nbits: Iterable[int] = SUPPORTED_NBITS,
    modes: Iterable[str] = ("kmeans", "wkmeans"),
    group_sizes: Iterable[int] = GROUP_SIZES,
    out_channels: int | None = None,
) -> list[PaletteConfig]:
    """Every palette `target` can store, among the widths, modes and group sizes given.

    Args:
        target (`str`, defaults to `"iOS18"`): `"iOS17"` (per-tensor 1/2/4/6/8 bits) or `"iOS18"` (all).
        nbits (`Iterable[int]`, defaults to 1, 2, 3, 4, 6, 8): widths to consider.
        modes (`Iterable[str]`, defaults to ("kmeans", "wkmeans")): plain and data-aware k-means.
        group_sizes (`Iterable[int]`, defaults to (8, 16, 32)): output channels per LUT of the grouped candidates.
        out_channels (`int`, *optional*): a layer's output channels: group sizes that do not divide it are left out.

    Returns:
        `list[PaletteConfig]`: per mode, per width, per-tensor then grouped by increasing group size.
    """
    if target not in TARGETS:
        raise InvalidValueError(f"unknown deployment target {target!r}; valid: {', '.join(TARGETS)}")
    sizes = [g for g in group_sizes if out_channels is None or (g <= out_channels and out_channels % g == 0)]
    configs = []
    for mode in modes:
        for n in nbits:
            configs.append(PaletteConfig(n, mode))
            configs += [PaletteConfig(n, mode, "per_grouped_channel", g) for g in sorted(sizes)]
    return [c for c in configs if TARGETS.index(c.target) <= TARGETS.index(target)]
