"""Recipe tables for notebooks and reports: one row per recipe with its size and every measured quality number.

Example:
    >>> result = run_analysis(pipe, config, out_dir="analysis")
    >>> recipe_table(result)          # name, strategy, bits/param, size MB, % of float16, PSNRs, SSIM, adherence
    >>> pick_recipes(result.preanalysis.recipes, result.layers, targets=[3.5, 4.5, 6.5])
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workbench.compare.seed_matched import adherence_by_column
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import as_config
from workbench.palettes.importance import IMPORTANCE_FILE, Importance
from workbench.palettes.size import SIZE_COLUMNS, bits_per_param, recipe_size
from workbench.recipes.recipe import STRATEGIES, PreAnalysis

if TYPE_CHECKING:
    from workbench.compare.seed_matched import SeedMatchedImages


STRATEGY_BY_SUFFIX = {"mixedpalette": "apple", "sizeaware": "size-aware", "refined": "refined"}
# Every table column a reader meets, as a label with its unit (the CSV files keep the keys).
COLUMN_LABELS = {
    "name": "recipe",
    "strategy": "strategy",
    "target": "Core ML target",
    **SIZE_COLUMNS,
    "psnr_one_step_db": "one-step latent PSNR (dB)",
    "latent_psnr_db": "one-step latent PSNR (dB)",
    "image_psnr_db": "image PSNR (dB)",
    "ssim": "SSIM",
    "color_adherence": "colour adherence",
    "shape_adherence": "shape adherence",
    "position_adherence": "position adherence",
    "reference": "reference rule's recipe",
    "reference_bpp": "its bits/param",
    "reference_psnr": "its one-step PSNR (dB)",
    "ours": "ours at equal or smaller size",
    "ours_bpp": "our bits/param",
    "ours_psnr": "our one-step PSNR (dB)",
    "gain_db": "gain (dB)",
}


def labelled(frame):
    """`frame` with its known columns renamed to `COLUMN_LABELS` (for display; CSVs keep the keys)."""
    return frame.rename(columns=COLUMN_LABELS)


def strategy_of(recipe_name: str) -> str:
    """`recipe_4.50_bit_mixedpalette` -> `"apple"`, `..._sizeaware` -> `"size-aware"`, else the name's suffix."""
    suffix = recipe_name.rsplit("_", 1)[-1]
    return STRATEGY_BY_SUFFIX.get(suffix, suffix)


def recipe_table(result):
    """One row per recipe of a `workbench.analysis.result.AnalysisResult`, best first within each strategy.

    Columns: name, strategy, target (the oldest Core ML deployment target that stores it: iOS17, or iOS18 for
    grouped or 3-bit palettes), bits_per_param, size_mb (candidate layers, LUTs included), pct_of_float16,
    psnr_one_step_db (the reference's latent PSNR, mean over prompts), and when the analysis ran full
    trajectories: image_psnr_db and ssim (means over prompts, against the float model's images from the same
    seed) and color/shape/position adherence (demo model prompts). A first row "float16" gives the float
    model's own adherence.
    """
    import pandas as pd

    numels = result.layers
    trajectories = {t.recipe: t for t in getattr(result, "trajectory", [])}
    rows = []
    if "float" in trajectories:
        rows.append(_row("float16", "float", {}, numels, None, trajectories["float"]))
    for r in sorted(result.recipes, key=lambda r: (r.strategy, -r.bits_per_param)):
        rows.append(_row(r.name, r.strategy, r.bits, numels, r.psnr_mean, trajectories.get(r.name)))
    return pd.DataFrame(rows)


def _row(name, strategy, bits, numels, one_step, trajectory) -> dict:
    size = recipe_size(bits, numels)
    configs = [c for c in map(as_config, bits.values()) if c is not None]
    row = {
        "name": name,
        "strategy": strategy,
        "target": "iOS18" if any(c.needs_ios18 for c in configs) else "iOS17",
        **size.columns(),
        "psnr_one_step_db": None if one_step is None else round(one_step, 2),
    }
    if trajectory is not None:
        finite = [v for v in trajectory.image_psnr if np.isfinite(v)]
        row["image_psnr_db"] = round(float(np.mean(finite)), 2) if finite else None
        row["ssim"] = round(float(np.mean(trajectory.ssim)), 4)
        for attribute in ("color", "shape", "position"):
            if trajectory.adherence:
                row[f"{attribute}_adherence"] = trajectory.adherence[attribute]
    return row


def pick_recipes(
    recipes: Mapping[str, Mapping[str, int]],
    numels: Mapping[str, int],
    targets: Sequence[float],
    strategies: Sequence[str] | None = None,
    strategy_of_name: Mapping[str, str] | None = None,
) -> dict[str, dict[str, int]]:
    """For each target bits/param, the recipe of each strategy at that size, side by side (each kept once).

    The first strategy present (in `STRATEGIES` order: Apple's rule first) picks the recipe closest to each target;
    every other strategy then the recipe closest in size to that one, so each size's columns compare strategies at
    (nearly) the same bits/param.

    Args:
        recipes: name -> {layer: bits} (e.g. `PreAnalysis.recipes`).
        numels: layer -> weight count, what bits/param is measured over.
        targets: bits/param to look near, e.g. `[3.5, 4.5, 6.5]` (the seed post's 3.41 / 4.50 / 6.55).
        strategies: keep only these; None = all.
        strategy_of_name: recipe name -> strategy (e.g. from `recipes.csv`); default `strategy_of` each name.

    Returns:
        name -> bits, by descending size, and within a size in `STRATEGIES` order (the grid's column order).
    """
    known = dict(strategy_of_name or {})
    by_strategy: dict[str, list[str]] = {}
    for name in recipes:
        strategy = known.get(name) or strategy_of(name)
        if strategies is None or strategy in strategies:
            by_strategy.setdefault(strategy, []).append(name)
    if not by_strategy:
        raise ValueError(f"no recipe of strategies {list(strategies or [])}; recipes: {', '.join(recipes)}")
    order = [s for s in STRATEGIES if s in by_strategy] + [s for s in by_strategy if s not in STRATEGIES]
    bpp = {name: bits_per_param(bits, numels) for name, bits in recipes.items()}

    def closest(strategy: str, size: float) -> str:
        return min(by_strategy[strategy], key=lambda n: (abs(bpp[n] - size), -bpp[n]))

    anchors = sorted({closest(order[0], t) for t in targets}, key=lambda n: -bpp[n])
    chosen: list[str] = []
    for anchor in anchors:
        for strategy in order:
            name = anchor if strategy == order[0] else closest(strategy, bpp[anchor])
            if name not in chosen:
                chosen.append(name)
    return {name: dict(recipes[name]) for name in chosen}


def load_analysis_outputs(analysis_dir):
    """The reference-format JSON and the settings an analysis wrote (`workbench analyze --out DIR`, notebook 03).

    Returns:
        `(PreAnalysis, config dict)`: the config from `run.json` (empty if absent), e.g. its `min_numel`.

    Raises:
        FileNotFoundError: no `preanalysis.json` there; the message says how to make one.
    """
    import json

    folder = Path(analysis_dir)
    if not (folder / "preanalysis.json").is_file():
        raise FileNotFoundError(
            f"no analysis in {folder} (no preanalysis.json): run notebook 03_mixed_bit_analysis with the same out_dir "
            "first, or `workbench analyze --out DIR` and pass analysis_dir=DIR"
        )
    run = folder / "run.json"
    config = json.loads(run.read_text()).get("config", {}) if run.is_file() else {}
    return PreAnalysis.load(folder / "preanalysis.json"), config


def analysis_strategies(analysis_dir, names) -> dict[str, str]:
    """Recipe name -> strategy for each of `names`: as the analysis in `analysis_dir` recorded it (`recipes.csv`),
    else read off the name's suffix (`strategy_of`)."""
    path = Path(analysis_dir) / "recipes.csv"
    recorded = {}
    if path.is_file():
        with path.open(newline="") as f:
            recorded = {row["name"]: row["strategy"] for row in csv.DictReader(f) if row.get("strategy")}
    return {name: recorded.get(name) or strategy_of(name) for name in names}


def analysis_palette_cache(analysis_dir):
    """A `PaletteCache` for the recipes of the analysis in `analysis_dir`: with its importances
    (`importance.npz`, written by a data-aware analysis) when it has them, so its data-aware palettes fit."""
    path = Path(analysis_dir) / IMPORTANCE_FILE
    return PaletteCache(importance=Importance.load(path) if path.is_file() else None)


def recipe_summary(
    comparison: SeedMatchedImages,
    *,
    latent_psnr: Mapping[str, float] | None = None,
    adherence: bool = False,
    strategies: Mapping[str, str] | None = None,
):
    """One row per column: name, (with `strategies`, column name -> strategy) strategy, bits/param, size (MB),
    % of float16, latent PSNR (one step), image PSNR, SSIM, and (with `adherence=True`, demo-model prompts only)
    colour/shape/position adherence.

    Image PSNR and SSIM are means over the prompts against the reference column (float model, same seeds).
    The reference column's own PSNR is left empty rather than infinite.
    """
    import pandas as pd

    scores = adherence_by_column(comparison) if adherence else {}
    rows = []
    for c, column in enumerate(comparison.columns):
        psnrs = [row[c] for row in comparison.psnr]
        row = {
            "name": column.name,
            **({} if strategies is None else {"strategy": strategies.get(column.name, "float")}),
            **column.size.columns(),
            "latent_psnr_db": None if latent_psnr is None else latent_psnr.get(column.name),
            "image_psnr_db": None if c == 0 else round(float(np.mean(psnrs)), 2),
            "ssim": round(float(np.mean([row[c] for row in comparison.ssim])), 4),
        }
        for attribute, value in scores.get(column.name, {}).items():
            row[f"{attribute}_adherence"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.drop(columns=["latent_psnr_db"]) if latent_psnr is None else frame
