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
