"""Figures: every function takes data (a fitted palette, a results table) and returns a matplotlib Figure.

Axes carry units, every figure has a legend where it has more than one series, and nothing is shown or
saved here: the caller (a notebook, `workbench report`) decides.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Palette and histogram plots (teaching notebook, palette explorer). Other plots are appended below this section.
# ---------------------------------------------------------------------------------------------------------------

PALETTE_COLOR = "#d62728"
GROUPED_COLOR = "#1f77b4"


def _new_axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def plot_weight_histogram(weight, palette=None, *, ax=None, bins: int = 200, title: str | None = None):
    """Histogram of a weight tensor's float16 values, with the palette's LUT entries as vertical lines.

    Args:
        weight (`torch.Tensor` or `np.ndarray`): any shape; plotted as float16 values, as Core ML stores them.
        palette (`Palette`, *optional*): a per-tensor palette whose `lut[0]` is marked (grouped palettes: the
            first group's LUT).
        ax (`matplotlib.axes.Axes`, *optional*): draw into this axes.
        bins (`int`, defaults to 200): histogram bins.
        title (`str`, *optional*): axes title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    values = _as_numpy(weight).astype(np.float32).ravel()
    fig, ax = _new_axes(ax, (8, 3.6))
    ax.hist(values, bins=bins, color="#7f7f7f", label=f"{values.size:,} weights")
    if palette is not None:
        used = np.unique(palette.indices[: max(1, palette.indices.shape[0] // palette.lut.shape[0])])
        lut = palette.lut[0].astype(np.float32)[used]
        n = 1 << palette.config.nbits
        for i, value in enumerate(lut):
            ax.axvline(
                value, color=PALETTE_COLOR, lw=0.8, alpha=0.9, label=f"{n} palette values (LUT)" if i == 0 else None
            )
    ax.set_xlabel("weight value (float16, unitless)")
    ax.set_ylabel("number of weights")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    return fig


def plot_palette_histograms(weight, palettes, *, title: str | None = None, bins: int = 200):
    """`plot_weight_histogram` once per palette, stacked, sharing the x axis (e.g. the 2-bit and 4-bit palettes).

    Args:
        weight (`torch.Tensor` or `np.ndarray`): the weight the palettes were fitted to.
        palettes (`Sequence[Palette]`): one panel each, titled with its bit width and SNR-free label.
        title (`str`, *optional*): figure title.
        bins (`int`, defaults to 200): histogram bins.

    Returns:
        `matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(palettes), 1, figsize=(8, 2.8 * len(palettes)), sharex=True, layout="constrained")
    for ax, palette in zip(np.atleast_1d(axes), palettes):
        n = palette.config.nbits
        plot_weight_histogram(weight, palette, ax=ax, bins=bins, title=f"{n}-bit palette: {1 << n} values")
    if title:
        fig.suptitle(title)
    return fig


def plot_palette_error_vs_bits(table, *, ax=None, title: str | None = None):
    """Reconstruction quality of one weight against the palette's bit width, one line per granularity.

    Args:
        table (`pd.DataFrame`): rows with columns `nbits`, `granularity` and `weight_snr_db`
            (as `workbench.explore.palette_error_table` returns).
        ax (`matplotlib.axes.Axes`, *optional*): draw into this axes.
        title (`str`, *optional*): axes title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    fig, ax = _new_axes(ax, (6.5, 3.8))
    for i, (granularity, rows) in enumerate(table.groupby("granularity", sort=False)):
        rows = rows.sort_values("nbits")
        ax.plot(rows["nbits"], rows["weight_snr_db"], marker="o", label=granularity, color=_color(i))
    ax.set_xlabel("palette bit width n (LUT of 2^n values)")
    ax.set_ylabel("weight SNR (dB, higher is better)")
    ax.set_xticks(sorted(table["nbits"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(title="palette granularity")
    if title:
        ax.set_title(title)
    return fig


def plot_palette_bytes(table, *, ax=None, title: str | None = None):
    """Stored bytes of one weight per bit width: packed indices and LUT stacked, float16 as a dashed line.

    Args:
        table (`pd.DataFrame`): rows with columns `nbits`, `granularity`, `index_bytes`, `lut_bytes` and
            `float16_bytes` (as `workbench.explore.palette_error_table` returns); one bar per bit width and
            granularity.
        ax (`matplotlib.axes.Axes`, *optional*): draw into this axes.
        title (`str`, *optional*): axes title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    fig, ax = _new_axes(ax, (7, 3.8))
    labels = [
        f"{n}-bit\n{'grouped' if g != 'per_tensor' else 'tensor'}"
        for n, g in zip(table["nbits"], table["granularity"])
    ]
    x = np.arange(len(table))
    kb_index = table["index_bytes"].to_numpy() / 1e3
    kb_lut = table["lut_bytes"].to_numpy() / 1e3
    ax.bar(x, kb_index, color="#9ecae1", label="indices (n bits per weight, packed)")
    ax.bar(x, kb_lut, bottom=kb_index, color=PALETTE_COLOR, label="LUT (2^n float16 values per group)")
    ax.axhline(table["float16_bytes"].iloc[0] / 1e3, color="k", ls="--", lw=1, label="float16 weight")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("stored size (kB)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_quality_vs_bits(table, *, x: str = "bits_per_param", columns=None, ax=None, title: str | None = None):
    """Quality metrics (dB) of whole-model palettizations against bits per parameter, one line per metric.

    Args:
        table (`pd.DataFrame`): one row per palettization; column `x` and the metric columns.
        x (`str`, defaults to `"bits_per_param"`): the x column.
        columns (`dict[str, str]`, *optional*): metric column -> legend label; defaults to the latent and image
            PSNR columns that `workbench.explore.uniform_sweep` writes.
        ax (`matplotlib.axes.Axes`, *optional*): draw into this axes.
        title (`str`, *optional*): axes title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    columns = columns or {
        "latent_psnr_db": "latent PSNR, one step (reference metric)",
        "image_psnr_db": "image PSNR, full sampling",
    }
    fig, ax = _new_axes(ax, (6.5, 3.8))
    for i, (column, label) in enumerate(columns.items()):
        if column in table:
            ax.plot(table[x], table[column], marker="o", label=label, color=_color(i))
    ax.set_xlabel("bits per parameter (UNet weights)")
    ax.set_ylabel("PSNR vs float model (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return fig


def _color(i: int) -> str:
    return ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"][i % 6]


def _as_numpy(weight) -> np.ndarray:
    if hasattr(weight, "detach"):
        import torch

        return weight.detach().to("cpu", torch.float16).numpy()
    return np.asarray(weight).astype(np.float16)
