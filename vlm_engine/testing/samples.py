"""Seeded sample inputs for tests and benchmarks: words about shapes, and noise images."""

from __future__ import annotations

import numpy as np
from PIL import Image

WORDS = (
    "the", "red", "circle", "sits", "left", "of", "a", "blue", "square", "while", "two",
    "green", "triangles", "wait", "above", "small", "large", "in", "corner", "center",
)  # fmt: skip


def random_words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)) if n else ""


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
