"""Draw the sample pictures in examples/images with the demo model's scene generator.

    .venv/bin/python scripts/make_example_images.py [--out examples/images]

Each file is named after its scene (``two_red_circles_left_white_background.png``), so a reader,
or a test, can tell the true caption from the name.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from vlm_engine.demo.shapes import COUNT_WORDS, ShapeScene, draw_scene

EXAMPLES = (
    ShapeScene("circle", "red", "left", 2, "white"),
    ShapeScene("square", "blue", "center", 1, "gray"),
    ShapeScene("triangle", "green", "right", 3, "pink"),
    ShapeScene("star", "purple", "center", 2, "white"),
    ShapeScene("circle", "yellow", "right", 1, "gray"),
    ShapeScene("star", "red", "left", 3, "pink"),
)
SIZE = 224
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "images"


def file_name(scene: ShapeScene) -> str:
    noun = scene.kind if scene.count == 1 else scene.kind + "s"
    words = (COUNT_WORDS[scene.count], scene.color, noun, scene.position, scene.background)
    return "_".join(words) + "_background.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(EXAMPLES):
        path = args.out / file_name(scene)
        draw_scene(scene, random.Random(index), SIZE).save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
