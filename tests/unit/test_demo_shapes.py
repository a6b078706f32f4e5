"""The demo's picture generator, captions and caption parser."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from vlm_engine.demo.evaluation import score_captions
from vlm_engine.demo.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    COUNTS,
    KINDS,
    POSITIONS,
    ShapeScene,
    caption,
    draw_scene,
    make_example,
    parse_caption,
    random_scene,
)

ALL_SCENES = [
    ShapeScene(*values)
    for values in itertools.product(KINDS, COLORS, POSITIONS, COUNTS, BACKGROUNDS)
]


def test_every_caption_parses_back_to_its_scene():
    captions = {caption(scene) for scene in ALL_SCENES}
    assert len(captions) == len(ALL_SCENES) == 540
    for scene in ALL_SCENES:
        parsed = parse_caption(caption(scene))
        assert parsed.canonical
        assert all(parsed.matches(scene).values()), (caption(scene), parsed)


def test_caption_wording():
    scene = ShapeScene("circle", "red", "left", 2, "white")
    assert caption(scene) == "two red circles on the left of a white background"
    single = ShapeScene("star", "yellow", "center", 1, "pink")
    assert caption(single) == "a yellow star in the middle of a pink background"


def test_parser_is_lenient_about_wording_but_not_about_contradictions():
    parsed = parse_caption("Two red circles, on the LEFT.")
    assert (parsed.kind, parsed.color, parsed.count, parsed.position) == (
        "circle",
        "red",
        2,
        "left",
    )
    assert parsed.background is None and not parsed.canonical
    mixed = parse_caption("a red circle and a blue square on the right of a gray background")
    assert mixed.kind is None and mixed.color is None
    assert mixed.position == "right" and mixed.background == "gray" and mixed.count == 1
    assert parse_caption("").count is None
    # Right attributes in other words are right, but not canonical.
    near = parse_caption("one red circle on the left of a white background")
    assert all(near.matches(ShapeScene("circle", "red", "left", 1, "white")).values())
    assert not near.canonical


def test_scene_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="kind"):
        ShapeScene("hexagon", "red", "left", 1, "white")
    with pytest.raises(ValueError, match="count"):
        ShapeScene("circle", "red", "left", 4, "white")
    with pytest.raises(ValueError, match="background"):
        ShapeScene("circle", "red", "left", 1, "red")  # shape colors are never backgrounds


def test_every_shape_is_darker_than_every_background():
    """The property that keeps a shape's kind a linear function of its pixels (shapes.py)."""
    for color in COLORS.values():
        for background in BACKGROUNDS.values():
            assert sum(color) < sum(background) - 100


def test_same_seed_same_picture():
    image_a, scene_a = make_example(random.Random(7), 120)
    image_b, scene_b = make_example(random.Random(7), 120)
    assert scene_a == scene_b and image_a.tobytes() == image_b.tobytes()
    others = [make_example(random.Random(seed), 120)[0].tobytes() for seed in range(8, 12)]
    assert image_a.tobytes() not in others


@pytest.mark.parametrize("seed", range(40))
def test_picture_shows_its_scene(seed):
    """Shape-colored pixels lie only in the stated column and fill exactly `count` rows; the
    rest is the background color."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    size = rng.randint(96, 256)
    pixels = np.asarray(draw_scene(scene, rng, size)).astype(int)
    assert pixels.shape == (size, size, 3)
    shape_mask = (pixels == COLORS[scene.color]).all(-1)
    background_mask = (pixels == BACKGROUNDS[scene.background]).all(-1)
    assert (shape_mask | background_mask).all()
    columns = {int(x * 3 // size) for x in np.nonzero(shape_mask.any(0))[0]}
    assert columns == {POSITIONS.index(scene.position)}
    rows = {int(y * 3 // size) for y in np.nonzero(shape_mask.any(1))[0]}
    assert len(rows) == scene.count
    assert shape_mask.sum() > scene.count * (size / 3 * 0.2) ** 2  # each shape clearly visible


def test_attributes_are_drawn_uniformly():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    for name, values in zip(
        ATTRIBUTES, (KINDS, COLORS, POSITIONS, COUNTS, BACKGROUNDS), strict=True
    ):
        counts = [sum(getattr(s, name) == v for s in scenes) for v in values]
        expected = len(scenes) / len(values)
        assert all(abs(c - expected) < 0.2 * expected for c in counts), (name, counts)


def test_score_counts_each_attribute():
    scenes = [
        ShapeScene("circle", "red", "left", 2, "white"),
        ShapeScene("star", "blue", "right", 3, "gray"),
        ShapeScene("square", "green", "center", 1, "pink"),
    ]
    captions = [
        "two red circles on the left of a white background",
        "three blue stars on the left of a gray background",  # position wrong
        "a green triangle in the middle of a white background",  # kind and background wrong
    ]
    score = score_captions(scenes, captions)
    assert score.all_correct == 1 and score.canonical == 1
    assert score.attribute_correct == {
        "kind": 2,
        "color": 3,
        "position": 2,
        "count": 3,
        "background": 2,
    }
    assert [expected for expected, _ in score.mistakes] == [caption(s) for s in scenes[1:]]
    assert "all attributes right 33.3%" in score.summary()
