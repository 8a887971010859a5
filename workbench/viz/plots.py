"""Figures: every function takes data (a fitted palette, a results table) and returns a matplotlib Figure.

Axes carry units, every figure has a legend where it has more than one series, and nothing is shown or
saved here: the caller (a notebook, `workbench report`) decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Palette and histogram plots (teaching notebook, palette explorer). Other plots are appended below this section.
# ---------------------------------------------------------------------------------------------------------------

PALETTE_COLOR = "#d62728"
GROUPED_COLOR = "#1f77b4"


# The x-axis of every plot against recipe size (`workbench.palettes.size`: bits/param is the size, LUTs not counted).
BITS_AXIS = "bits/param (compressible UNet layers)"
# Each recipe strategy as figures, the grid and the recipe explorer name it.
STRATEGY_LABELS = {"apple": "reference rule (Apple)", "size-aware": "size-aware (ours)", "refined": "refined (ours)"}


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
    fig, ax = _new_axes(ax, (9, 3.6))
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: the bars fill the axes
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

    fig, axes = plt.subplots(len(palettes), 1, figsize=(9, 2.8 * len(palettes)), sharex=True, layout="constrained")
    for ax, palette in zip(np.atleast_1d(axes), palettes):
        n = palette.config.nbits
        plot_weight_histogram(weight, palette, ax=ax, bins=bins, title=f"{n}-bit palette: {1 << n} values")
    if title:
        fig.suptitle(title)
    return fig


def plot_learned_palette(
    weight, start, learned, *, title: str | None = None, bins: int = 200, label: str = "learned LUT"
):
    """The weight's histogram with a palette's LUT before (post-training fit, red dashed) and after learning (blue).

    Args:
        weight (`torch.Tensor` or `np.ndarray`): the float weight.
        start, learned (`Palette`): two LUTs of the same layer (the first group's, for grouped palettes); the
            entries drawn are those the first group's weights use in `start`.
        title (`str`, *optional*): axes title.
        bins (`int`, defaults to 200): histogram bins.
        label (`str`, defaults to "learned LUT"): the legend's name of the second LUT (e.g. "trained LUT").

    Returns:
        `matplotlib.figure.Figure`.
    """
    values = _as_numpy(weight).astype(np.float32).ravel()
    fig, ax = _new_axes(None, (9, 3.6))
    ax.hist(values, bins=bins, color="#7f7f7f", label=f"{values.size:,} weights")
    used = np.unique(start.indices[: max(1, start.indices.shape[0] // start.lut.shape[0])])
    for palette, color, style, label in (
        (start, PALETTE_COLOR, "--", "fitted LUT"),
        (learned, "#1f77b4", "-", label),
    ):
        for i, value in enumerate(palette.lut[0].astype(np.float32)[used]):
            ax.axvline(value, color=color, ls=style, lw=1.0, label=label if i == 0 else None)
    ax.set_xlabel("weight value (float16, unitless)")
    ax.set_ylabel("number of weights")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_data_aware_palettes(weight, importance, plain, aware, *, title: str | None = None, bins: int = 200):
    """Where a plain and a data-aware palette put their LUT entries, over the histogram each one is fitted to.

    Top: the weights' histogram (what plain k-means sees: every weight counts 1) and the plain palette's LUT.
    Bottom: the importance-weighted histogram (each weight counts its importance, the second moment of the input
    channel it multiplies) and the data-aware palette's LUT. Both y axes are logarithmic, so the tails show.

    Args:
        weight (`torch.Tensor` or `np.ndarray`): the weight both palettes were fitted to.
        importance (`np.ndarray`): importances broadcastable to the weight (`Importance.for_weight`).
        plain, aware (`Palette`): per-tensor palettes, plain and data-aware, of the same width.
        title (`str`, *optional*): figure title.
        bins (`int`, defaults to 200): histogram bins (shared by both panels).

    Returns:
        `matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt

    values = _as_numpy(weight).astype(np.float32).ravel()
    weights = np.broadcast_to(np.asarray(importance, dtype=np.float64), _as_numpy(weight).shape).ravel()
    edges = np.histogram_bin_edges(values, bins=bins)
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.6), sharex=True, layout="constrained")
    panels = [
        (plain, None, "#7f7f7f", GROUPED_COLOR, "number of weights", "plain k-means"),
        (aware, weights, "#ff7f0e", PALETTE_COLOR, "summed importance", "data-aware k-means"),
    ]
    for ax, (palette, w, bar_color, line_color, ylabel, label) in zip(axes, panels):
        what = "weights" if w is None else "weights x importance"
        ax.hist(values, bins=edges, weights=w, color=bar_color, label=f"{values.size:,} {what}")
        n = 1 << palette.config.nbits
        for i, value in enumerate(np.unique(palette.lut[0].astype(np.float32)[np.unique(palette.indices)])):
            ax.axvline(value, color=line_color, lw=0.9, label=f"{label}: {n} LUT values" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{label} ({palette.config.key}) is fitted to this histogram", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1].set_xlabel("weight value (float16, unitless)")
    if title:
        fig.suptitle(title)
    return fig


def plot_palette_error_vs_bits(table, *, ax=None, title: str | None = None):
    """Reconstruction quality of one weight against the palette's bit width, one line per granularity.

    Args:
        table (`pd.DataFrame`): rows with columns `nbits`, `granularity` and `weight_snr_db`
            (as `workbench.report.widgets.palette_error_table` returns).
        ax (`matplotlib.axes.Axes`, *optional*): draw into this axes.
        title (`str`, *optional*): axes title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    fig, ax = _new_axes(ax, (6.5, 3.8))
    for i, (granularity, rows) in enumerate(table.groupby("granularity", sort=False)):
        rows = rows.sort_values("nbits")
        style = {"marker": "os"[i % 2], "ls": "-" if i == 0 else "--", "ms": 7 if i == 0 else 5}
        ax.plot(rows["nbits"], rows["weight_snr_db"], label=granularity, color=_color(i), **style)
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
            `float16_bytes` (as `workbench.report.widgets.palette_error_table` returns); one bar per bit width and
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
            PSNR columns that `workbench.report.widgets.uniform_sweep` writes.
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
    ax.set_xlabel(BITS_AXIS)
    ax.set_ylabel("PSNR vs float model (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return fig


def plot_recipe_metric(table, metric: str = "image_psnr_db", *, ylabel: str | None = None, ax=None, title=None):
    """One metric of mixed-bit recipes against bits per parameter, one line per strategy.

    Args:
        table (`pd.DataFrame`): `workbench.report.tables.recipe_table` rows (columns `strategy`, `bits_per_param`,
        `metric`).
        metric (`str`, defaults to `"image_psnr_db"`): the y column.
        ylabel (`str`, *optional*): y-axis label with its unit; defaults to one for the known metrics.
        ax (`matplotlib.axes.Axes`, *optional*), title (`str`, *optional*).

    Returns:
        `matplotlib.figure.Figure`.
    """
    labels = {
        "image_psnr_db": "image PSNR vs float model (dB), full sampling",
        "psnr_one_step_db": "latent PSNR, one step (dB)",
        "ssim": "SSIM vs float model (1 = identical)",
    }
    fig, ax = _new_axes(ax, (6.5, 3.8))
    names = STRATEGY_LABELS
    rows = table[table["strategy"] != "float"].dropna(subset=[metric]) if metric in table else table.iloc[:0]
    for i, (strategy, group) in enumerate(rows.groupby("strategy", sort=True)):
        group = group.sort_values("bits_per_param")
        ax.plot(
            group["bits_per_param"], group[metric], marker="o", color=_color(i), label=names.get(strategy, strategy)
        )
    ax.set_xlabel(BITS_AXIS)
    ax.set_ylabel(ylabel or labels.get(metric, metric))
    ax.grid(alpha=0.3)
    if len(rows):
        ax.legend(title="recipe strategy")
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


# ---------------------------------------------------------------------------------------------------------------
# Pre-analysis figure (workbench.analysis.run).
# ---------------------------------------------------------------------------------------------------------------


def model_name(version: str) -> str:
    """A model for a caption: a local pipeline folder by its name (the demo model: "tiny-shapes"), a hub id or a
    class name as it is."""
    return Path(version).name if Path(version).is_absolute() else version


def plot_psnr_vs_size(result, *, ax=None, title: str | None = None):
    """The reference's pre-analysis figure for a `workbench.analysis.result.AnalysisResult`.

    x: "Model size reduction (%)" = 100 * (1 - bits/param / 16) over the candidate layers; y: "PSNR (dB)" of the
    one-step latents (the reference's metric). One line per palette width from the cumulative sweeps (layers
    added least-sensitive first), the reference-rule mixed-bit recipes (black, labelled with bits/param), our
    size-aware recipes (red squares) and refined ones (violet diamonds), the linear 8-bit per-tensor marker at
    50 % (star) and per-channel int8 (plus). Grouped-palette sweeps are dashed, their LUT bits counted in x; a fast
    sweep's predicted curves are dash-dotted. An "original" far above the curves (identical outputs on a
    deterministic device, ~200 dB) is stated in a note instead of stretching the axis.

    Returns:
        `matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt

    fig, ax = _new_axes(ax, (9, 6))
    baselines = result.preanalysis.baselines
    original = baselines["original"]
    curves = result.curves()
    per_tensor = sorted((k for k in curves if "_g" not in k), key=lambda k: int(k.removeprefix("kmeans")))
    cmap = plt.get_cmap("viridis")
    predicted = {e.config for e in result.evaluations if e.kind == "cumulative" and e.extra.get("predicted")}
    for i, key in enumerate(per_tensor):
        color = cmap(i / max(len(per_tensor) - 1, 1))
        xs, ys = zip(*curves[key])
        how = ("-.", "cumulative, predicted (fast sweep)") if key in predicted else ("-", "cumulative")
        ax.plot(xs, ys, how[0], color=color, lw=1.5, label=f"{key.removeprefix('kmeans')}-bit palette, {how[1]}")
        for g in (k for k in curves if k.startswith(key + "_g")):
            gx, gy = zip(*curves[g])
            ax.plot(gx, gy, "--", color=color, lw=1.2, label=f"{g.removeprefix('kmeans')} grouped, cumulative")

    kept = sorted((r for r in result.recipes if r.bits_per_param < 16), key=lambda r: r.bits_per_param)
    by_strategy = {s: [r for r in kept if r.strategy == s] for s in ("apple", "size-aware", "refined")}
    if by_strategy["apple"]:
        apple = by_strategy["apple"]
        ax.plot([r.size_reduction_pct for r in apple], [r.psnr_mean for r in apple], "o-", color="black", ms=9,
                mfc="none", lw=1.8, label="mixed-bit recipes (reference rule)")  # fmt: skip
        for r in apple:
            ax.annotate(f"{r.bits_per_param:.2f}", (r.size_reduction_pct, r.psnr_mean), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    if by_strategy["size-aware"]:
        ours = by_strategy["size-aware"]
        ax.plot([r.size_reduction_pct for r in ours], [r.psnr_mean for r in ours], "s-", color="crimson", ms=5,
                lw=1.4, label="size-aware recipes (ours)")  # fmt: skip
    if by_strategy["refined"]:
        ours = by_strategy["refined"]
        ax.plot([r.size_reduction_pct for r in ours], [r.psnr_mean for r in ours], "D-", color="darkviolet", ms=5,
                lw=1.6, label="refined recipes (ours: size-aware, refined where layers interact)")  # fmt: skip
    lin8 = baselines["linear_8bit"]
    ax.plot([50.0], [lin8], "*", color="orange", ms=15, mec="black", label=f"linear 8-bit, per tensor ({lin8:.1f} dB)")
    lin8c = baselines.get("linear_8bit_per_channel")
    if lin8c is not None:
        ax.plot([50.0], [lin8c], "P", color="teal", ms=10, mec="black", label=f"int8 per channel ({lin8c:.1f} dB)")

    ys = [y for c in curves.values() for _, y in c] + [r.psnr_mean for r in result.recipes] + [lin8]
    finite = [y for y in ys if np.isfinite(y) and y < 150]
    if original < 150:
        ax.axhline(original, color="gray", ls=":", lw=1, label=f"original (harness noise), {original:.1f} dB")
        finite.append(original)
    else:
        ax.text(0.99, 0.01, f"original = {original:.1f} dB: bitwise identical outputs (epsilon cap), not drawn",
                transform=ax.transAxes, fontsize=7, color="gray", ha="right", va="bottom")  # fmt: skip
    if finite:
        # frame the recipes and baselines as the reference's figure does; curves that start near the
        # epsilon cap (tiny layers palettized first) run off the top instead of squashing the rest
        anchors = [r.psnr_mean for r in result.recipes if r.bits_per_param < 16] + [lin8]
        anchors += [lin8c] if lin8c is not None else []
        anchors += [original] if original < 150 else []
        ax.set_ylim(min(anchors) - 5, min(max(anchors) + 25, max(finite) + 3))
    ax.set_xlim(0, 100)
    ax.set_xlabel("Model size reduction (%)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title or f"{model_name(result.preanalysis.model_version)}: one-step latent PSNR vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig
