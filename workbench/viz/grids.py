"""Captioned image grids: rows of images with row labels, column headers and a caption under each cell.

Used by `workbench.compare.seed_matched.SeedMatchedImages.render` (prompts as rows, recipes as columns) and by the
demo model's card. Pure rendering: nothing here generates or scores images.

Example:
    >>> image_grid([[a, b], [c, d]], row_labels=["p1", "p2"], column_labels=["float16", "4-bit"]).save("g.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)


def _font(size: int):
    from PIL import ImageFont

    # Pillow >= 10.1 ships a scalable default font (FreeType), so no system font file is needed.
    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int, draw) -> list[str]:
    """Greedy word wrap of each line of `text` to `width` pixels; a word wider than `width` (a long recipe
    name) is broken after `_` or `.` where possible, else between characters."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word, glued in _split_long(paragraph.split(" "), font, width, draw):
            candidate = line + word if glued else f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _split_long(words, font, width, draw) -> list[tuple[str, bool]]:
    """`(piece, glued)` pairs: `glued` pieces continue the previous piece of the same word (no space)."""
    out = []
    for word in words:
        glued = False
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            breaks = [i + 1 for i in range(cut) if word[i] in "_."]
            cut = breaks[-1] if breaks else cut
            out.append((word[:cut], glued))
            word, glued = word[cut:], True
        out.append((word, glued))
    return out


def image_grid(
    images: Sequence[Sequence],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_captions: Sequence[Sequence[str]] | None = None,
    cell_size: int = 128,
    title: str | None = None,
    font_size: int = 13,
):
    """Lay out `images[row][col]` as one PIL image with row labels on the left, column headers on top and a
    caption under each cell. Images are upscaled with nearest-neighbour so pixels stay visible.

    Args:
        images (`Sequence[Sequence]`): rows of PIL images or HWC uint8 arrays; every row the same length.
        row_labels (`Sequence[str]`, *optional*): one per row (wrapped; `\\n` starts a new line).
        column_labels (`Sequence[str]`, *optional*): one per column; the first line is drawn dark, the rest muted.
        cell_captions (`Sequence[Sequence[str]]`, *optional*): `cell_captions[row][col]`, under each image.
        cell_size (`int`, defaults to 128): displayed side of each image in pixels.
        title (`str`, *optional*): a line across the top.
        font_size (`int`, defaults to 13): label text size in pixels.

    Returns:
        `PIL.Image.Image`: RGB.
    """
    from PIL import Image, ImageDraw

    _check_grid(images, row_labels, column_labels, cell_captions)
    font = _font(font_size)
    labels = (row_labels, column_labels, cell_captions)
    layout = _layout(len(images), len(images[0]), labels, cell_size, title, font, font_size)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(layout.title_lines):
        draw.text((layout.pad, layout.pad + i * layout.line_h), line, fill=TEXT, font=font)
    for c, lines in enumerate(layout.column_lines):
        x = layout.cell_x(c)
        _draw_label(draw, (x, layout.title_h), lines, layout.column_dark[c], layout.line_h, font)
    small = _font(font_size - 2)
    for r, row in enumerate(images):
        y = layout.row_y(r)
        if layout.row_lines:
            _draw_label(draw, (layout.pad, y), layout.row_lines[r], layout.row_dark[r], layout.line_h, font)
        for c, image in enumerate(row):
            x = layout.cell_x(c)
            tile = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            canvas.paste(tile.convert("RGB").resize((cell_size, cell_size), Image.NEAREST), (x, y))
            if cell_captions is not None:
                draw.text((x, y + cell_size + 2), cell_captions[r][c], fill=MUTED, font=small)
    return canvas


def _check_grid(images, row_labels, column_labels, cell_captions) -> None:
    """Raise `ValueError` naming the mismatch if the rows, labels and captions do not fit together."""
    n_rows = len(images)
    if n_rows == 0:
        raise ValueError("image_grid needs at least one row of images")
    n_cols = len(images[0])
    if n_cols == 0 or any(len(row) != n_cols for row in images):
        raise ValueError(f"every row needs the same, non-zero number of images; got {[len(r) for r in images]}")
    for name, labels, n in (("row_labels", row_labels, n_rows), ("column_labels", column_labels, n_cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name.split('_')[0]}s")
    if cell_captions is not None and [len(r) for r in cell_captions] != [n_cols] * n_rows:
        raise ValueError(f"cell_captions must be {n_rows} rows of {n_cols}")


@dataclass(frozen=True)
class _Layout:
    """Pixel geometry of a grid: wrapped labels, band heights and the canvas size."""

    pad: int
    line_h: int
    cell_size: int
    label_w: int
    title_lines: list[str]
    title_h: int
    header_h: int
    row_h: int
    row_lines: list[list[str]]
    row_dark: list[int]  # how many wrapped lines of each label are its first line (drawn dark)
    column_lines: list[list[str]]
    column_dark: list[int]
    width: int
    height: int

    def cell_x(self, c: int) -> int:
        return self.label_w + self.pad + c * (self.cell_size + self.pad)

    def row_y(self, r: int) -> int:
        return self.title_h + self.header_h + r * self.row_h


def _layout(n_rows, n_cols, labels, cell_size, title, font, font_size) -> _Layout:
    """Wrap every label to its band and size the canvas; `labels` is (row_labels, column_labels, cell_captions)."""
    from PIL import Image, ImageDraw

    row_labels, column_labels, cell_captions = labels
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_h, small_h = 6, font_size + 4, font_size + 2
    label_w = max(150, cell_size + 30) if row_labels is not None else 0
    row_lines = [_wrap(label, font, label_w - 2 * pad, measure) for label in row_labels or []]
    row_dark = [len(_wrap(label.split("\n")[0], font, label_w - 2 * pad, measure)) for label in row_labels or []]
    column_lines = [_wrap(label, font, cell_size, measure) for label in column_labels or []]
    column_dark = [len(_wrap(label.split("\n")[0], font, cell_size, measure)) for label in column_labels or []]
    header_h = (max(len(lines) for lines in column_lines) * line_h + pad) if column_lines else 0
    caption_h = small_h + pad if cell_captions is not None else 0
    title_lines = _wrap(title, font, label_w + n_cols * (cell_size + pad) - pad, measure) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title else 0
    row_h = max(cell_size + caption_h, max((len(r) * line_h for r in row_lines), default=0)) + pad
    return _Layout(
        pad, line_h, cell_size, label_w, title_lines, title_h, header_h, row_h, row_lines, row_dark,
        column_lines, column_dark,
        width=label_w + n_cols * (cell_size + pad) + pad,
        height=title_h + header_h + n_rows * row_h + pad,
    )  # fmt: skip


def _draw_label(draw, origin: tuple[int, int], lines: list[str], dark: int, line_h: int, font) -> None:
    """Wrapped label lines from `origin` down; the first `dark` lines dark, the rest muted."""
    x, y = origin
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_h), line, fill=TEXT if i < dark else MUTED, font=font)
