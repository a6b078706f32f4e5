"""Chat messages: validation, image extraction, and rendering with the checkpoint's template.

Messages come in the usual form::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image", "image": pil_or_path_or_bytes},
                                  {"type": "text", "text": "What is this?"}]}]

Images are taken out in order of appearance; the template sees `{"type": "image"}` in their
place and renders the checkpoint's image placeholder (`<start_of_image>` for Gemma3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm_engine.errors import EmptyPromptError, MalformedPromptError, PromptTypeError

ROLES = ("system", "user", "assistant", "model")
_IMAGE_KEYS = ("image", "url", "path")


def split_messages(
    messages: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Any], list[str | None]]:
    """Validate messages; return template-ready messages, the image sources in order, and the
    caller's id for each image (an item's optional "uuid"), None where it gave none."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptTypeError(
            "messages must be a non-empty list of {'role', 'content'} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise EmptyPromptError("messages must be a non-empty list of {'role', 'content'} dicts")
    rendered, images, uuids = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PromptTypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise MalformedPromptError(f"messages[{i}]: unknown role {message['role']!r} ({ROLES})")
        content = message["content"]
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": content})
            continue
        items = [
            _split_item(item, f"messages[{i}].content[{j}]", images, uuids)
            for j, item in enumerate(_content_list(content, i))
        ]
        rendered.append({"role": message["role"], "content": items})
    return rendered, images, uuids


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """Apply the chat template shipped with the checkpoint's tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        raise MalformedPromptError("this checkpoint ships no chat template: pass a plain prompt")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raise_exception, e.g. roles that do not alternate
        raise MalformedPromptError(f"chat template rejected the messages: {e}") from e


def _content_list(content: Any, index: int) -> Sequence[Any]:
    if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
        return content
    raise PromptTypeError(
        f"messages[{index}].content must be a string or a list of items, "
        f"got {type(content).__name__}"
    )


def _split_item(
    item: Any, where: str, images: list[Any], uuids: list[str | None]
) -> dict[str, Any]:
    if not isinstance(item, dict) or "type" not in item:
        raise PromptTypeError(f"{where} must be a dict with a 'type'")
    if item["type"] == "text":
        if not isinstance(item.get("text"), str):
            raise PromptTypeError(f"{where}: a text item needs a string 'text'")
        return {"type": "text", "text": item["text"]}
    if item["type"] == "image":
        source = next((item[k] for k in _IMAGE_KEYS if item.get(k) is not None), None)
        if source is None:
            raise MalformedPromptError(f"{where}: an image item needs one of {_IMAGE_KEYS}")
        uuid = item.get("uuid")
        if uuid is not None and not isinstance(uuid, str):
            raise PromptTypeError(f"{where}: an image 'uuid' must be a string")
        images.append(source)
        uuids.append(uuid)
        return {"type": "image"}
    raise MalformedPromptError(f"{where}: unsupported item type {item['type']!r} ('text', 'image')")
