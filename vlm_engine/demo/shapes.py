"""Generated pictures of shapes, their canonical captions, and a parser back from captions.

A scene is one to three identical shapes (same kind, color and size) stacked in one column of a
plain background. The attribute sets are small and far apart so that a model of a few million
parameters learns them reliably:

- kind: circle, square, triangle (pointing up), star (five points); a square fills the same
  bounding box as a circle of its size, so its corners stand out;
- color: red, green, blue, yellow, purple (saturated fills);
- background: white, gray, pink, all light: every shape is darker than every background. With
  dark and light backgrounds mixed, a shape's pixels differ from the background with either sign,
  its kind is no longer a linear function of the pixels (a linear probe on one grid cell scores
  ~56% for three kinds, against 100% with light backgrounds), and training stalls for thousands
  of steps before the tower learns to undo the sign;
- position: the column the shapes stand in, left, center or right (thirds of the width);
- count: 1, 2 or 3; each shape takes its own row (thirds of the height) of the column, the rows
  drawn at random, so a single shape may be high, low or in the middle of its column.

Within a scene the shape size (60-85% of a grid cell) and each shape's offset from its cell's
centre are random; shapes keep clear of their cell's edges, so they never touch. The canonical
caption reads "two red circles on the left of a white background". Everything random comes from
the caller's ``random.Random``: one seed, one picture.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 170),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200), "pink": (255, 205, 215)}
POSITIONS = ("left", "center", "right")
COUNTS = (1, 2, 3)
ATTRIBUTES = ("kind", "color", "position", "count", "background")

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left of",
    "center": "in the middle of",
    "right": "on the right of",
}
MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION = 0.6, 0.85  # shape size over grid-cell size
OFFSET_FRACTION = 0.5  # of the room a shape has to move off its cell's centre, how much it uses
CELL_MARGIN = 0.05  # shapes keep this fraction of a cell from its edges (never touch)
STAR_INNER_RADIUS = 0.4  # inner over outer radius of the star's points


@dataclass(frozen=True)
class ShapeScene:
    """What a picture shows; the attributes a caption states."""

    kind: str
    color: str
    position: str
    count: int
    background: str

    def __post_init__(self) -> None:
        choices = (KINDS, COLORS, POSITIONS, COUNTS, BACKGROUNDS)
        for name, allowed in zip(ATTRIBUTES, choices, strict=True):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}"
                )


def random_scene(rng: random.Random) -> ShapeScene:
    """Each attribute drawn uniformly and independently."""
    return ShapeScene(
        kind=rng.choice(KINDS),
        color=rng.choice(list(COLORS)),
        position=rng.choice(POSITIONS),
        count=rng.choice(COUNTS),
        background=rng.choice(list(BACKGROUNDS)),
    )


def draw_scene(scene: ShapeScene, rng: random.Random, size: int = 96) -> Image.Image:
    """A ``size`` x ``size`` RGB picture of ``scene``; layout details come from ``rng``."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    radius = cell * rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION) / 2
    column = POSITIONS.index(scene.position)
    for row in sorted(rng.sample(range(3), scene.count)):
        # How far the centre may move and keep the shape inside its cell, a margin from the edge.
        slack = (cell / 2 - radius - CELL_MARGIN * cell) * OFFSET_FRACTION
        x = (column + 0.5) * cell + rng.uniform(-slack, slack)
        y = (row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, scene.kind, (x, y), radius, COLORS[scene.color])
    return image


def make_example(rng: random.Random, size: int = 96) -> tuple[Image.Image, ShapeScene]:
    """A random scene and its picture."""
    scene = random_scene(rng)
    return draw_scene(scene, rng, size), scene


def caption(scene: ShapeScene) -> str:
    """The canonical caption, e.g. "two red circles on the left of a white background"."""
    noun = scene.kind if scene.count == 1 else scene.kind + "s"
    position = POSITION_PHRASES[scene.position]
    return f"{COUNT_WORDS[scene.count]} {scene.color} {noun} {position} a {scene.background} background"


def scene_json(scene: ShapeScene) -> str:
    """The scene as the demo model's JSON answer, e.g. ``{"shape": "circle", "color": "red",
    "count": 2, "position": "left", "background": "white"}`` (``json.dumps`` spacing, which
    structured outputs write by default)."""
    return json.dumps(
        {
            "shape": scene.kind,
            "color": scene.color,
            "count": scene.count,
            "position": scene.position,
            "background": scene.background,
        }
    )


def scene_from_json(text: str) -> ShapeScene:
    """The scene a JSON answer states; ValueError if it does not parse or state one."""
    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"a JSON answer is an object, got {text!r}")
    try:
        return ShapeScene(
            values["shape"], values["color"], values["position"], values["count"],
            values["background"],
        )  # fmt: skip
    except KeyError as e:
        raise ValueError(f"the JSON answer has no {e.args[0]!r}: {text!r}") from None


@dataclass(frozen=True)
class ParsedCaption:
    """Attributes read from a caption; None where the caption names none or several."""

    kind: str | None
    color: str | None
    position: str | None
    count: int | None
    background: str | None
    canonical: bool  # the caption follows the canonical wording exactly

    def matches(self, scene: ShapeScene) -> dict[str, bool]:
        """Attribute name -> whether the caption got it right."""
        return {name: getattr(self, name) == getattr(scene, name) for name in ATTRIBUTES}


def parse_caption(text: str) -> ParsedCaption:
    """Read the attributes back from a caption (case and punctuation ignored).

    Lenient, for scoring: each attribute is found by its words wherever they stand, and is None
    when the caption names it not at all or more than once with different values. The count is
    the number word ("a", "one", "two", "three") before the first shape word; the background is
    the color word just before "background"; the shape color is a color word before that.
    """
    words = re.findall(r"[a-z]+", text.lower())
    end = words.index("background") if "background" in words else len(words)
    background = words[end - 1] if 0 < end < len(words) else None
    shape_words = words[: end - 1] if background else words
    nouns = [i for i, w in enumerate(shape_words) if _singular(w) in KINDS]
    before_noun = shape_words[: nouns[0]] if nouns else []
    scene = dict(
        kind=_single({_singular(shape_words[i]) for i in nouns}),
        color=_single(set(shape_words) & set(COLORS)),
        position=_single({_POSITION_WORDS[w] for w in shape_words if w in _POSITION_WORDS}),
        count=_single({_NUMBER_WORDS[w] for w in before_noun if w in _NUMBER_WORDS}),
        background=background if background in BACKGROUNDS else None,
    )
    complete = None not in scene.values()
    canonical = complete and caption(ShapeScene(**scene)) == text.strip()
    return ParsedCaption(**scene, canonical=canonical)


_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_POSITION_WORDS = {"left": "left", "middle": "center", "center": "center", "right": "right"}


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in KINDS else word


def _single(values: set) -> object:
    return next(iter(values)) if len(values) == 1 else None


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    center: tuple[float, float],
    radius: float,
    fill: tuple[int, int, int],
) -> None:
    x, y = center
    if kind == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif kind == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif kind == "triangle":
        draw.polygon(_regular_points(center, radius, 3, radius), fill=fill)
    else:
        draw.polygon(_regular_points(center, radius, 5, radius * STAR_INNER_RADIUS), fill=fill)


def _regular_points(
    center: tuple[float, float], outer: float, num_points: int, inner: float
) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (inner == outer) or star pointing up, around ``center``.

    For a star, the vertices alternate between the outer and the inner radius.
    """
    x, y = center
    if inner == outer:
        angles = [-math.pi / 2 + 2 * math.pi * i / num_points for i in range(num_points)]
        return [(x + outer * math.cos(a), y + outer * math.sin(a)) for a in angles]
    points = []
    for i in range(2 * num_points):
        r = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + math.pi * i / num_points
        points.append((x + r * math.cos(angle), y + r * math.sin(angle)))
    return points
