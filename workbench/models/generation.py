"""The one way the workbench generates images, and its seeding rule.

Every image the workbench shows or scores (seed-matched grids, full-trajectory metrics, the Core ML
comparison, the demo model's adherence benchmark, the explorers) comes from `generate_images`, so "the image
of prompt p, seed s, n steps" means the same pixels wherever it appears.

Seeding rule: image `i` of a call starts from the initial noise of `torch.Generator("cpu").manual_seed(seed + i)`.
The generators live on the CPU (diffusers draws the latents there and moves them to the pipeline's device), so
the starting noise is the same on CPU, CUDA, MPS and a Core ML pipeline, and one image does not depend on the
others in its batch. The negative prompt is "" (the reference pre-analysis' choice; for SDXL it is not the same
as `None`, which zeroes the unconditional embeddings).

Images are returned as NHWC uint8 arrays, the pixels an app would show; `workbench.metrics.image_psnr` and
`image_ssim` compare them.

Example:
    >>> images = generate_images(pipe, ["a small red circle at the top left"], seed=0, steps=20)
    >>> images.shape, images.dtype
    ((1, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


def seed_generators(seed: int, n: int) -> list[torch.Generator]:
    """The seeding rule: `n` CPU generators, the i-th seeded with `seed + i`."""
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] (any float array, NHWC or HWC) as uint8: `rint(clip(x, 0, 1) * 255)`."""
    return np.rint(np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Sampling:
    """How to sample a set of images: `generate_images`' seed, step count and size, as one value.

    Attributes:
        seed (`int`, defaults to 0): the first image's seed (image `i` from `seed + i`).
        steps (`int`, *optional*): `num_inference_steps`; None = the pipeline's default.
        height, width (`int`, *optional*): image size; None = the pipeline's default.

    Example:
        >>> generate_images(pipe, prompts, **Sampling(seed=0, steps=20).to_dict())
    """

    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None

    def to_dict(self) -> dict:
        """The fields as `generate_images`' keyword arguments."""
        return asdict(self)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: str | Sequence[str],
    *,
    seed: int = 0,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    **kwargs,
) -> np.ndarray:
    """Generate one image per prompt with the workbench's seeding rule (module docstring).

    Args:
        pipe: a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL) or a `workbench.coreml` Core ML pipeline.
        prompts (`str | Sequence[str]`): the prompts; image `i` is prompt `i` from seed `seed + i`.
        seed (`int`, defaults to 0): the first image's seed.
        steps (`int`, *optional*): `num_inference_steps`; None = the pipeline's default.
        height, width (`int`, *optional*): image size; None = the pipeline's default.
        batch_size (`int`, *optional*): prompts per pipeline call; None = all at once. Seeds do not depend on it.
        **kwargs: passed to the pipeline (e.g. `guidance_scale`); `negative_prompt` defaults to "".

    Returns:
        `np.ndarray`: (len(prompts), H, W, 3) uint8.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate_images needs at least one prompt")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = {"num_inference_steps": steps, "height": height, "width": width}
    options = {k: v for k, v in options.items() if v is not None}
    negative = kwargs.pop("negative_prompt", "")
    if isinstance(negative, str):
        negative = [negative] * len(prompts)
    elif negative is not None and len(negative) != len(prompts):
        raise ValueError(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
    generators = seed_generators(seed, len(prompts))
    size = batch_size or len(prompts)
    chunks = []
    for start in range(0, len(prompts), size):
        batch = prompts[start : start + size]
        out = pipe(
            batch,
            negative_prompt=None if negative is None else negative[start : start + size],
            generator=generators[start : start + size],
            output_type="np",
            **options,
            **kwargs,
        )
        chunks.append(to_uint8(out.images))
    return np.concatenate(chunks)
