"""Interactive explorers for JupyterLab, and the plain computations behind them.

- `palette_error_table` / `PaletteState`: what palettizing one weight at each bit width does to it
  (weight SNR, stored bytes); the teaching notebook and the palette explorer both use them.
- `PaletteExplorer`: pick a layer, slide the bit width, toggle grouped palettes; histogram, LUT and error update.
- `RecipeExplorer`: pick a strategy, slide a target bits/param; see the chosen recipe's size (one label:
  `SizeReport.label`), bits per UNet block, its measured numbers and a preview image.

Each explorer keeps its update logic in `update()` and its result in `.state`, so a test sets widget values
and checks `.state` without a browser. ipywidgets and matplotlib are imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.metrics import weight_snr_db
from workbench.models.generation import generate_images
from workbench.palettes.apply import palettized
from workbench.palettes.config import SUPPORTED_NBITS, PaletteConfig, as_config
from workbench.palettes.fit import Palette, fit_palette
from workbench.palettes.size import SIZE_COLUMNS, SizeReport, recipe_size
from workbench.recipes.recipe import STRATEGIES, Recipe
from workbench.report.tables import COLUMN_LABELS, strategy_of
from workbench.viz.plots import STRATEGY_LABELS, plot_weight_histogram


def _as_float16(weight) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        return weight.detach().to("cpu", torch.float16).numpy()
    return np.asarray(weight).astype(np.float16)


def default_group_size(out_channels: int, target: int = 16) -> int:
    """The largest divisor of `out_channels` that is <= `target` (grouped palettes need an exact split)."""
    return max(d for d in range(1, min(target, out_channels) + 1) if out_channels % d == 0)


@dataclass(frozen=True)
class PaletteState:
    """One weight palettized one way: the palette and what it costs and loses.

    Attributes:
        layer: the layer's module path.
        config: how it was palettized.
        palette: the fitted `Palette` (LUT + indices).
        weight_snr_db: `weight_snr_db(float16 weight, palette.dense())`.
        rmse: root-mean-square error of the palettized weight, in weight units.
        index_bytes: packed indices, `ceil(numel * nbits / 8)`.
        lut_bytes: float16 LUT(s), `n_groups * 2**nbits * 2`.
        float16_bytes: the weight stored as float16, `2 * numel`.
    """

    layer: str
    config: PaletteConfig
    palette: Palette = field(repr=False)
    weight_snr_db: float
    rmse: float
    index_bytes: int
    lut_bytes: int
    float16_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.lut_bytes

    @property
    def pct_of_float16(self) -> float:
        return 100.0 * self.total_bytes / self.float16_bytes

    def row(self) -> dict:
        """The table row `palette_error_table` collects."""
        return {
            "layer": self.layer,
            "nbits": self.config.nbits,
            "granularity": self.config.granularity,
            "group_size": self.config.group_size,
            "n_luts": self.palette.lut.shape[0],
            "weight_snr_db": round(self.weight_snr_db, 2),
            "rmse": self.rmse,
            "index_bytes": self.index_bytes,
            "lut_bytes": self.lut_bytes,
            "total_bytes": self.total_bytes,
            "float16_bytes": self.float16_bytes,
            "pct_of_float16": round(self.pct_of_float16, 2),
        }

    def summary(self) -> str:
        """One line: bits, LUTs, SNR and bytes."""
        return (
            f"{self.layer}: {self.config.nbits}-bit {self.config.granularity} "
            f"({self.palette.lut.shape[0]} LUT{'s' if self.palette.lut.shape[0] > 1 else ''} of "
            f"{1 << self.config.nbits}), weight SNR {self.weight_snr_db:.1f} dB, "
            f"{self.total_bytes:,} bytes = {self.pct_of_float16:.1f}% of float16"
        )


def palette_state(layer: str, weight, config: PaletteConfig) -> PaletteState:
    """Palettize `weight` with `config` and measure it (see `PaletteState`)."""
    w16 = _as_float16(weight)
    palette = fit_palette(w16, config)
    dense = palette.dense()
    rmse = float(np.sqrt(np.mean((w16.astype(np.float64) - dense.astype(np.float64)) ** 2)))
    index_bytes = math.ceil(w16.size * config.nbits / 8)
    return PaletteState(
        layer=layer,
        config=config,
        palette=palette,
        weight_snr_db=weight_snr_db(w16, dense),
        rmse=rmse,
        index_bytes=index_bytes,
        lut_bytes=palette.lut.size * 2,
        float16_bytes=2 * w16.size,
    )


def palette_error_table(
    weight,
    *,
    layer: str = "weight",
    nbits: Sequence[int] = SUPPORTED_NBITS,
    group_size: int | None = None,
    group_nbits: Sequence[int] | None = None,
):
    """Weight SNR and bytes of one weight at each bit width, per tensor and (if `group_size`) grouped.

    Args:
        weight (`torch.Tensor` or `np.ndarray`): axis 0 = output channels.
        layer (`str`, defaults to `"weight"`): name for the table.
        nbits (`Sequence[int]`, defaults to every supported width 1, 2, 3, 4, 6, 8).
        group_size (`int`, *optional*): also fit one LUT per `group_size` output channels.
        group_nbits (`Sequence[int]`, *optional*): the widths to fit grouped LUTs at (default: `nbits`); grouped
            8-bit k-means is the slowest fit and gains least.

    Returns:
        `pd.DataFrame`: one `PaletteState.row()` per (granularity, nbits).
    """
    import pandas as pd

    configs = [PaletteConfig(n) for n in nbits]
    if group_size:
        grouped = nbits if group_nbits is None else group_nbits
        configs += [PaletteConfig(n, granularity="per_grouped_channel", group_size=group_size) for n in grouped]
    return pd.DataFrame([palette_state(layer, weight, c).row() for c in configs])


# --------------------------------------------------------------------------------------------- widgets


class PaletteExplorer:
    """Pick a layer, slide the bit width, toggle per-tensor / grouped LUTs; see histogram, palette and error.

    Args:
        layers (`Mapping[str, nn.Module]`): e.g. `compressible_layers(pipe.unet, 2048)`.
        nbits (`int`, defaults to 4): initial bit width.
        group_size (`int`, defaults to 16): output channels per LUT when grouped (rounded down to a divisor).

    Attributes:
        layer, nbits, grouped: the widgets (Dropdown, SelectionSlider, Checkbox).
        state (`PaletteState`): the current result, recomputed by `update()` whenever a widget changes.
        updates (`int`): how many times `update()` ran.

    Example:
        >>> explorer = PaletteExplorer(compressible_layers(pipe.unet))
        >>> explorer.widget          # display in JupyterLab
        >>> explorer.nbits.value = 2  # what a user's slider drag does; explorer.state follows
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module], *, nbits: int = 4, group_size: int = 16):
        import ipywidgets as w

        if not layers:
            raise ValueError("PaletteExplorer needs at least one layer")
        self._layers = dict(layers)
        self._group_size = group_size
        self.layer = w.Dropdown(options=list(self._layers), description="layer", layout=w.Layout(width="95%"))
        self.nbits = w.SelectionSlider(options=list(SUPPORTED_NBITS), value=nbits, description="bits")
        self.grouped = w.Checkbox(value=False, description=f"grouped LUTs (~{group_size} channels each)")
        self.text = w.HTML()
        self.output = w.Output()
        self.widget = w.VBox([self.layer, w.HBox([self.nbits, self.grouped]), self.text, self.output])
        self.updates = 0
        self.state: PaletteState | None = None
        self.figure = None
        for control in (self.layer, self.nbits, self.grouped):
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    def config(self) -> PaletteConfig:
        """The `PaletteConfig` the widgets describe."""
        if not self.grouped.value:
            return PaletteConfig(self.nbits.value)
        channels = self._layers[self.layer.value].weight.shape[0]
        group = default_group_size(channels, self._group_size)
        return PaletteConfig(self.nbits.value, granularity="per_grouped_channel", group_size=group)

    def update(self) -> PaletteState:
        """Recompute `state` from the widgets, and redraw the text and the figure."""
        name = self.layer.value
        self.state = palette_state(name, self._layers[name].weight, self.config())
        self.text.value = f"<b>{self.state.summary()}</b>"
        self.updates += 1
        self._draw()
        return self.state

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        self.figure = plot_weight_histogram(
            self._layers[self.layer.value].weight, self.state.palette, title=self.layer.value
        )
        plt.close(self.figure)  # shown through the Output widget only, not again by the inline backend
        if _in_notebook():
            import io

            from IPython.display import Image, display

            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # whatever the backend
            self.output.clear_output(wait=True)
            with self.output:
                display(Image(data=buffer.getvalue(), format="png"))


@dataclass(frozen=True)
class RecipeState:
    """The recipe a `RecipeExplorer` picked and what is known about it.

    Attributes:
        name: recipe name.
        strategy: the strategy that made it ("apple", "size-aware", "refined", ...).
        size: its size over the explorer's layers (`workbench.palettes.size.SizeReport`: bits/param, stored bytes,
            % of float16), the one size the explorer shows.
        bits_per_block: UNet block (e.g. `down_blocks.1`) -> mean bits/param of its layers (weighted by numel).
        metrics: measured numbers of this recipe (whatever the explorer was given, e.g. PSNR in dB), sizes left out.
    """

    name: str
    strategy: str
    size: SizeReport
    bits_per_block: dict[str, float]
    metrics: dict[str, float]

    @property
    def bits_per_param(self) -> float:
        return self.size.bits_per_param

    @property
    def nbytes(self) -> int:
        return self.size.nbytes


def block_of(layer: str) -> str:
    """The UNet block a layer belongs to: `down_blocks.1.attentions.0.proj_in` -> `down_blocks.1`."""
    parts = layer.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def bits_per_block(recipe: Mapping[str, int], numels: Mapping[str, int]) -> dict[str, float]:
    """Block -> `sum(bits * numel) / sum(numel)` over the block's layers in `numels` (absent layers: 16)."""
    totals: dict[str, list[float]] = {}
    for layer, numel in numels.items():
        config = as_config(recipe.get(layer))
        acc = totals.setdefault(block_of(layer), [0.0, 0.0])
        acc[0] += (16 if config is None else config.nbits) * numel
        acc[1] += numel
    return {block: bits / n for block, (bits, n) in totals.items()}


ALL_STRATEGIES = "all"


class RecipeExplorer:
    """Pick a strategy and slide a target size; see the largest recipe that fits, its size, its bits per UNet block,
    its numbers and an image.

    Args:
        recipes (`Mapping[str, Mapping[str, int]]`): recipe name -> {layer: bits} (e.g. `PreAnalysis.recipes`).
        numels (`Mapping[str, int]`): layer -> weight count, the layers sizes are measured over.
        metrics (`Mapping[str, Mapping[str, float]]`, *optional*): recipe name -> measured numbers to show (keys as
            `workbench.report.tables.recipe_table`'s columns are shown with their labels; size columns are left out,
            the explorer shows the size it computes).
        preview (`Callable[[str, Mapping[str, int]], image]`, *optional*): makes a preview image for a recipe
            (called once per recipe, then cached), e.g. a seed-matched generation.
        strategies (`Mapping[str, str]`, *optional*): recipe name -> strategy; default `strategy_of` each name.
        out_channels (`Mapping[str, int]`, *optional*): layer -> output channels, for grouped palettes' sizes.

    Attributes:
        strategy: the ToggleButtons (every strategy of the recipes, and "all"; "refined" first shown when there is
            one, the workbench's recommendation); target: the FloatSlider (bits/param); `state` is the strategy's
            recipe with the largest bits/param <= target (its smallest recipe if none fits).
        state (`RecipeState`), updates (`int`), previews (`dict[str, image]`).
    """

    def __init__(
        self,
        recipes: Mapping[str, Mapping[str, int]],
        numels: Mapping[str, int],
        *,
        metrics: Mapping[str, Mapping[str, float]] | None = None,
        preview: Callable | None = None,
        strategies: Mapping[str, str] | None = None,
        out_channels: Mapping[str, int] | None = None,
    ):
        import ipywidgets as w

        if not recipes:
            raise ValueError("RecipeExplorer needs at least one recipe")
        self._numels = dict(numels)
        self._recipes = {name: Recipe(name, bits) for name, bits in recipes.items()}
        self._sizes = {name: recipe_size(r.bits, self._numels, out_channels) for name, r in self._recipes.items()}
        self._bpp = {name: size.bits_per_param for name, size in self._sizes.items()}
        self._strategy = {name: (strategies or {}).get(name) or strategy_of(name) for name in self._recipes}
        self._metrics = {
            k: {m: v for m, v in dict(v).items() if m not in _NOT_METRICS} for k, v in (metrics or {}).items()
        }
        self._preview = preview
        self.previews: dict = {}
        present = sorted(set(self._strategy.values()), key=_strategy_order)
        options = [(STRATEGY_LABELS.get(s, s), s) for s in present] + [("all strategies", ALL_STRATEGIES)]
        self.strategy = w.ToggleButtons(
            options=options, value="refined" if "refined" in present else ALL_STRATEGIES, description="strategy"
        )
        lo, hi = min(self._bpp.values()), max(self._bpp.values())
        self.target = w.FloatSlider(
            value=hi, min=lo, max=max(hi, lo + 0.01), step=0.01, description="bits/param ≤", readout_format=".2f"
        )
        self.text = w.HTML()
        self.output = w.Output()
        self.widget = w.VBox([self.strategy, self.target, self.text, self.output])
        self.updates = 0
        self.state: RecipeState | None = None
        for control in (self.strategy, self.target):
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    def pick(self, target: float, strategy: str = ALL_STRATEGIES) -> str:
        """The recipe of `strategy` ("all": any) with the largest bits/param <= `target`; its smallest if none is
        that small."""
        names = [n for n in self._bpp if strategy == ALL_STRATEGIES or self._strategy[n] == strategy]
        fitting = [name for name in names if self._bpp[name] <= target + 1e-9]
        if not fitting:
            return min(names, key=self._bpp.get)
        return max(fitting, key=self._bpp.get)

    def update(self) -> RecipeState:
        """Recompute `state` for the strategy and the slider's target, and redraw."""

        name = self.pick(self.target.value, self.strategy.value)
        recipe = self._recipes[name].bits
        self.state = RecipeState(
            name=name,
            strategy=self._strategy[name],
            size=self._sizes[name],
            bits_per_block=bits_per_block(recipe, self._numels),
            metrics=self._metrics.get(name, {}),
        )
        if self._preview is not None and name not in self.previews:
            self.previews[name] = self._preview(name, recipe)
        self.text.value = self._html()
        self.updates += 1
        self._draw()
        return self.state

    def _html(self) -> str:
        s = self.state
        numbers = "".join(
            f"<tr><td>{COLUMN_LABELS.get(k, k)}</td><td>{_number(v)}</td></tr>" for k, v in s.metrics.items()
        )
        blocks = "".join(f"<tr><td>{b}</td><td>{bits:.2f}</td></tr>" for b, bits in s.bits_per_block.items())
        return (
            f"<b>{s.name}</b> ({STRATEGY_LABELS.get(s.strategy, s.strategy)}): {s.size.label()}"
            f"{'<table>' + numbers + '</table>' if numbers else ''}"
            f"<table><tr><th>UNet block</th><th>bits/param</th></tr>{blocks}</table>"
        )

    def _draw(self) -> None:
        if self._preview is None or not _in_notebook():
            return
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            display(self.previews[self.state.name])


# What a recipe table row holds beside its measured numbers: shown in the explorer's headline, not as metrics.
_NOT_METRICS = {"name", "strategy", *SIZE_COLUMNS}


def _strategy_order(strategy: str) -> tuple[int, str]:
    return (STRATEGIES.index(strategy) if strategy in STRATEGIES else len(STRATEGIES), strategy)


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def recipe_preview(pipe, prompt: str, *, seed: int = 0, steps: int = 20, size: int = 192) -> Callable:
    """A `RecipeExplorer` preview: `(name, bits) -> PIL image` of `prompt` from `seed` with the recipe applied
    (in place, restored after), upscaled to `size` pixels with nearest-neighbour."""
    from PIL import Image

    def preview(name: str, bits: Mapping[str, int]):
        with palettized(pipe.unet, bits):
            image = generate_images(pipe, [prompt], seed=seed, steps=steps)[0]
        return Image.fromarray(image).resize((size, size), Image.NEAREST)

    return preview
