"""A catalogue of bad input, one entry per kind of problem, for tests/e2e/test_bad_input.py.

Each entry builds a prompt (with real files: a text file named .png, a truncated PNG, a zero-byte
file, a PNG header that declares huge dimensions...), names the error it must raise, and lists
what the error message must name.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_engine import SamplingParams
from vlm_engine.errors import (
    CorruptImageError,
    EmptyImageError,
    EmptyPromptError,
    ImageFileError,
    ImagePlaceholderError,
    ImageTooLargeError,
    ImageTypeError,
    InvalidImageError,
    InvalidInputError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    MalformedPromptError,
    NotAnImageError,
    PromptTooLongError,
    PromptTypeError,
    SamplingParamsTypeError,
    TooManyImagesError,
)

GREEDY = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)
TEXT = "the red circle sits left of a blue square while two green triangles wait"
MAX_MODEL_LEN = 256
MAX_IMAGE_PIXELS = 1_000_000
MAX_IMAGES = 3


def random_image(seed: int, size: tuple[int, int] = (56, 40)) -> Image.Image:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and that carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


@dataclass(frozen=True)
class Files:
    """Real files (and bytes) of each kind of bad image."""

    good: Path  # a valid PNG
    truncated: Path  # the first half of a PNG
    truncated_bytes: bytes
    corrupt_bytes: bytes  # a PNG with zeros written over its middle
    not_an_image: Path  # a text file named .png
    empty: Path  # zero bytes
    bomb: Path  # header declares 5000 x 5000 (over max_image_pixels)
    huge: Path  # header declares 100000 x 100000 (over PIL's own bomb limit)
    missing: Path
    directory: Path


def write_bad_images(root: Path) -> Files:
    """Write the bad image files into `root`."""
    data = png_bytes(random_image(11))
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    paths = {
        "good": data,
        "truncated": data[: len(data) // 2],
        "not_an_image": b"a caption file, not a picture\n",
        "empty": b"",
        "bomb": png_header(5000, 5000),
        "huge": png_header(100_000, 100_000),
    }
    for name, content in paths.items():
        (root / f"{name}.png").write_bytes(content)
    (root / "folder.png").mkdir()
    return Files(
        good=root / "good.png",
        truncated=root / "truncated.png",
        truncated_bytes=data[: len(data) // 3],
        corrupt_bytes=bytes(corrupt),
        not_an_image=root / "not_an_image.png",
        empty=root / "empty.png",
        bomb=root / "bomb.png",
        huge=root / "huge.png",
        missing=root / "missing.png",
        directory=root / "folder.png",
    )


def good_prompts(files: Files) -> list:
    return [TEXT, {"prompt": "<start_of_image>Describe it.", "images": [str(files.good)]}]


def one_image(source) -> dict:
    return {"prompt": "<start_of_image>What is shown?", "images": [source]}


def lazily_opened(path: Path) -> Image.Image:
    """A PIL image whose pixels PIL has not read yet (they are read, and fail, on first use)."""
    return Image.open(path)


# Each case: (error, build(files) -> (prompt, sampling params, what the message must name)).
# A name is a substring, or a compiled pattern to search for.
Build = Callable[[Files], tuple[object, object, list]]
CASES: dict[str, tuple[type[InvalidInputError], Build]] = {
    # corrupt or truncated image data
    "truncated-png-file": (
        CorruptImageError,
        lambda f: (one_image(str(f.truncated)), GREEDY, [str(f.truncated), "truncated"]),
    ),
    "truncated-png-bytes": (
        CorruptImageError,
        lambda f: (
            one_image(f.truncated_bytes),
            GREEDY,
            [f"bytes ({len(f.truncated_bytes)} bytes)", "truncated"],
        ),
    ),
    "corrupt-png-bytes": (
        CorruptImageError,
        lambda f: (one_image(f.corrupt_bytes), GREEDY, [f"bytes ({len(f.corrupt_bytes)} bytes)"]),
    ),
    "truncated-lazy-pil-image": (
        CorruptImageError,
        lambda f: (
            one_image(lazily_opened(f.truncated)),
            GREEDY,
            ["PIL image (56x40", "truncated"],
        ),
    ),
    # a file that is not an image
    "text-file-named-png": (
        NotAnImageError,
        lambda f: (one_image(f.not_an_image), GREEDY, [str(f.not_an_image), "not an image"]),
    ),
    "missing-file": (
        ImageFileError,
        lambda f: (one_image(str(f.missing)), GREEDY, [str(f.missing), "not found"]),
    ),
    "directory": (
        ImageFileError,
        lambda f: (one_image(str(f.directory)), GREEDY, [str(f.directory), "cannot read"]),
    ),
    # zero-size images
    "zero-byte-file": (
        EmptyImageError,
        lambda f: (one_image(str(f.empty)), GREEDY, [str(f.empty), "0 bytes"]),
    ),
    "zero-bytes": (EmptyImageError, lambda f: (one_image(b""), GREEDY, ["0 bytes"])),
    "zero-size-pil-image": (
        EmptyImageError,
        lambda f: (one_image(Image.new("RGB", (0, 0))), GREEDY, ["zero-size image (0x0)"]),
    ),
    # decompression bombs
    "over-max-image-pixels": (
        ImageTooLargeError,
        lambda f: (
            one_image(str(f.bomb)),
            GREEDY,
            [str(f.bomb), f"5000x5000 = 25000000 pixels, more than max_pixels={MAX_IMAGE_PIXELS}"],
        ),
    ),
    "over-pil-bomb-limit": (
        ImageTooLargeError,
        lambda f: (one_image(f.huge), GREEDY, [str(f.huge), "decompression-bomb"]),
    ),
    # more images than placeholders, or than max_images_per_prompt
    "more-images-than-placeholders": (
        ImagePlaceholderError,
        lambda f: (
            {"prompt": "<start_of_image> and <start_of_image>?", "images": [str(f.good)] * 3},
            GREEDY,
            ["2 '<start_of_image>' placeholders for 3 images"],
        ),
    ),
    "fewer-images-than-placeholders": (
        ImagePlaceholderError,
        lambda f: (
            {"prompt": "<start_of_image><start_of_image>", "images": [str(f.good)]},
            GREEDY,
            ["2 '<start_of_image>' placeholders for 1 images"],
        ),
    ),
    "more-images-than-max-images-per-prompt": (
        TooManyImagesError,
        lambda f: (
            {"prompt": "Compare them.", "images": [str(f.good)] * (MAX_IMAGES + 1)},
            GREEDY,
            [f"{MAX_IMAGES + 1} images, more than {MAX_IMAGES} (max_images_per_prompt)"],
        ),
    ),
    # a prompt longer than max_model_len
    "prompt-over-max-model-len": (
        PromptTooLongError,
        lambda f: (
            " ".join(["word"] * MAX_MODEL_LEN),
            GREEDY,
            [re.compile(rf"prompt has \d{{3,}} tokens, max_model_len is {MAX_MODEL_LEN}")],
        ),
    ),
    # empty prompts
    "empty-string": (EmptyPromptError, lambda f: ("", GREEDY, ["empty prompt ''"])),
    "whitespace-only": (EmptyPromptError, lambda f: (" \n\t", GREEDY, ["empty prompt"])),
    "empty-prompt-dict": (
        EmptyPromptError,
        lambda f: ({"prompt": "", "images": []}, GREEDY, ["empty prompt ''"]),
    ),
    "no-chat-messages": (EmptyPromptError, lambda f: ({"messages": []}, GREEDY, ["non-empty"])),
    # invalid sampling values (for this model; construction checks the rest, see below)
    "stop-token-outside-vocabulary": (
        InvalidSamplingParamsError,
        lambda f: (
            TEXT,
            SamplingParams(max_tokens=4, stop_token_ids=[10**7]),
            ["stop_token_ids [10000000]", "vocab_size="],
        ),
    ),
    # wrong types
    "prompt-is-an-int": (PromptTypeError, lambda f: (42, GREEDY, ["got int"])),
    "prompt-is-bytes": (PromptTypeError, lambda f: (b"Describe.", GREEDY, ["got bytes"])),
    "prompt-text-not-a-str": (
        PromptTypeError,
        lambda f: ({"prompt": ["Describe."]}, GREEDY, ["'prompt' must be a str, got list"]),
    ),
    "unknown-prompt-key": (
        PromptTypeError,
        lambda f: ({"prompt": "x", "imgs": [str(f.good)]}, GREEDY, ["'imgs'"]),
    ),
    "messages-not-a-list": (PromptTypeError, lambda f: ({"messages": "hi"}, GREEDY, ["got str"])),
    "message-content-not-a-list": (
        PromptTypeError,
        lambda f: (
            {"messages": [{"role": "user", "content": 5}]},
            GREEDY,
            ["messages[0].content", "got int"],
        ),
    ),
    "image-uuids-not-a-list": (
        PromptTypeError,
        lambda f: (
            {"prompt": "x", "images": [str(f.good)], "image_uuids": 7},
            GREEDY,
            ["image_uuids must be a list", "got 7"],
        ),
    ),
    "image-of-unsupported-type": (
        ImageTypeError,
        lambda f: (
            {"prompt": "x", "images": [str(f.good), 3.5]},
            GREEDY,
            ["image 1", "unsupported image input type float"],
        ),
    ),
    "sampling-params-not-sampling-params": (
        SamplingParamsTypeError,
        lambda f: (TEXT, {"temperature": 0}, ["must be a SamplingParams, got dict"]),
    ),
    # right types, unusable content
    "unknown-chat-role": (
        MalformedPromptError,
        lambda f: ({"messages": [{"role": "robot", "content": "hi"}]}, GREEDY, ["'robot'"]),
    ),
    "reserved-image-token-in-text": (
        MalformedPromptError,
        lambda f: ("sneaky <image_soft_token>", GREEDY, ["reserved token '<image_soft_token>'"]),
    ),
}
KINDS = {
    InvalidImageError: (
        CorruptImageError,
        NotAnImageError,
        ImageFileError,
        EmptyImageError,
        ImageTooLargeError,
        ImageTypeError,
    ),
    InvalidPromptError: (
        ImagePlaceholderError,
        TooManyImagesError,
        PromptTooLongError,
        EmptyPromptError,
        PromptTypeError,
        MalformedPromptError,
    ),
}
