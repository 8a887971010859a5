"""Full-trajectory evaluation: generate with the pipeline's normal step count and compare decoded images.

The reference's one-step latent PSNR is dominated by the shared noise and hides error that accumulates over a
sampling trajectory. Here each recipe generates the same prompts from the same seed as the float model, with
the pipeline's default (or a given) number of steps, and the decoded images are compared with the float
model's: image PSNR and SSIM per prompt (`workbench.metrics.image_psnr`: uint8 images, peak 255), and, when
every prompt is a caption of the demo model's shapes world, prompt adherence
(`workbench.demo.adherence.score_adherence`) of both.

Example:
    >>> results = evaluate_trajectories(pipe, {"recipe_4.50_bit_sizeaware": bits}, prompts, Sampling(seed=0))
    >>> pd.concat([r.to_frame() for r in results])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.demo.adherence import score_adherence
from workbench.demo.world import ShapeAttributes
from workbench.metrics import image_psnr, image_ssim
from workbench.models.generation import Sampling, generate_images
from workbench.palettes.apply import palettized
from workbench.palettes.cache import PaletteCache

if TYPE_CHECKING:
    from workbench.analysis.config import AnalysisConfig
    from workbench.analysis.result import RecipeResult
    from workbench.sweep.store import EvaluationRunner


@dataclass(frozen=True)
class TrajectoryResult:
    """One recipe's full-trajectory images against the float model's.

    Attributes:
        recipe: the recipe name ("float" for the float model itself).
        prompts: the prompts, in order.
        image_psnr: per prompt, dB, `workbench.metrics.image_psnr` (uint8 images, peak 255; inf if identical).
        ssim: per prompt.
        adherence: {"color", "shape", "position", "size"} rates (None unless the prompts are shape captions).
    """

    recipe: str
    prompts: tuple[str, ...]
    image_psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    adherence: dict | None = field(default=None)

    def to_frame(self):
        """One row per prompt: recipe, prompt, image_psnr, ssim, and adherence rates (same on every row)."""
        import pandas as pd

        rows = [
            {"recipe": self.recipe, "prompt": p, "image_psnr": v, "ssim": s, **(self.adherence or {})}
            for p, v, s in zip(self.prompts, self.image_psnr, self.ssim)
        ]
        return pd.DataFrame(rows)


def _adherence(images: np.ndarray, prompts: Sequence[str]) -> dict | None:
    try:
        attributes = [ShapeAttributes.from_caption(p) for p in prompts]
    except ValueError:
        return None
    report = score_adherence(images, attributes)
    return {
        "color": report.color_adherence,
        "shape": report.shape_adherence,
        "position": report.position_adherence,
        "size": report.size_adherence,
    }


def compare_images(recipe: str, prompts: Sequence[str], reference: np.ndarray, images: np.ndarray) -> TrajectoryResult:
    """Per-prompt image PSNR and SSIM (`workbench.metrics.image_psnr` / `image_ssim`) of `images` against
    `reference` (both NHWC uint8), and adherence."""
    return TrajectoryResult(
        recipe=recipe,
        prompts=tuple(prompts),
        image_psnr=tuple(image_psnr(r, t) for r, t in zip(reference, images)),
        ssim=tuple(image_ssim(r, t) for r, t in zip(reference, images)),
        adherence=_adherence(images, prompts),
    )


@torch.no_grad()
def evaluate_trajectories(
    pipe,
    recipes: Mapping[str, Mapping[str, int]],
    prompts: Sequence[str],
    sampling: Sampling = Sampling(),
    *,
    cache: PaletteCache | None = None,
    runner=None,
) -> list[TrajectoryResult]:
    """Full-trajectory comparison of each recipe with the float model (listed first, as recipe "float").

    Args:
        pipe: the pipeline; palettized in place per recipe and restored exactly.
        recipes: name -> {layer: bits}.
        prompts: prompts to generate (negative prompt "").
        sampling (`Sampling`, defaults to seed 0 and the pipeline's steps and size): the same for every recipe;
            prompt `i` starts from seed `sampling.seed + i` (`generate_images`).
        cache (`PaletteCache`, *optional*): reuse fitted palettes.
        runner (`workbench.sweep.store.EvaluationRunner`, *optional*): records each comparison in the analysis store.

    Returns:
        `list[TrajectoryResult]`, the float model first.
    """
    cache = cache if cache is not None else PaletteCache()
    gen = sampling.to_dict()
    reference = generate_images(pipe, prompts, **gen)
    results = []
    for name, bits in {"float": {}, **recipes}.items():

        def measure(bits=bits, name=name):
            with palettized(pipe.unet, bits, cache):
                images = reference if not bits else generate_images(pipe, prompts, **gen)
            r = compare_images(name, prompts, reference, images)
            return {"psnr": list(r.image_psnr), "extra": {"ssim": list(r.ssim), "adherence": r.adherence}}

        if runner is None:
            m = measure()
        else:
            e = runner.measure(f"trajectory/{name}", "trajectory", measure, config="trajectory", recipe=name)
            m = {"psnr": list(e.psnr), "extra": e.extra}
        results.append(
            TrajectoryResult(
                name, tuple(prompts), tuple(m["psnr"]), tuple(m["extra"]["ssim"]), m["extra"]["adherence"]
            )
        )
    return results


def recipe_trajectories(
    pipe,
    config: AnalysisConfig,
    recipes: Sequence[RecipeResult],
    runner: EvaluationRunner,
    cache: PaletteCache | None = None,
) -> list[TrajectoryResult]:
    """Full trajectories of the float model and every recipe of an analysis (`evaluate_trajectories`) on
    `config.trajectory_prompts` (None: `config.prompts`), recorded in the store."""
    runner.plan(1 + len(recipes))
    return evaluate_trajectories(
        pipe,
        {r.name: r.bits for r in recipes},
        config.trajectory_prompts or config.prompts,
        Sampling(config.seed, config.trajectory_steps, config.height, config.width),
        cache=cache,
        runner=runner,
    )
