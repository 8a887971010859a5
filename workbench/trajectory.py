"""Full-trajectory evaluation: generate with the pipeline's normal step count and compare decoded images.

The reference's one-step latent PSNR is dominated by the shared noise and hides error that accumulates over a
sampling trajectory. Here each recipe generates the same prompts from the same seed as the float model, with
the pipeline's default (or a given) number of steps, and the decoded images are compared with the float
model's: image PSNR (peak 1.0, images in [0, 1]) and SSIM per prompt, and, when every prompt is a caption of
the demo model's shapes world, prompt adherence (`workbench.shapes.score_adherence`) of both.

Example:
    >>> results = evaluate_trajectories(pipe, {"recipe_4.50_bit_sizeaware": bits}, prompts, seed=0)
    >>> pd.concat([r.to_frame() for r in results])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.metrics import psnr, ssim
from workbench.palettize import PaletteCache, palettized


@dataclass(frozen=True)
class TrajectoryResult:
    """One recipe's full-trajectory images against the float model's.

    Attributes:
        recipe: the recipe name ("float" for the float model itself).
        prompts: the prompts, in order.
        image_psnr: per prompt, dB, peak 1.0 (inf for identical images).
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


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """`pipe(prompts, negative_prompt=[""]*n, generator=Generator().manual_seed(seed))` as NHWC float in [0, 1]."""
    kwargs = {"num_inference_steps": num_inference_steps, "height": height, "width": width}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    generator = torch.Generator(device=pipe.unet.device).manual_seed(seed)
    out = pipe(list(prompts), negative_prompt=[""] * len(prompts), generator=generator, output_type="np", **kwargs)
    return np.asarray(out.images, dtype=np.float64)


def _adherence(images: np.ndarray, prompts: Sequence[str]) -> dict | None:
    from workbench.shapes import ShapeAttributes, score_adherence

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
    """Per-prompt image PSNR and SSIM of `images` against `reference` (both NHWC in [0, 1]), and adherence."""
    return TrajectoryResult(
        recipe=recipe,
        prompts=tuple(prompts),
        image_psnr=tuple(psnr(r, t, peak=1.0) for r, t in zip(reference, images)),
        ssim=tuple(ssim(r, t, data_range=1.0) for r, t in zip(reference, images)),
        adherence=_adherence(images, prompts),
    )


@torch.no_grad()
def evaluate_trajectories(
    pipe,
    recipes: Mapping[str, Mapping[str, int]],
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    cache: PaletteCache | None = None,
    runner=None,
) -> list[TrajectoryResult]:
    """Full-trajectory comparison of each recipe with the float model (listed first, as recipe "float").

    Args:
        pipe: the pipeline; palettized in place per recipe and restored exactly.
        recipes: name -> {layer: bits}.
        prompts: prompts to generate (negative prompt "").
        seed (`int`, defaults to 0): one generator seed for the batch, the same for every recipe.
        num_inference_steps (`int`, *optional*): None = the pipeline's default.
        height, width (`int`, *optional*): None = the pipeline's default.
        cache (`PaletteCache`, *optional*): reuse fitted palettes.
        runner: internal (`workbench.analysis`): records each comparison in the analysis store.

    Returns:
        `list[TrajectoryResult]`, the float model first.
    """
    cache = cache if cache is not None else PaletteCache()
    gen = {"seed": seed, "num_inference_steps": num_inference_steps, "height": height, "width": width}
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
