"""Frontend <-> engine-core messages: round trips, zero-copy pixels, and malformed input."""

from __future__ import annotations

import pickle

import msgpack
import pytest
import torch

from vlm_engine.core.messages import (
    decode_outputs,
    decode_request,
    encode_outputs,
    encode_request,
    pack,
)
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.protocol import EngineCoreOutput, MessageError
from vlm_engine.vocab.request import MultiModalFeature, Request


def make_request() -> Request:
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    placeholder = ImagePlaceholder((ImageGroup(3, 4), ImageGroup(9, 4)))
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_k=3, stop=("x", "yz"), stop_token_ids=(5,), seed=11,
        logprobs=2,
    )  # fmt: skip
    return Request(
        "r-1", list(range(20)), params, frozenset({1, 106}),
        [MultiModalFeature("abc", placeholder, pixels)], priority=2, cache_salt="s",
        arrival_time=12.5,
    )  # fmt: skip


def test_request_round_trip_keeps_everything():
    request = make_request()
    frames = encode_request(request)
    assert (
        len(frames) == 2
        and bytes(frames[1]) == request.mm_features[0].pixel_values.numpy().tobytes()
    )
    decoded = decode_request([bytes(f) for f in frames])
    assert decoded.request_id == "r-1" and decoded.prompt_token_ids == list(range(20))
    assert decoded.sampling_params == request.sampling_params
    assert decoded.eos_token_ids == request.eos_token_ids
    assert (decoded.priority, decoded.cache_salt, decoded.arrival_time) == (2, "s", 12.5)
    feature = decoded.mm_features[0]
    assert feature.mm_hash == "abc" and feature.placeholder == request.mm_features[0].placeholder
    assert torch.equal(feature.pixel_values, request.mm_features[0].pixel_values)


def test_pixels_are_wrapped_without_a_copy():
    frames = encode_request(make_request())
    buffer = bytearray(frames[1])
    decoded = decode_request([frames[0], buffer])
    buffer[0] = (buffer[0] + 1) % 256  # the tensor sees the frame's memory
    assert int(decoded.mm_features[0].pixel_values.flatten()[0]) == buffer[0]


def test_outputs_round_trip():
    outputs = [
        EngineCoreOutput("a", [5], [[(5, -0.25, 1), (7, -1.5, 2)]], None, None, 3),
        EngineCoreOutput("b", [9], None, "stop", 9, 0),
    ]
    assert decode_outputs(encode_outputs(outputs)) == outputs


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xc1"],  # not msgpack
        [pack([1, 2])],  # not a map
        [pickle.dumps({"request_id": "x"})],  # a pickle is just bytes that do not decode
        [pack({"request_id": "x"})],  # fields missing
    ],
)
def test_malformed_requests_raise_message_error(frames):
    with pytest.raises(MessageError):
        decode_request(frames)


def test_mismatched_pixel_frames_raise_message_error():
    header, pixels = encode_request(make_request())
    with pytest.raises(MessageError, match="bytes for shape"):
        decode_request([header, bytes(pixels)[:-1]])
    with pytest.raises(MessageError):
        decode_request([header])  # the frame is missing
    meta = msgpack.unpackb(header)
    meta["sampling_params"]["evil"] = 1
    with pytest.raises(MessageError, match="unknown sampling fields"):
        decode_request([pack(meta), pixels])
