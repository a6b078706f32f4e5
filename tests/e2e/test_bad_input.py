"""Bad input gets a typed error for its request alone, and the engine goes on serving.

Each kind of bad input (the catalogue is in bad_inputs.py) is tried on one engine: the
error is the package's `InvalidInputError` subclass for that problem (a `ValueError`; a
`TypeError` too when the problem is a type), its message names the request, the image and its
source, and afterwards nothing is left queued or held and the same engine serves a good batch
with the same tokens as before.
"""

from __future__ import annotations

import re

import pytest
from bad_inputs import (
    CASES,
    GREEDY,
    KINDS,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_MODEL_LEN,
    TEXT,
    Files,
    good_prompts,
    one_image,
    png_bytes,
    random_image,
    write_bad_images,
)

from vlm_engine import Engine, EngineConfig, SamplingParams
from vlm_engine.errors import (
    EmptyImageError,
    EmptyPromptError,
    ImagePlaceholderError,
    InputTypeError,
    InvalidInputError,
    InvalidSamplingParamsError,
    RequestIdInUseError,
    SamplingParamsTypeError,
    TooManyImagesError,
)
from vlm_engine.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return write_bad_images(tmp_path_factory.mktemp("bad_images"))


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


@pytest.fixture(scope="module")
def reference(engine, files) -> list[list[int]]:
    """Tokens of the good batch, served before any bad input reached the engine."""
    return [o.token_ids for o in engine.generate(good_prompts(files), GREEDY)]


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
    steps = engine.core.engine_core.num_steps
    generated = engine.stats()["requests"]["generated_tokens"]
    batch = [TEXT, "", one_image(str(files.not_an_image)), TEXT]
    with pytest.raises(EmptyPromptError, match=r"^prompts\[1\]: request 'req-\d+': empty prompt"):
        engine.generate(batch, GREEDY)
    assert engine.core.engine_core.num_steps == steps
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
