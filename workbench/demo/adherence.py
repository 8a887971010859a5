"""Prompt adherence on the demo model's shapes world: read the shape, colour, position and size an image shows
(`read_shape`, a transparent scorer, no learned model) and compare it with what the caption asked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from workbench.demo.world import (
    COLORS,
    FOREGROUND_DISTANCE,
    LARGE_SIDE,
    MIN_AREA,
    POSITIONS,
    SQUARE_MIN_SPREAD,
    TRIANGLE_MAX_TAPER,
    ShapeAttributes,
    all_attributes,
)

# ---------------------------------------------------------------------------------------------- scorer


@dataclass(frozen=True)
class ShapeReading:
    """What `read_shape` sees in an image. Attributes are None when no shape was found.

    `fill` = blob area / bounding-box area; `taper` = mean row width of the blob's top third / of its
    bottom third; `spread` = the blob's longer extent along the diagonals / along the axes; `centroid` is
    (x, y) in pixels; `mean_rgb` is the mean colour of the blob's interior.
    """

    shape: str | None
    color: str | None
    position: str | None
    size: str | None
    area: int
    fill: float
    taper: float
    spread: float
    centroid: tuple[float, float]
    mean_rgb: tuple[float, float, float]


def _as_uint8_rgb(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HWC RGB image (PIL or array), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    raise ValueError(f"expected uint8 or float in [0, 1] pixels, got dtype {array.dtype}")


def _label_foreground(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: background = median colour of the border pixels; foreground = pixels farther than
    `FOREGROUND_DISTANCE` from it. Returns the 8-connected blob labels (H, W) and the areas of blobs 1..n."""
    from scipy import ndimage

    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    labels, n_blobs = ndimage.label(distance > FOREGROUND_DISTANCE, structure=np.ones((3, 3)))
    return labels, np.bincount(labels.ravel(), minlength=n_blobs + 1)[1:]


def _read_color(pixels: np.ndarray, blob: np.ndarray) -> tuple[str, np.ndarray]:
    """Step 2: the palette colour nearest to the mean of the blob's interior (eroded by one pixel), and that mean."""
    from scipy import ndimage

    interior = ndimage.binary_erosion(blob)
    mean_rgb = pixels[interior if interior.any() else blob].mean(axis=0)
    names = list(COLORS)
    palette = np.asarray([COLORS[c] for c in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - mean_rgb, axis=1)))], mean_rgb


def _read_position(blob: np.ndarray) -> tuple[str, tuple[float, float]]:
    """Step 3: the 3x3 grid cell of the blob's centroid, and the centroid (x, y) in pixels."""
    height, width = blob.shape
    ys, xs = np.nonzero(blob)
    cx, cy = float(xs.mean()), float(ys.mean())
    col = min(int(3 * (cx + 0.5) / width), 2)
    row = min(int(3 * (cy + 0.5) / height), 2)
    return POSITIONS[3 * row + col], (cx, cy)


@dataclass(frozen=True)
class _BlobGeometry:
    """Step 4's measurements of a blob (see `ShapeReading`), and the longer side of its bounding box in pixels."""

    fill: float
    taper: float
    spread: float
    side: int


def _measure_blob(blob: np.ndarray) -> _BlobGeometry:
    ys, xs = np.nonzero(blob)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_h, box_w = bottom - top, right - left
    row_widths = blob[top:bottom].sum(axis=1).astype(np.float64)
    third = max(box_h // 3, 1)
    taper = float(row_widths[:third].mean() / max(row_widths[-third:].mean(), 1.0))
    diagonal = max(np.ptp(xs + ys), np.ptp(xs - ys)) / np.sqrt(2) + 1  # +1: extents count whole pixels
    return _BlobGeometry(
        fill=float(blob.sum() / (box_h * box_w)),
        taper=taper,
        spread=float(diagonal / max(box_h, box_w)),
        side=int(max(box_h, box_w)),
    )


def _classify_shape(geometry: _BlobGeometry) -> str:
    """Step 4: a triangle tapers; of the others, a square spreads along its diagonals and a circle does not."""
    if geometry.taper < TRIANGLE_MAX_TAPER:
        return "triangle"
    return "square" if geometry.spread > SQUARE_MIN_SPREAD else "circle"


def read_shape(image) -> ShapeReading:
    """Read shape, colour, position and size off an image with a transparent heuristic.

    1. Background = median colour of the border pixels; foreground = pixels farther than
       `FOREGROUND_DISTANCE` from it (RGB, 0..255); keep the largest 8-connected blob (>= `MIN_AREA` px).
    2. Colour: the palette colour nearest to the mean of the blob's interior (blob eroded by one pixel).
    3. Position: the 3x3 grid cell of the blob's centroid.
    4. Shape: taper = mean width of the top third of the blob's rows / of the bottom third; a triangle
       tapers (taper < `TRIANGLE_MAX_TAPER`, ideal 0.2), a circle and a square do not (ideal 1.0). Of those,
       spread = max extent along the two diagonals / max extent along x and y separates squares (ideal
       sqrt(2), > `SQUARE_MIN_SPREAD`) from circles (ideal 1.0). Unlike the fill ratio (area / bounding
       box: 1.0 vs pi/4), spread survives blurred corners.
    5. Size: "large" when the longer bounding-box side exceeds `LARGE_SIDE` of the image side.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): HWC RGB, uint8 or float in [0, 1].

    Returns:
        `ShapeReading`.
    """
    pixels = _as_uint8_rgb(image).astype(np.float32)
    labels, areas = _label_foreground(pixels)
    if areas.max(initial=0) < MIN_AREA:
        area = int(areas.max(initial=0))
        return ShapeReading(None, None, None, None, area, 0.0, 0.0, 0.0, (np.nan, np.nan), (0.0, 0.0, 0.0))
    blob = labels == (1 + int(np.argmax(areas)))
    color, mean_rgb = _read_color(pixels, blob)
    position, centroid = _read_position(blob)
    geometry = _measure_blob(blob)
    return ShapeReading(
        shape=_classify_shape(geometry),
        color=color,
        position=position,
        size="large" if geometry.side > LARGE_SIDE * max(blob.shape) else "small",
        area=int(blob.sum()),
        fill=geometry.fill,
        taper=geometry.taper,
        spread=geometry.spread,
        centroid=centroid,
        mean_rgb=tuple(float(v) for v in mean_rgb),
    )


@dataclass(frozen=True)
class AdherenceReport:
    """Per-image readings against what each prompt asked for; adherence = fraction of matches.

    `images` holds the scored images, (N, H, W, 3) uint8, when the report made them (`generate_and_score`).
    """

    expected: tuple[ShapeAttributes, ...]
    readings: tuple[ShapeReading, ...]
    images: np.ndarray | None = field(default=None, repr=False, compare=False)

    def _rate(self, attribute: str) -> float:
        hits = [getattr(r, attribute) == getattr(e, attribute) for e, r in zip(self.expected, self.readings)]
        return float(np.mean(hits))

    @property
    def color_adherence(self) -> float:
        return self._rate("color")

    @property
    def shape_adherence(self) -> float:
        return self._rate("shape")

    @property
    def position_adherence(self) -> float:
        return self._rate("position")

    @property
    def size_adherence(self) -> float:
        return self._rate("size")

    def summary(self) -> str:
        """`color_adherence=X shape_adherence=Y position_adherence=Z`, three decimals each."""
        return (
            f"color_adherence={self.color_adherence:.3f} shape_adherence={self.shape_adherence:.3f} "
            f"position_adherence={self.position_adherence:.3f}"
        )

    def to_frame(self):
        """One row per image: the prompt, expected and read attributes, match flags and the features."""
        import pandas as pd

        rows = []
        for e, r in zip(self.expected, self.readings):
            row = {"prompt": e.caption}
            for attribute in ("color", "shape", "position", "size"):
                row[attribute] = getattr(e, attribute)
                row[f"read_{attribute}"] = getattr(r, attribute)
                row[f"{attribute}_ok"] = getattr(r, attribute) == getattr(e, attribute)
            row.update(area=r.area, fill=r.fill, taper=r.taper, spread=r.spread)
            rows.append(row)
        return pd.DataFrame(rows)


def score_adherence(images, attributes: Sequence[ShapeAttributes | str]) -> AdherenceReport:
    """Read every image and compare with the attributes its prompt asked for.

    Args:
        images: a sequence of PIL images or HWC arrays, or one (N, H, W, 3) array (uint8, or float in [0, 1]).
        attributes: one `ShapeAttributes` or caption string per image.

    Returns:
        `AdherenceReport`.
    """
    expected = tuple(a if isinstance(a, ShapeAttributes) else ShapeAttributes.from_caption(a) for a in attributes)
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images but {len(expected)} attributes/prompts")
    return AdherenceReport(expected, tuple(read_shape(image) for image in images))


def benchmark_attributes(n: int = 64, seed: int = 0) -> list[ShapeAttributes]:
    """`n` fixed prompts' attributes: a seeded shuffle of `all_attributes()` (cycled past 324)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    combos = all_attributes()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [combos[order[i % len(combos)]] for i in range(n)]


def generate_and_score(
    pipe, attributes: Sequence[ShapeAttributes], *, seed: int = 0, batch_size: int = 16, **pipe_kwargs
) -> AdherenceReport:
    """Generate one image per prompt with a text-to-image pipeline and score it with `score_adherence`.

    Images come from `workbench.models.generation.generate_images` (image `i` from seed `seed + i`, negative prompt
    "").
    Everything else is the pipeline's default (scheduler, `num_inference_steps`, `guidance_scale`, height and
    width) unless given in `pipe_kwargs`.

    Args:
        pipe: a diffusers text-to-image pipeline (e.g. `workbench.models.loader.load_pipeline(DEMO_MODEL)`).
        attributes (`Sequence[ShapeAttributes]`): what to ask for, e.g. `benchmark_attributes(64)`.
        seed (`int`, defaults to 0): seed of the first image.
        batch_size (`int`, defaults to 16): prompts per pipeline call.
        **pipe_kwargs: passed to `pipe(...)`.

    Returns:
        `AdherenceReport` with `images` set (N, H, W, 3) uint8.
    """

    captions = [a.caption for a in attributes]
    from workbench.models.generation import generate_images  # torch: the scorer alone needs none (`workbench train`)

    images = generate_images(pipe, captions, seed=seed, batch_size=batch_size, **pipe_kwargs)
    report = score_adherence(images, attributes)
    return AdherenceReport(report.expected, report.readings, images)
