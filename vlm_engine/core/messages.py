"""What crosses the boundary between the frontend and an engine core in another process.

A message is a list of frames: its kind (vocab/protocol.py), a msgpack header with plain values
only (ints, floats, strings, lists, maps), then one raw frame per tensor (image pixels), which the
receiver wraps without a copy. Nothing is ever pickled: a malformed message fails to decode with
`MessageError` and can execute nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.protocol import EngineCoreOutput, MessageError
from vlm_engine.vocab.request import MultiModalFeature, Request

Frames = list[bytes | memoryview]

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack(frame: bytes | memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for bad input
        raise MessageError(f"undecodable header: {e}") from e
    if not isinstance(header, dict):
        raise MessageError("a header must be a map")
    return header


def encode_request(request: Request) -> Frames:
    """Header (ids, params, image layouts) + one raw frame of uint8 pixels per image."""
    features = [
        {
            "mm_hash": f.mm_hash,
            "groups": [[g.offset, g.length] for g in f.placeholder.groups],
            "shape": list(f.pixel_values.shape),
            "dtype": str(f.pixel_values.dtype).removeprefix("torch."),
        }
        for f in request.mm_features
    ]
    header = {
        "request_id": request.request_id,
        "prompt_token_ids": request.prompt_token_ids,
        "sampling_params": _params_to_map(request.sampling_params),
        "eos_token_ids": sorted(request.eos_token_ids),
        "priority": request.priority,
        "cache_salt": request.cache_salt,
        "arrival_time": request.arrival_time,
        "prefill_after": request.prefill_after,
        "features": features,
    }
    pixels = [
        memoryview(f.pixel_values.contiguous().numpy()).cast("B") for f in request.mm_features
    ]
    return [pack(header), *pixels]


def decode_request(frames: Sequence[bytes | memoryview]) -> Request:
    header = unpack(frames[0])
    try:
        features = [
            _decode_feature(meta, frame)
            for meta, frame in zip(header["features"], frames[1:], strict=True)
        ]
        return Request(
            request_id=str(header["request_id"]),
            prompt_token_ids=[int(t) for t in header["prompt_token_ids"]],
            sampling_params=_params_from_map(header["sampling_params"]),
            eos_token_ids=frozenset(int(t) for t in header["eos_token_ids"]),
            mm_features=features,
            priority=int(header["priority"]),
            cache_salt=header["cache_salt"],
            arrival_time=float(header["arrival_time"]),
            prefill_after=_optional_str(header["prefill_after"]),
        )
    except MessageError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise MessageError(f"malformed request message: {e!r}") from e


def encode_outputs(outputs: Sequence[EngineCoreOutput]) -> bytes:
    rows = [
        [o.request_id, o.new_token_ids, o.new_logprobs, o.finish_reason, o.stop_reason,
         o.num_cached_tokens]
        for o in outputs
    ]  # fmt: skip
    return pack({"outputs": rows})


def decode_outputs(frame: bytes | memoryview) -> list[EngineCoreOutput]:
    try:
        return [
            EngineCoreOutput(request_id, tokens, _logprobs(logprobs), finish, stop, cached)
            for request_id, tokens, logprobs, finish, stop, cached in unpack(frame)["outputs"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise MessageError(f"malformed outputs message: {e!r}") from e


def _logprobs(steps: list | None) -> list[list[tuple[int, float, int]]] | None:
    # msgpack gives the (token, logprob, rank) entries back as lists
    return None if steps is None else [[tuple(entry) for entry in step] for step in steps]


def _decode_feature(meta: dict[str, Any], frame: bytes | memoryview) -> MultiModalFeature:
    if meta["dtype"] != "uint8":
        raise MessageError(f"pixels must be uint8, got {meta['dtype']!r}")
    shape = [int(n) for n in meta["shape"]]
    if len(frame) != int(np.prod(shape)) or not shape:
        raise MessageError(f"pixel frame of {len(frame)} bytes for shape {shape}")
    groups = tuple(ImageGroup(int(offset), int(length)) for offset, length in meta["groups"])
    if not groups:
        raise MessageError("an image needs at least one placeholder group")
    with warnings.catch_warnings():  # a received frame is read-only; pixels are only read
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.frombuffer(frame, dtype=torch.uint8).reshape(shape)  # no copy
    return MultiModalFeature(str(meta["mm_hash"]), ImagePlaceholder(groups), pixels)


def _params_to_map(params: SamplingParams) -> dict[str, Any]:
    values = {name: getattr(params, name) for name in _PARAM_FIELDS}
    if params.structured_outputs is not None:
        values["structured_outputs"] = params.structured_outputs.to_mapping()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _params_from_map(values: dict[str, Any]) -> SamplingParams:
    unknown = set(values) - _PARAM_FIELDS
    if unknown:
        raise MessageError(f"unknown sampling fields {sorted(unknown)}")
    tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
    return SamplingParams(**{**values, **tuples})  # structured_outputs arrives as a map


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MessageError(f"expected a string or nothing, got {type(value).__name__}")
    return value
