"""The chunks the server builds by hand are exactly its response models' dumps."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")

from vlm_engine.server import protocol as p  # noqa: E402
from vlm_engine.server.chunks import (  # noqa: E402
    CHUNK_TAIL,
    chat_choice,
    chat_choice_json,
    chat_chunk_head,
    sse,
)


def test_hand_builtchat_choices_equal_the_models_dump():
    built = chat_choice(2, "hi", None, "stop")
    model = p.ChatChunkChoice(index=2, delta=p.ChatDelta(content="hi"), finish_reason="stop")
    assert built == model.model_dump()
    role = p.ChatChunkChoice(index=0, delta=p.ChatDelta(role="assistant", content=""))
    assert chat_choice(0, "", role="assistant") == role.model_dump()


@pytest.mark.parametrize(
    "content, logprobs, finish_reason",
    [
        (" a word", None, None),
        ('quotes " and \\ back\nslash, é, 日本, \u2028, \x01', None, "length"),
        ("", None, "stop"),
        (
            "a",
            {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]},
            None,
        ),
    ],
)
def test_formatted_chat_chunks_equal_the_encoded_dump(content, logprobs, finish_reason):
    dump = {
        "id": "chatcmpl-0f", "object": "chat.completion.chunk", "created": 1733, "model": "m/é",
        "choices": [chat_choice(3, content, logprobs, finish_reason)], "usage": None,
    }  # fmt: skip
    formatted = (
        chat_chunk_head("chatcmpl-0f", 1733, "m/é")
        + chat_choice_json(3, content, logprobs, finish_reason)
        + CHUNK_TAIL
    )
    assert formatted == sse(dump)
    chunk = p.ChatCompletionChunk.model_validate_json(formatted.removeprefix("data: "))
    assert chunk.choices[0].delta.content == content
