"""Palettes: configs (`PaletteConfig`), exact k-means, fitting (bit-exact with coremltools), the cache, applying
them to a model and restoring it, sizes, and per-weight importances for data-aware palettes."""

from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import FLOAT_BITS, SUPPORTED_NBITS, PaletteConfig
from workbench.palettes.fit import Palette, fit_palette
from workbench.palettes.given import GivenPalettes
from workbench.palettes.importance import Importance, collect_importance
from workbench.palettes.size import bits_per_param, size_report

__all__ = [
    "bits_per_param",
    "collect_importance",
    "fit_palette",
    "FLOAT_BITS",
    "GivenPalettes",
    "Importance",
    "Palette",
    "PaletteCache",
    "PaletteConfig",
    "palettized",
    "size_report",
    "SUPPORTED_NBITS",
]
