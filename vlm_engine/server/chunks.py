"""The OpenAI streams' wire format: server-sent events, and a chat chunk's JSON written directly.

`sse()` frames a payload as one event and `DONE` ends a stream. A chat chunk is
`chat_chunk_head()`, its choices' `chat_choice_json()` joined by commas, then `CHUNK_TAIL`.
"""

from __future__ import annotations

import json
from typing import Any


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def chat_choice(
    index: int,
    content: str,
    logprobs: dict | None = None,
    finish_reason: str | None = None,
    role: str | None = None,
) -> dict:
    """A `ChatChunkChoice` as its dump."""
    return {
        "index": index, "delta": {"role": role, "content": content}, "logprobs": logprobs,
        "finish_reason": finish_reason,
    }  # fmt: skip


# The chunks of a chat stream are formatted directly, one per delta: exactly `sse()` of the
# `ChatStream._chunk()` dump (same keys, order and separators), without building and encoding
# the dicts.
CHUNK_TAIL = '],"usage":null}\n\n'


def chat_chunk_head(response_id: str, created: int, model: str) -> str:
    """A chat chunk's event up to its choices."""
    return (
        f'data: {{"id":{_json(response_id)},"object":"chat.completion.chunk",'
        f'"created":{created},"model":{_json(model)},"choices":['
    )


def chat_choice_json(
    index: int, content: str, logprobs: dict | None, finish_reason: str | None
) -> str:
    """`chat_choice(index, content, logprobs, finish_reason)` as compact JSON."""
    return (
        f'{{"index":{index},"delta":{{"role":null,"content":{_json(content)}}},'
        f'"logprobs":{_json(logprobs)},"finish_reason":{_json(finish_reason)}}}'
    )


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return _encode_string(value)
    return json.dumps(value, separators=(",", ":"))


_encode_string = json.encoder.encode_basestring_ascii  # what json.dumps does with a str
