"""Palettes given explicitly: per layer, a `Palette` (LUT, indices, config) that is used as it is, never refitted.

Every other path fits a layer's palette from its weight (`fit_palette`). A palette learned elsewhere (learned LUTs,
`workbench.tune`; training-time palettization) is not a function of the weight any more: `GivenPalettes` carries
it from where it was made to the torch simulation (`palettized(..., given=...)`), the Core ML export (stored as
its LUT and indices, `workbench.coreml.explicit_lut`) and the read-back (`verify_package(..., given=...)` checks
the package's weights against `dense()` bit for bit). One `.npz` file beside the recipe holds them
(`save` / `load`, exact round trip).

Example:
    >>> given = GivenPalettes({"mid_block.attentions.0.proj_in": palette})  # a fitted or learned `Palette`
    >>> given.save("tuned_palettes.npz")
    >>> with palettized(pipe.unet, given.configs, given=GivenPalettes.load("tuned_palettes.npz")):
    ...     image = pipe(prompt).images[0]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from workbench.errors import InvalidValueError
from workbench.io import atomic_path
from workbench.models.layers import get_layer
from workbench.palettes.config import PaletteConfig, as_config
from workbench.palettes.fit import Palette, fit_palette
from workbench.palettes.size import bits_per_param

_CONFIGS = "__configs__"  # the file's JSON of layer -> config key


def _checked(name: str, palette: Palette) -> Palette:
    """`palette`, checked to be one Core ML can store as it is: float16 LUTs of 2**nbits entries, one per channel
    group, uint8 indices below 2**nbits."""
    if not isinstance(palette, Palette):
        raise InvalidValueError(f"given palette {name!r} is a {type(palette).__name__}, not a Palette")
    cfg, lut, idx = palette.config, palette.lut, palette.indices
    groups = idx.shape[0] // cfg.group_size if cfg.granularity == "per_grouped_channel" and idx.ndim else 1
    if lut.dtype != np.float16 or lut.shape != (groups, 1 << cfg.nbits):
        raise InvalidValueError(
            f"given palette {name!r} ({cfg.key}, weight {idx.shape}): its LUT must be float16 of shape "
            f"{(groups, 1 << cfg.nbits)}, got {lut.dtype} {lut.shape}"
        )
    if idx.dtype != np.uint8 or idx.ndim == 0 or (idx.size and int(idx.max()) >= 1 << cfg.nbits):
        raise InvalidValueError(f"given palette {name!r}: indices must be uint8 below {1 << cfg.nbits}")
    if cfg.granularity == "per_grouped_channel" and idx.shape[0] % cfg.group_size:
        raise InvalidValueError(f"given palette {name!r}: {cfg.key} does not divide {idx.shape[0]} output channels")
    return palette


class GivenPalettes(Mapping[str, Palette]):
    """Layer name -> `Palette` (read-only mapping), used as given: LUTs and indices are never refitted.

    Args:
        palettes (`Mapping[str, Palette]`): each checked (`float16` LUT of shape `(groups, 2**nbits)`, `uint8`
            indices in the weight's shape). The config of each records its width and granularity; its mode says how
            the indices were first fitted.
    """

    def __init__(self, palettes: Mapping[str, Palette]):
        self._palettes = {str(name): _checked(str(name), p) for name, p in palettes.items()}

    @classmethod
    def fit(cls, module, recipe: Mapping, importance=None) -> GivenPalettes:
        """The post-training palettes of `recipe` (layer -> width, key or `PaletteConfig`; 16/None skipped), fitted
        from `module`'s weights (`fit_palette`, data-aware ones with `importance`, an `Importance`): the starting
        point of a learned palette."""
        palettes = {}
        for name, spec in recipe.items():
            config = as_config(spec)
            if config is not None:
                weight = get_layer(module, name).weight
                aware = config.data_aware and importance is not None
                weights = importance.for_weight(name, tuple(weight.shape)) if aware else None
                palettes[name] = fit_palette(weight, config, importance=weights)
        return cls(palettes)

    def __getitem__(self, name: str) -> Palette:
        return self._palettes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._palettes)

    def __len__(self) -> int:
        return len(self._palettes)

    def __repr__(self) -> str:
        return f"GivenPalettes({len(self)} layers)"

    @property
    def configs(self) -> dict[str, PaletteConfig]:
        """Layer -> `PaletteConfig`: the recipe these palettes realise (`Recipe(name, {k: c.key ...})` names it)."""
        return {name: p.config for name, p in self._palettes.items()}

    def dense(self, name: str) -> np.ndarray:
        """Layer `name`'s palettized weight, float16, in its weight's shape (`Palette.dense`)."""
        return self[name].dense()

    def palette(self, name: str, shape: tuple, config: PaletteConfig) -> Palette:
        """Layer `name`'s palette, checked against what the caller is about to palettize.

        Raises:
            InvalidValueError: its weight's `shape` or the planned `config` differ from the given palette's
                (a width or granularity the recipe changed, or palettes from another model).
        """
        palette = self[name]
        if tuple(shape) != palette.indices.shape:
            raise InvalidValueError(
                f"the given palette of {name!r} is for a weight of shape {palette.indices.shape}, not {tuple(shape)}: "
                "was it made on another model?"
            )
        if config != palette.config:
            raise InvalidValueError(
                f"layer {name!r}: the recipe asks for {config.key}, the given palette is {palette.config.key}"
            )
        return palette

    def check_plan(self, plan: Mapping[str, PaletteConfig | None]) -> None:
        """Every given layer must be planned with its own config (else its palette would be dropped or refitted).

        Raises:
            InvalidValueError: naming the first layer left out or planned otherwise.
        """
        for name, palette in self._palettes.items():
            planned = plan.get(name)
            if planned != palette.config:
                what = "leaves it float16" if planned is None else f"asks for {planned.key}"
                raise InvalidValueError(
                    f"the given palette of {name!r} is {palette.config.key}, but the recipe {what} "
                    f"({len(self)} given palettes; export them with their own recipe)"
                )

    @property
    def nbytes(self) -> int:
        """Stored bytes of the given layers in a package: packed indices plus float16 LUTs (`Palette.nbytes`)."""
        return sum(p.nbytes for p in self._palettes.values())

    def bits_per_param(self, numels: Mapping[str, int] | None = None) -> float:
        """`workbench.palettes.size.bits_per_param` of `configs` over `numels` (the model's candidate layers: those
        not given count as float16); None: over the given layers alone."""
        numels = {n: p.indices.size for n, p in self._palettes.items()} if numels is None else numels
        return bits_per_param(self.configs, numels)

    @property
    def digest(self) -> str:
        """A short hash of names, configs, LUT bits and indices: equal digests, equal palettes."""
        h = hashlib.sha256()
        for name in sorted(self._palettes):
            p = self._palettes[name]
            h.update(f"{name}:{p.config.key}:{p.indices.shape};".encode())
            h.update(np.ascontiguousarray(p.lut).tobytes())
            h.update(np.ascontiguousarray(p.indices).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (`.npz`: `lut/<layer>` float16, `indices/<layer>` uint8, and the configs' keys as JSON)
        atomically; `load` reads it back bit for bit."""
        path = Path(path)
        arrays = {_CONFIGS: np.array(json.dumps({n: p.config.key for n, p in self._palettes.items()}))}
        for name, p in self._palettes.items():
            arrays[f"lut/{name}"], arrays[f"indices/{name}"] = p.lut, p.indices
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would add ".npz" to a path that lacks it
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GivenPalettes:
        """Read a file `save` wrote.

        Raises:
            InvalidValueError: the file is missing, or not a given-palettes file.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidValueError(f"given-palettes file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = json.loads(str(data[_CONFIGS]))
                palettes = {
                    name: Palette(data[f"lut/{name}"], data[f"indices/{name}"], PaletteConfig.from_key(key))
                    for name, key in keys.items()
                }
        except (ValueError, OSError, KeyError) as err:
            raise InvalidValueError(f"{path} is not a given-palettes file (GivenPalettes.save): {err}") from None
        return cls(palettes)
