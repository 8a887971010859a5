import numpy as np
import pytest

from workbench.demo.adherence import read_shape, score_adherence
from workbench.demo.world import (
    BACKGROUND,
    CAPTION_WORDS,
    COLORS,
    POSITIONS,
    SHAPES,
    ShapeAttributes,
    all_attributes,
    make_dataset,
    make_sample,
    render_shape,
)


def test_dataset_is_deterministic_and_prefix_stable():
    a = make_dataset(16, seed=3)
    b = make_dataset(16, seed=3)
    assert a.images.shape == (16, 64, 64, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    short = make_dataset(5, seed=3)
    np.testing.assert_array_equal(short.images, a.images[:5])
    assert make_sample(3, 7).caption == a.captions[7]
    other = make_dataset(16, seed=4)
    assert not np.array_equal(other.images, a.images)


def test_captions_parse_back_and_use_the_small_vocabulary():
    data = make_dataset(200, seed=0)
    for caption, attributes in zip(data.captions, data.attributes):
        assert caption.startswith("a ") and " at the " in caption
        assert ShapeAttributes.from_caption(caption) == attributes
        assert set(caption.split()) <= set(CAPTION_WORDS)
    assert ShapeAttributes("circle", "red", "top left").caption == "a small red circle at the top left"
    combos = all_attributes()
    assert len(combos) == len(set(combos)) == 3 * 6 * 9 * 2
    # every attribute value occurs in a dataset of this size
    for name, values in [("shape", SHAPES), ("color", COLORS), ("position", POSITIONS)]:
        assert {getattr(a, name) for a in data.attributes} == set(values)


def test_bad_attributes_name_the_valid_values():
    with pytest.raises(ValueError, match="unknown color 'orange'; valid: red, green"):
        ShapeAttributes("circle", "orange", "top")
    with pytest.raises(ValueError, match="not of the form"):
        ShapeAttributes.from_caption("a red circle")


def test_scorer_reads_held_out_images_above_95_percent():
    held_out = make_dataset(400, seed=12345)  # training uses seed 0
    report = score_adherence(held_out.images, held_out.captions)
    for attribute in ("color", "shape", "position", "size"):
        rate = getattr(report, f"{attribute}_adherence")
        assert rate >= 0.95, f"{attribute} adherence {rate} on clean held-out images is too low"
    frame = report.to_frame()
    assert len(frame) == 400 and frame["color_ok"].all()
    assert report.summary().startswith("color_adherence=1.000 shape_adherence=")


def test_scorer_accepts_float_and_pil_images():
    from PIL import Image

    attributes = ShapeAttributes("triangle", "purple", "bottom right", "large")
    image = render_shape(attributes)
    readings = [read_shape(image), read_shape(image.astype(np.float32) / 255), read_shape(Image.fromarray(image))]
    for reading in readings:
        assert (reading.shape, reading.color, reading.position, reading.size) == (
            "triangle",
            "purple",
            "bottom right",
            "large",
        )


def test_scorer_finds_nothing_on_a_blank_image():
    blank = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.uint8), (64, 64, 3))
    reading = read_shape(blank)
    assert reading.shape is reading.color is reading.position is None
    report = score_adherence([blank], [ShapeAttributes("circle", "red", "center")])
    assert report.color_adherence == report.shape_adherence == report.position_adherence == 0.0
