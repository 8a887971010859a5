"""The procedural shapes world of the demo model, and a scorer that checks an image against its prompt.

Every image is one flat-coloured shape on a plain dark background, described by four attributes:

- shape: circle, square, triangle (pointing up);
- colour: red, green, blue, yellow, purple, white;
- position: a cell of a 3x3 grid (top left, top, top right, left, center, right, bottom left, bottom,
  bottom right), with a little jitter inside the cell;
- size: small or large.

A caption reads "a small red circle at the top left". Sample `i` of the dataset with seed `s` is drawn
from `np.random.default_rng([s, i])`, so a dataset is deterministic and every prefix of a longer one is
the shorter one.

The scorer (`read_shape`, `score_adherence`) is a transparent heuristic, not a learned model: it
separates the largest blob that differs from the background colour and reads its attributes from
geometry that a reader can check by hand (see `read_shape`).

Example:
    >>> data = make_dataset(4, seed=0)
    >>> data.captions[0]
    'a small yellow triangle at the center'
    >>> report = score_adherence(data.images, data.attributes)
    >>> report.color_adherence
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (40, 40, 40)

# Geometry as fractions of the image side (64 px: cell centres at 12, 32, 52 px; sides 12 and 20 px).
_CELL_CENTERS = (0.1875, 0.5, 0.8125)
_SIDES = {"small": 0.1875, "large": 0.3125}
_POSITION_JITTER = 2 / 64  # uniform +- this many image sides around the cell centre
_SIDE_JITTER = 1 / 64
_SUPERSAMPLE = 4  # anti-aliasing: coverage is averaged over 4x4 subpixels

# Scorer thresholds (RGB distances in 0..255 units; the closest palette colour is 150 from the background).
FOREGROUND_DISTANCE = 75.0
MIN_AREA = 8
LARGE_SIDE = 0.25  # a blob whose longer bbox side exceeds this fraction of the image is "large"
TRIANGLE_MAX_TAPER = 0.62  # ideal triangle 0.2, circle and square 1.0
SQUARE_MIN_SPREAD = 1.16  # ideal square sqrt(2), circle 1.0, triangle 1.06

CAPTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(["a", "at", "the", *SIZES, *COLORS, *SHAPES, *" ".join(POSITIONS).split()])
)


def _check(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class ShapeAttributes:
    """What a caption asks for: one shape, its colour, grid position and size.

    Args:
        shape (`str`): one of `SHAPES`.
        color (`str`): one of `COLORS`.
        position (`str`): one of `POSITIONS` (row-major 3x3 grid).
        size (`str`, defaults to `"small"`): one of `SIZES`.
    """

    shape: str
    color: str
    position: str
    size: str = "small"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, tuple(COLORS))
        _check("position", self.position, POSITIONS)
        _check("size", self.size, SIZES)

    @property
    def caption(self) -> str:
        """The prompt for these attributes, e.g. "a small red circle at the top left"."""
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"

    @classmethod
    def from_caption(cls, caption: str) -> ShapeAttributes:
        """Parse a caption written by `caption` back into attributes.

        Raises:
            ValueError: if the caption does not have the form "a <size> <color> <shape> at the <position>".
        """
        words = caption.strip().lower().split()
        if len(words) < 7 or words[0] != "a" or words[4:6] != ["at", "the"]:
            raise ValueError(f"caption {caption!r} is not of the form 'a <size> <color> <shape> at the <position>'")
        return cls(shape=words[3], color=words[2], position=" ".join(words[6:]), size=words[1])

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> ShapeAttributes:
        return cls(**data)


def all_attributes() -> list[ShapeAttributes]:
    """Every combination of the attributes (3 shapes x 6 colours x 9 positions x 2 sizes = 324)."""
    return [
        ShapeAttributes(shape, color, position, size)
        for size in SIZES
        for color in COLORS
        for shape in SHAPES
        for position in POSITIONS
    ]


def _coverage(shape: str, center: tuple[float, float], side: float, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) float32 in [0, 1], from 4x4 supersampling."""
    s = _SUPERSAMPLE
    coords = (np.arange(image_size * s, dtype=np.float32) + 0.5) / s  # subpixel centres in pixel units
    x = coords[None, :] - center[0]
    y = coords[:, None] - center[1]
    half = side / 2
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    else:  # triangle pointing up: apex at the top centre of the bounding box, base at its bottom
        inside = (y <= half) & (np.abs(x) <= (y + half) / 2)
    return inside.reshape(image_size, s, image_size, s).mean(axis=(1, 3), dtype=np.float32)


def render_shape(
    attributes: ShapeAttributes, *, center: tuple[float, float] | None = None, side: float | None = None, image_size=64
) -> np.ndarray:
    """Draw one anti-aliased shape on the plain background.

    Args:
        attributes (`ShapeAttributes`): what to draw.
        center (`tuple[float, float]`, *optional*): (x, y) of the bounding-box centre in pixels; defaults to
            the centre of the position's grid cell.
        side (`float`, *optional*): bounding-box side in pixels (a circle's diameter); defaults to the size's
            nominal side.
        image_size (`int`, defaults to 64): output height and width.

    Returns:
        `np.ndarray`: HWC uint8 RGB image.
    """
    if center is None:
        row, col = divmod(POSITIONS.index(attributes.position), 3)
        center = (_CELL_CENTERS[col] * image_size, _CELL_CENTERS[row] * image_size)
    if side is None:
        side = _SIDES[attributes.size] * image_size
    alpha = _coverage(attributes.shape, center, side, image_size)[..., None]
    background = np.asarray(BACKGROUND, dtype=np.float32)
    color = np.asarray(COLORS[attributes.color], dtype=np.float32)
    return np.rint(background + alpha * (color - background)).astype(np.uint8)


@dataclass(frozen=True)
class ShapeSample:
    """One dataset item: the attributes, where exactly the shape was drawn, and the image (HWC uint8)."""

    attributes: ShapeAttributes
    center: tuple[float, float]
    side: float
    image: np.ndarray = field(repr=False)

    @property
    def caption(self) -> str:
        return self.attributes.caption


def make_sample(seed: int, index: int, image_size: int = 64) -> ShapeSample:
    """Sample `index` of the dataset with `seed`: uniform attributes, jittered position and side.

    Drawn from `np.random.default_rng([seed, index])`, so it depends on nothing else.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    attributes = ShapeAttributes(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=tuple(COLORS)[rng.integers(len(COLORS))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        size=SIZES[rng.integers(len(SIZES))],
    )
    row, col = divmod(POSITIONS.index(attributes.position), 3)
    jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2) * image_size
    center = (float(_CELL_CENTERS[col] * image_size + jitter[0]), float(_CELL_CENTERS[row] * image_size + jitter[1]))
    side = float((_SIDES[attributes.size] + rng.uniform(-_SIDE_JITTER, _SIDE_JITTER)) * image_size)
    image = render_shape(attributes, center=center, side=side, image_size=image_size)
    return ShapeSample(attributes, center, side, image)


@dataclass(frozen=True)
class ShapesDataset:
    """`n` samples as arrays: `images` is (N, H, W, 3) uint8 RGB; `attributes` has N entries."""

    seed: int
    images: np.ndarray = field(repr=False)
    attributes: tuple[ShapeAttributes, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.attributes)

    @property
    def captions(self) -> list[str]:
        return [a.caption for a in self.attributes]

    def to_frame(self):
        """One row per sample: index, caption and the four attributes."""
        import pandas as pd

        return pd.DataFrame([{"index": i, "caption": a.caption, **a.to_dict()} for i, a in enumerate(self.attributes)])


def make_dataset(n: int, seed: int = 0, image_size: int = 64) -> ShapesDataset:
    """The first `n` samples of the shapes dataset with `seed` (see `make_sample`).

    Use different seeds for training and held-out data: the images differ (jitter), though with 324
    attribute combinations the combinations themselves repeat.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    samples = [make_sample(seed, i, image_size) for i in range(n)]
    return ShapesDataset(seed, np.stack([s.image for s in samples]), tuple(s.attributes for s in samples))


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

    Images come from `workbench.generation.generate_images` (image `i` from seed `seed + i`, negative prompt "").
    Everything else is the pipeline's default (scheduler, `num_inference_steps`, `guidance_scale`, height and
    width) unless given in `pipe_kwargs`.

    Args:
        pipe: a diffusers text-to-image pipeline (e.g. `workbench.pipelines.load_pipeline(DEMO_MODEL)`).
        attributes (`Sequence[ShapeAttributes]`): what to ask for, e.g. `benchmark_attributes(64)`.
        seed (`int`, defaults to 0): seed of the first image.
        batch_size (`int`, defaults to 16): prompts per pipeline call.
        **pipe_kwargs: passed to `pipe(...)`.

    Returns:
        `AdherenceReport` with `images` set (N, H, W, 3) uint8.
    """
    from workbench.generation import generate_images

    captions = [a.caption for a in attributes]
    images = generate_images(pipe, captions, seed=seed, batch_size=batch_size, **pipe_kwargs)
    report = score_adherence(images, attributes)
    return AdherenceReport(report.expected, report.readings, images)
