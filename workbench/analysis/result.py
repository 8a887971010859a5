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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workbench.palettes.size import size_reduction_pct
from workbench.recipes.recipe import PreAnalysis
from workbench.sweep.store import Evaluation, identity_key

if TYPE_CHECKING:
    from workbench.analysis.config import AnalysisConfig
    from workbench.sweep.prediction import FastReport


@dataclass(frozen=True)
class RecipeResult:
    """A recipe a strategy produced, with its end-to-end measurement."""

    name: str
    strategy: str
    bits: dict
    bits_per_param: float
    psnr: tuple[float, ...]
    selector: float  # the threshold (apple) or the bits/param target (size-aware)
    predicted_psnr: float | None = None

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def size_reduction_pct(self) -> float:
        return size_reduction_pct(self.bits_per_param)


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


@dataclass
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
        fast: the fast sweep's model and validation (`workbench.sweep.prediction.FastReport`); None for an exhaustive sweep.
        execution: what ran where (the executor's `summary()`: its workers, their devices, evaluations and busy
            seconds); the `execution` object of `run.json`.
        refinement: per "refined" recipe, the recipe it started from and every measured step
            (`workbench.recipes.refine.Refinement.to_dict`); the `refinement` object of `run.json`.
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
    refinement: dict = field(default_factory=dict)

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
        from workbench.io import environment, write_json_atomic, write_text_atomic

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
            run["refinement"] = self.refinement
        paths["run"] = write_json_atomic(out / "run.json", run)
        if plot:
            paths["png"] = _save_figure(out / "psnr_vs_size.png", self)
        return paths


def _save_figure(path: Path, result: AnalysisResult) -> Path:
    import matplotlib.pyplot as plt  # the backend is the caller's (headless: matplotlib falls back to Agg)

    from workbench.viz.plots import plot_psnr_vs_size

    fig = plot_psnr_vs_size(result)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
