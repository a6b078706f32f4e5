"""Bad input gets a typed error for its request alone, and the engine goes on serving.

Each kind of bad input (issue 6) is tried on one engine: the error is the package's
`InvalidInputError` subclass for that problem (a `ValueError`; a `TypeError` too when the problem
is a type), its message names the request, the image and its source, and afterwards nothing is
left queued or held and the same engine serves a good batch with the same tokens as before.
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
import pytest
from PIL import Image

from vlm_engine import Engine, EngineConfig, SamplingParams
from vlm_engine.errors import (
    CorruptImageError,
    EmptyImageError,
    EmptyPromptError,
    ImageFileError,
    ImagePlaceholderError,
    ImageTooLargeError,
    ImageTypeError,
    InputTypeError,
    InvalidImageError,
    InvalidInputError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    MalformedPromptError,
    NotAnImageError,
    PromptTooLongError,
    PromptTypeError,
    RequestIdInUseError,
    SamplingParamsTypeError,
    TooManyImagesError,
)
from vlm_engine.testing import make_tiny_checkpoint

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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad_images")
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


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)
    return Engine(
        checkpoint,
        device="cpu",
        dtype="float32",
        block_size=8,
        max_model_len=MAX_MODEL_LEN,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_images_per_prompt=MAX_IMAGES,
    )


def good_prompts(files: Files) -> list:
    return [TEXT, {"prompt": "<start_of_image>Describe it.", "images": [str(files.good)]}]


@pytest.fixture(scope="module")
def reference(engine, files) -> list[list[int]]:
    """Tokens of the good batch, served before any bad input reached the engine."""
    return [o.token_ids for o in engine.generate(good_prompts(files), GREEDY)]


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


def assert_names(message: str, names: list) -> None:
    for name in names:
        if isinstance(name, re.Pattern):
            assert name.search(message), (name.pattern, message)
        else:
            assert name in message, (name, message)


def assert_nothing_held(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.output_processor.states
    assert engine.core.all_blocks_free() and engine.stats()["kv_cache"]["usage"] == 0.0


def assert_serves(engine: Engine, files: Files, reference: list[list[int]]) -> None:
    outs = engine.generate(good_prompts(files), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert_nothing_held(engine)


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_a_typed_error_and_the_engine_serves_on(engine, files, reference, case):
    error, build = CASES[case]
    prompt, params, names = build(files)
    counters = engine.stats()["requests"]
    with pytest.raises(error) as info:
        engine.generate(prompt, params)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidInputError)
    assert isinstance(info.value, TypeError) == issubclass(error, InputTypeError)
    message = str(info.value)
    assert message.startswith("prompts[0]: request 'req-")
    assert_names(message, names)
    after = engine.stats()["requests"]
    assert after["rejected"] == counters["rejected"] + 1
    assert after["requests"] == counters["requests"]  # nothing was queued
    assert_nothing_held(engine)
    assert_serves(engine, files, reference)


def test_every_kind_of_problem_has_its_own_class_and_a_case():
    tried = {error for error, _ in CASES.values()}
    for base, kinds in KINDS.items():
        assert all(issubclass(kind, base) for kind in kinds)
        assert set(kinds) <= tried


def test_add_request_and_stream_raise_the_same_errors(engine, files, reference):
    for error, build in CASES.values():
        prompt, params, names = build(files)
        with pytest.raises(error) as info:
            engine.add_request(prompt, params, request_id="mine")
        assert str(info.value).startswith("request 'mine': ")
        assert_names(str(info.value), names)
        prompt, params, names = build(files)  # a lazily opened image is consumed by one use
        with pytest.raises(error) as info:
            next(engine.stream(prompt, params))
        assert_names(str(info.value), names)
    assert_nothing_held(engine)
    assert_serves(engine, files, reference)


def test_wrong_request_arguments(engine, files, reference):
    for kwargs, names in [
        ({"priority": "high"}, "priority must be an int, got 'high'"),
        ({"cache_salt": 5}, "cache_salt must be a str or None, got 5"),
        ({"request_id": 7}, "request_id must be a str, got int"),
    ]:
        with pytest.raises(InputTypeError, match=names) as info:
            engine.add_request(TEXT, GREEDY, **kwargs)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    engine.add_request(TEXT, GREEDY, request_id="taken")
    with pytest.raises(RequestIdInUseError, match="request 'taken': .*already in use"):
        engine.add_request(TEXT, GREEDY, request_id="taken")
    engine.abort_request("taken")
    assert_nothing_held(engine)
    assert_serves(engine, files, reference)


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("temperature", -1.0, InvalidSamplingParamsError),
        ("top_p", 0.0, InvalidSamplingParamsError),
        ("max_tokens", 0, InvalidSamplingParamsError),
        ("presence_penalty", 3.0, InvalidSamplingParamsError),
        ("stop", [""], InvalidSamplingParamsError),
        ("max_tokens", "16", SamplingParamsTypeError),
        ("temperature", None, SamplingParamsTypeError),
        ("stop", [3], SamplingParamsTypeError),
    ],
)
def test_invalid_sampling_values_are_typed_errors(field, value, error):
    """Sampling values are checked where the caller builds them, before any engine sees them."""
    with pytest.raises(error, match=f"^{field} must be") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError) == (error is SamplingParamsTypeError)


def test_default_raises_the_first_bad_request_before_any_work(engine, files):
    steps = engine.core.num_steps
    generated = engine.stats()["requests"]["generated_tokens"]
    batch = [TEXT, "", one_image(str(files.not_an_image)), TEXT]
    with pytest.raises(EmptyPromptError, match=r"^prompts\[1\]: request 'req-\d+': empty prompt"):
        engine.generate(batch, GREEDY)
    assert engine.core.num_steps == steps
    assert engine.stats()["requests"]["generated_tokens"] == generated
    assert_nothing_held(engine)


def test_prompt_errors_come_before_any_image_is_decoded(engine):
    decoded = engine.stats()["processor_cache"]["decoded"]
    fresh = [png_bytes(random_image(100 + i)) for i in range(MAX_IMAGES + 1)]
    with pytest.raises(ImagePlaceholderError):
        engine.generate({"prompt": "<start_of_image>", "images": fresh[:2]}, GREEDY)
    with pytest.raises(TooManyImagesError):
        engine.generate({"prompt": "Compare.", "images": fresh}, GREEDY)
    with pytest.raises(SamplingParamsTypeError):
        engine.generate(one_image(fresh[0]), "greedy")
    assert engine.stats()["processor_cache"]["decoded"] == decoded


def test_on_error_return_completes_the_good_requests(engine, files):
    good = good_prompts(files) + [{"prompt": "What is this?", "images": [random_image(5)]}]
    expected = [o.token_ids for o in engine.generate(good, GREEDY)]
    batch, params, errors = [], [], {}
    for i, (error, build) in enumerate(CASES.values()):
        prompt, p, _ = build(files)
        errors[len(batch)] = error
        batch.append(prompt)
        params.append(p)
        if i < len(good):
            batch.append(good[i])
            params.append(GREEDY)
    outs = engine.generate(batch, params, on_error="return")
    assert len(outs) == len(batch) and len({o.request_id for o in outs}) == len(batch)
    for index, out in enumerate(outs):
        if index in errors:
            assert isinstance(out.error, errors[index]), (index, out.error)
            assert str(out.error).startswith(f"prompts[{index}]: request '{out.request_id}': ")
            assert out.finished and out.finish_reason == "error"
            assert out.text == "" and out.token_ids == []
        else:
            assert out.error is None and out.finish_reason == "length"
    assert [o.token_ids for o in outs if o.error is None] == expected
    assert_nothing_held(engine)


def test_on_error_return_in_a_stream(engine, files):
    (expected,) = engine.generate(TEXT, GREEDY)
    deltas = list(engine.stream([one_image(str(files.empty)), TEXT, ""], GREEDY, on_error="return"))
    errors = [d for d in deltas if d.error is not None]
    assert deltas[:2] == errors  # error outputs come before the first step
    assert [type(d.error) for d in errors] == [EmptyImageError, EmptyPromptError]
    assert all(d.finished and d.finish_reason == "error" for d in errors)
    assert "".join(d.text for d in deltas[2:]) == expected.text
    assert_nothing_held(engine)


def test_on_error_is_checked(engine):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'return', got 'skip'"):
        engine.generate(TEXT, GREEDY, on_error="skip")
    assert_nothing_held(engine)


def test_max_images_per_prompt_is_validated():
    assert EngineConfig(max_images_per_prompt=0).max_images_per_prompt == 0
    for value in (-1, 2.0, "3", True):
        with pytest.raises(ValueError, match="max_images_per_prompt must be an int >= 0"):
            EngineConfig(max_images_per_prompt=value)
    with pytest.raises(ValueError, match="max_image_pixels must be an int >= 1"):
        EngineConfig(max_image_pixels=0)


def test_text_only_checkpoint_rejects_images(tmp_path, files):
    engine = Engine(make_tiny_checkpoint(tmp_path, seed=2, text_only=True), device="cpu")
    with pytest.raises(TooManyImagesError, match=r"1 images, more than 0 \(.*text-only\)"):
        engine.generate(one_image(str(files.good)), GREEDY)
    (out,) = engine.generate(TEXT, GREEDY)
    assert len(out.token_ids) == 10
    assert_nothing_held(engine)
