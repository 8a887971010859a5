"""What an analysis measured and decided: `AnalysisResult` with its recipes, timing and the matched comparison.

`workbench.analysis.run.run_analysis` returns an `AnalysisResult`; `AnalysisResult.save` writes the analysis folder
(`preanalysis.json` in the reference's format, `evaluations.csv`, `recipes.csv`, `run.json`, `psnr_vs_size.png`).

Example:
    >>> result = run_analysis(pipe, config, out_dir="out")
    >>> result.recipes_frame()
    >>> result.matched_comparison().to_frame()  # each reference-rule recipe against the best of ours
    >>> result.timing.overhead  # wall time / time inside UNet forward
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workbench.io import atomic_path, environment, write_json_atomic, write_text_atomic
from workbench.palettes.size import size_reduction_pct
from workbench.recipes.recipe import PlannedRecipe, PreAnalysis, Recipe, RecipeEntry
from workbench.recipes.refine import Refinement, Step
from workbench.sweep.store import Evaluation, identity_key
from workbench.viz.plots import plot_psnr_vs_size

if TYPE_CHECKING:
    from workbench.analysis.config import AnalysisConfig
    from workbench.sweep.prediction import FastReport


@dataclass(frozen=True)
class RecipeResult:
    """A planned recipe (`PlannedRecipe`: the recipe, its strategy and size) with its end-to-end measurement:
    `psnr`, the one-step latent PSNR per prompt."""

    planned: PlannedRecipe
    psnr: tuple[float, ...]

    @property
    def recipe(self) -> Recipe:
        return self.planned.recipe

    @property
    def name(self) -> str:
        return self.planned.name

    @property
    def bits(self) -> Mapping[str, RecipeEntry]:
        return self.planned.bits

    @property
    def strategy(self) -> str:
        return self.planned.strategy

    @property
    def selector(self) -> float:
        return self.planned.selector

    @property
    def bits_per_param(self) -> float:
        return self.planned.bits_per_param

    @property
    def predicted_psnr(self) -> float | None:
        return self.planned.predicted_psnr

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def size_reduction_pct(self) -> float:
        return size_reduction_pct(self.bits_per_param)


@dataclass(frozen=True)
class Attempt:
    """One refinement of a recipe from one start: the start's name and mean PSNR, the result's, its rounds;
    `data_aware` for the pass that may swap in data-aware palettes."""

    start: str
    start_psnr: float
    psnr: float
    rounds: int
    data_aware: bool = False

    def to_dict(self) -> dict:
        d = {"start": self.start, "start_psnr": self.start_psnr, "psnr": self.psnr, "rounds": self.rounds}
        return {**d, "data_aware": True} if self.data_aware else d


@dataclass(frozen=True)
class RefinedRecipe:
    """How one refined recipe was found: the recipe it started from (`start`), the refinement kept
    (`workbench.recipes.refine.Refinement`: its PSNR before and after, rounds and measured steps), and every
    attempt."""

    name: str
    start: str
    refinement: Refinement
    attempts: tuple[Attempt, ...]

    @property
    def start_psnr(self) -> float:
        return self.refinement.start_psnr

    @property
    def psnr(self) -> float:
        return self.refinement.psnr

    def to_dict(self) -> dict:
        """The recipe's entry in `run.json`'s `refinement` object."""
        return {"start": self.start, **self.refinement.to_dict(), "attempts": [a.to_dict() for a in self.attempts]}

    def steps_frame(self):
        """One row per measured candidate: round, layers changed, predicted and measured change of the weighted
        noise power relative to the round's recipe, measured mean PSNR."""
        import pandas as pd

        frame = pd.DataFrame([asdict(s) for s in self.refinement.steps], columns=[f.name for f in fields(Step)])
        return frame.rename(columns={"predicted_change": "predicted", "measured_change": "measured"})


@dataclass(frozen=True)
class RefinementReport:
    """The refined strategy's record, one `RefinedRecipe` per refined recipe (`report[name]`, iteration in order)."""

    recipes: tuple[RefinedRecipe, ...] = ()

    def __len__(self) -> int:
        return len(self.recipes)

    def __iter__(self):
        return iter(self.recipes)

    def __getitem__(self, name: str) -> RefinedRecipe:
        for r in self.recipes:
            if r.name == name:
                return r
        raise KeyError(f"no refined recipe {name!r}; refined: {', '.join(r.name for r in self.recipes)}")

    def to_dict(self) -> dict:
        """`run.json`'s `refinement` object: recipe name -> its record."""
        return {r.name: r.to_dict() for r in self.recipes}

    def to_frame(self):
        """One row per refined recipe: where it started, its measured PSNR before and after, gradient rounds and
        candidates measured."""
        import pandas as pd

        rows = [
            {"recipe": r.name, "start": r.start, "start_psnr": r.start_psnr, "refined_psnr": r.psnr,
             "rounds": r.refinement.rounds, "measured_candidates": len(r.refinement.steps)}
            for r in self.recipes
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=["recipe", "start", "start_psnr", "refined_psnr", "rounds",
                                           "measured_candidates"])  # fmt: skip

    def most_improved(self) -> RefinedRecipe:
        """The refined recipe that gained most over its start."""
        return max(self.recipes, key=lambda r: r.psnr - r.start_psnr)


@dataclass(frozen=True)
class Timing:
    """Where an analysis' time went. `to_dict()` gives the `timing` object of `run.json` (same keys, same order).

    Attributes:
        wall_s (`float`): wall time of `run_analysis` (probe, k-means, sweeps, recipes, store writes).
        forward_s (`float`): time inside UNet forward calls made by the probe (perf_counter around each call),
            summed over the workers of a sharded run (so `overhead` can be below 1 there).
        unet_evaluations (`int`): UNet forward calls made by the probe (each one CFG batch), over all workers.
        new_evaluations (`int`): evaluations measured by this run (not read back from the store).
        evaluations (`int`): all evaluations of the analysis, read back or measured.
        kmeans_fits (`int`): palettes fitted by this run, over all workers (the rest came from the cache).
        overhead (`float`): `wall_s / forward_s`; NaN when nothing was measured.
        unet_batch (`int`): the UNet's batch (2 x prompts with classifier-free guidance).
    """

    wall_s: float
    forward_s: float
    unet_evaluations: int
    new_evaluations: int
    evaluations: int
    kmeans_fits: int
    overhead: float
    unet_batch: int

    @classmethod
    def of(cls, start: float, probe, runner, cache, remote: dict | None = None) -> Timing:
        """An analysis' timing since `start` (`time.perf_counter`): this process' counts (the probe's UNet calls and
        forward time, the runner's evaluations, the cache's fits), plus the UNet calls, forward time and fits of
        `remote` workers (an executor's `summary()`), if any."""
        workers = [] if remote is None else remote["workers"]
        wall = time.perf_counter() - start
        forward = probe.forward_seconds + sum(w["forward_s"] for w in workers)
        return cls(
            wall_s=wall,
            forward_s=forward,
            unet_evaluations=probe.forward_calls + sum(w["unet_calls"] for w in workers),
            new_evaluations=runner.new,
            evaluations=len(runner.evaluations),
            kmeans_fits=cache.fits + sum(w["kmeans_fits"] for w in workers),
            overhead=wall / forward if forward else float("nan"),
            unet_batch=probe.unet_batch,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MatchedPair:
    """A reference-rule recipe and the best of ours (size-aware or refined) at equal or smaller bits/param."""

    reference: str
    reference_bpp: float
    reference_psnr: float
    ours: str
    ours_bpp: float
    ours_psnr: float
    gain_db: float  # ours_psnr - reference_psnr (one-step latent PSNR, mean over prompts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MatchedComparison:
    """Each reference-rule recipe against the best of ours (size-aware or refined) that is no larger (`pairs`)."""

    pairs: tuple[MatchedPair, ...]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def mean_gain_db(self, min_bpp: float = -math.inf, max_bpp: float = math.inf) -> float:
        """Mean `gain_db` over the pairs whose reference recipe has `min_bpp <= bits/param <= max_bpp` (NaN: none)."""
        gains = [p.gain_db for p in self.pairs if min_bpp <= p.reference_bpp <= max_bpp]
        return sum(gains) / len(gains) if gains else math.nan

    def to_records(self) -> list[dict]:
        """One dict per pair (the `matched_comparison` list of `run.json`)."""
        return [p.to_dict() for p in self.pairs]

    def to_frame(self):
        """One row per pair; the columns are `MatchedPair`'s fields (also when there are no pairs)."""
        import pandas as pd

        return pd.DataFrame(self.to_records(), columns=[f.name for f in fields(MatchedPair)])


@dataclass(kw_only=True)
class AnalysisResult:
    """What `run_analysis` measured and decided.

    Attributes:
        config, identity: the inputs (identity holds the store key's ingredients).
        layers: candidate layer -> numel, in module order.
        evaluations: every evaluation, in the order they were planned.
        recipes: the strategies' recipes with their end-to-end PSNR.
        preanalysis: the reference-format JSON content (`PreAnalysis`).
        timing: where the time went (`Timing`).
        trajectory: `workbench.analysis.trajectory.TrajectoryResult` list (empty unless `config.trajectory`).
        fast: the fast sweep's model and validation (`workbench.sweep.prediction.FastReport`); None for an exhaustive
        sweep.
        execution: what ran where (the executor's `summary()`: its workers, their devices, evaluations and busy
            seconds); the `execution` object of `run.json`.
        refinement: per "refined" recipe, the recipe it started from and every measured step
            (`RefinementReport`); the `refinement` object of `run.json`.
    """

    config: AnalysisConfig
    identity: dict
    layers: dict
    evaluations: list[Evaluation]
    recipes: list[RecipeResult]
    preanalysis: PreAnalysis
    timing: Timing
    trajectory: list = field(default_factory=list)
    fast: FastReport | None = None
    execution: dict = field(default_factory=dict)
    refinement: RefinementReport = field(default_factory=RefinementReport)

    def baseline(self, name: str) -> float:
        return self.preanalysis.baselines[name]

    def to_frame(self):
        """Tidy table, one row per evaluation: kind, config, nbits, layer, position, recipe, bits_per_param,
        size_reduction_pct, psnr_mean, psnr_min, psnr (per prompt, ';'-joined), forward_s, extras."""
        import pandas as pd

        rows = []
        for e in self.evaluations:
            row = {
                "id": e.id,
                "kind": e.kind,
                "config": e.config,
                "nbits": e.nbits,
                "layer": e.layer,
                "position": e.position,
                "recipe": e.recipe,
                "bits_per_param": e.bits_per_param,
                "size_reduction_pct": None if e.bits_per_param is None else size_reduction_pct(e.bits_per_param),
                "psnr_mean": e.psnr_mean,
                "psnr_min": min(e.psnr),
                "psnr": ";".join(f"{p:g}" for p in e.psnr),
                "forward_s": e.forward_s,
            }
            row.update({k: v for k, v in e.extra.items() if not isinstance(v, (list, dict))})
            rows.append(row)
        frame = pd.DataFrame(rows)
        if "predicted" in frame:  # the fast sweep's predicted points; every other row was measured
            frame["predicted"] = frame["predicted"].astype("boolean").fillna(False).astype(bool)
        return frame

    def recipes_frame(self):
        """One row per recipe: name, strategy, bits_per_param, size_reduction_pct, psnr_mean, selector."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "name": r.name,
                    "strategy": r.strategy,
                    "bits_per_param": r.bits_per_param,
                    "size_reduction_pct": r.size_reduction_pct,
                    "psnr_mean": r.psnr_mean,
                    "predicted_psnr": r.predicted_psnr,
                    "selector": r.selector,
                }
                for r in self.recipes
            ]
        )

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """Cumulative curves for the plot: palette key -> [(size_reduction_pct, psnr_mean)] per addition.

        x is the candidates' bits/param with the first k layers palettized (the rest float16): per-tensor LUT
        cost is ignored as the reference does; grouped curves include their LUTs' bits.
        """
        total = sum(self.layers.values())
        out: dict[str, list[tuple[float, float]]] = {}
        for e in self.evaluations:
            if e.kind == "cumulative":
                out.setdefault(e.config, []).append((size_reduction_pct(e.bits_per_param), e.psnr_mean))
        return out if total else {}

    def matched_comparison(self) -> MatchedComparison:
        """For every apple recipe, the best of ours (size-aware or refined) at equal or smaller bits/param (+1e-6,
        the knapsack's slack)."""
        apple = [r for r in self.recipes if r.strategy == "apple" and r.bits_per_param < 16]
        ours = [r for r in self.recipes if r.strategy in ("size-aware", "refined")]
        pairs = []
        for ref in apple:
            fits = [r for r in ours if r.bits_per_param <= ref.bits_per_param + 1e-6]
            if not fits:
                continue
            best = max(fits, key=lambda r: (r.psnr_mean, r.bits_per_param))
            pairs.append(
                MatchedPair(
                    reference=ref.name,
                    reference_bpp=ref.bits_per_param,
                    reference_psnr=ref.psnr_mean,
                    ours=best.name,
                    ours_bpp=best.bits_per_param,
                    ours_psnr=best.psnr_mean,
                    gain_db=best.psnr_mean - ref.psnr_mean,
                )
            )
        return MatchedComparison(tuple(pairs))

    def save(self, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
        """Write `preanalysis.json` (reference format), `evaluations.csv`, `recipes.csv`, `run.json` (config,
        identity, environment, timing, execution, matched comparison) and `psnr_vs_size.png`, each atomically."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": self.preanalysis.save(out / "preanalysis.json"),
            "csv": write_text_atomic(out / "evaluations.csv", self.to_frame().to_csv(index=False)),
            "recipes_csv": write_text_atomic(out / "recipes.csv", self.recipes_frame().to_csv(index=False)),
        }
        if self.trajectory:
            import pandas as pd

            frame = pd.concat([t.to_frame() for t in self.trajectory], ignore_index=True)
            paths["trajectory_csv"] = write_text_atomic(out / "trajectory.csv", frame.to_csv(index=False))
        run = {
            "config": self.config.to_dict(),
            "identity": self.identity,
            "store_key": identity_key(self.identity),
            "environment": environment(),
            "timing": self.timing.to_dict(),
            "execution": self.execution,
            "matched_comparison": self.matched_comparison().to_records(),
        }
        if self.fast is not None:
            run["fast"] = self.fast.to_dict()
        if self.refinement:
            run["refinement"] = self.refinement.to_dict()
        paths["run"] = write_json_atomic(out / "run.json", run)
        if plot:
            paths["png"] = _save_figure(out / "psnr_vs_size.png", self)
        return paths


def _save_figure(path: Path, result: AnalysisResult) -> Path:
    import matplotlib.pyplot as plt  # the backend is the caller's (headless: matplotlib falls back to Agg)

    fig = plot_psnr_vs_size(result)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
