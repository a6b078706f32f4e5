"""Caption accuracy of a model on held-out pictures of shapes, through the engine.

Held-out pictures come from their own seed (``HELD_OUT_SEED``), a random stream training never
draws from: the attribute combinations are the same few hundred (4 kinds x 5 colors x 3 positions
x 3 counts x 3 backgrounds = 540), the pictures (sizes, rows, offsets) are new.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vlm_engine.demo.batches import IMAGE_SIZES
from vlm_engine.demo.model import (
    DEMO_JSON_MAX_TOKENS,
    DEMO_JSON_PROMPT,
    DEMO_MAX_TOKENS,
    demo_request,
    demo_schema,
)
from vlm_engine.demo.shapes import (
    ATTRIBUTES,
    ShapeScene,
    caption,
    make_example,
    parse_caption,
    scene_from_json,
    scene_json,
)
from vlm_engine.engine import Engine
from vlm_engine.sampling_params import SamplingParams

HELD_OUT_SEED = 20_250_731


@dataclass(frozen=True)
class CaptionScore:
    """How many captions got each attribute, every attribute, and the exact wording right."""

    num_images: int
    attribute_correct: dict[str, int]
    all_correct: int
    canonical: int
    mistakes: tuple[tuple[str, str], ...]  # (expected caption, model's caption), in order

    def accuracy(self, attribute: str) -> float:
        return self.attribute_correct[attribute] / self.num_images

    @property
    def all_correct_rate(self) -> float:
        return self.all_correct / self.num_images

    def summary(self) -> str:
        parts = [f"{name} {self.accuracy(name):.1%}" for name in ATTRIBUTES]
        return (
            f"{self.num_images} images: all attributes right {self.all_correct_rate:.1%} "
            f"({', '.join(parts)}); word for word {self.canonical / self.num_images:.1%}"
        )


def held_out_examples(
    num_images: int, seed: int = HELD_OUT_SEED
) -> list[tuple[Image.Image, ShapeScene]]:
    """Pictures drawn like the training ones (random size in ``IMAGE_SIZES``) from ``seed``."""
    rng = random.Random(seed)
    return [make_example(rng, rng.randint(*IMAGE_SIZES)) for _ in range(num_images)]


def caption_images(engine: Engine, images: Sequence[Image.Image]) -> list[str]:
    """The engine's greedy answer to the demo prompt for each image, batched."""
    params = SamplingParams(temperature=0, max_tokens=DEMO_MAX_TOKENS)
    outputs = engine.generate([demo_request(image) for image in images], params)
    return [out.text for out in outputs]


def json_answers(
    engine: Engine, images: Sequence[Image.Image], constrained: bool = True
) -> list[str]:
    """The engine's greedy JSON answer for each image, held to ``demo_schema()`` by structured
    outputs (or, with ``constrained=False``, as the model writes it)."""
    params = SamplingParams(
        temperature=0,
        max_tokens=DEMO_JSON_MAX_TOKENS,
        structured_outputs={"json": demo_schema()} if constrained else None,
    )
    requests = [demo_request(image, DEMO_JSON_PROMPT) for image in images]
    return [out.text for out in engine.generate(requests, params)]


def score_json(scenes: Sequence[ShapeScene], answers: Sequence[str]) -> CaptionScore:
    """Compare each JSON answer with its scene; one that does not parse gets nothing right."""
    if len(scenes) != len(answers) or not scenes:
        raise ValueError("need one answer per scene, and at least one scene")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    all_correct = canonical = 0
    mistakes = []
    for scene, text in zip(scenes, answers, strict=True):
        try:
            stated = scene_from_json(text)
            matches = {name: getattr(stated, name) == getattr(scene, name) for name in ATTRIBUTES}
        except ValueError:
            matches = dict.fromkeys(ATTRIBUTES, False)
        for name, right in matches.items():
            correct[name] += right
        all_correct += all(matches.values())
        canonical += text == scene_json(scene)
        if not all(matches.values()):
            mistakes.append((scene_json(scene), text))
    return CaptionScore(len(scenes), correct, all_correct, canonical, tuple(mistakes))


def score_captions(scenes: Sequence[ShapeScene], captions: Sequence[str]) -> CaptionScore:
    """Compare each caption, parsed leniently, with the scene it describes."""
    if len(scenes) != len(captions) or not scenes:
        raise ValueError("need one caption per scene, and at least one scene")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    all_correct = canonical = 0
    mistakes = []
    for scene, text in zip(scenes, captions, strict=True):
        parsed = parse_caption(text)
        matches = parsed.matches(scene)
        for name, right in matches.items():
            correct[name] += right
        all_correct += all(matches.values())
        canonical += parsed.canonical and all(matches.values())
        if not all(matches.values()):
            mistakes.append((caption(scene), text))
    return CaptionScore(len(scenes), correct, all_correct, canonical, tuple(mistakes))
