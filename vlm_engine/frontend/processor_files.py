"""A checkpoint's processor files, in every layout transformers writes or has written.

Where each setting is read from; the first place that has it wins:

| setting | places, in order |
|---|---|
| image processor settings | `processor_config.json` → `"image_processor"` (transformers 5), `preprocessor_config.json` (earlier releases and the Hub's Gemma3 repositories) |
| `image_seq_length` | `processor_config.json` (top level), the image processor settings |
| chat template | `processor_config.json` → `"chat_template"`, `chat_template.json` (transformers 4.4x), `chat_template.jinja`, `tokenizer_config.json` → `"chat_template"` |

The image processor order is transformers' own. The chat template order is its processor's,
then its tokenizer's, so a multimodal checkpoint renders chats as `Gemma3Processor` does. A named
template set (a list or dict of templates) gives its `"default"` one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlm_engine.errors import ConfigError

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

PathLike = str | os.PathLike[str]


def image_processor_settings(checkpoint_dir: PathLike) -> tuple[dict[str, Any], Path]:
    """The image processor's settings and the file they came from; `ConfigError` when the
    checkpoint has none."""
    root = Path(checkpoint_dir)
    nested = _read_object(root / PROCESSOR_CONFIG)
    if nested is not None and "image_processor" in nested:
        settings = nested["image_processor"]
        if not isinstance(settings, dict):
            raise ConfigError(f"{root / PROCESSOR_CONFIG}: 'image_processor' must be an object")
        return settings, root / PROCESSOR_CONFIG
    legacy = _read_object(root / PREPROCESSOR_CONFIG)
    if legacy is None:
        raise ConfigError(
            f"{root} has no image processor: {PREPROCESSOR_CONFIG} not found and "
            f"{PROCESSOR_CONFIG} holds no 'image_processor'"
        )
    return legacy, root / PREPROCESSOR_CONFIG


def image_seq_length(checkpoint_dir: PathLike) -> int | None:
    """Image tokens per image as the processor files state them, or None where none does."""
    root = Path(checkpoint_dir)
    processor = _read_object(root / PROCESSOR_CONFIG) or {}
    value = processor.get("image_seq_length")
    if value is None:
        value = image_processor_settings(root)[0].get("image_seq_length")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{root}: image_seq_length must be a positive int, got {value!r}")
    return value


def check_image_seq_length(checkpoint_dir: PathLike, mm_tokens_per_image: int) -> None:
    """`ConfigError` when the processor files expand an image into another number of tokens
    than the model's config.json: transformers would then feed the model mismatched images."""
    stated = image_seq_length(checkpoint_dir)
    if stated is not None and stated != mm_tokens_per_image:
        raise ConfigError(
            f"{checkpoint_dir}: the processor's image_seq_length ({stated}) differs from "
            f"config.json's mm_tokens_per_image ({mm_tokens_per_image})"
        )


def chat_template(checkpoint_dir: PathLike) -> str | None:
    """The checkpoint's chat template, or None where it ships none."""
    root = Path(checkpoint_dir)
    candidates = (
        (root / PROCESSOR_CONFIG, "chat_template"),
        (root / CHAT_TEMPLATE_JSON, "chat_template"),
        (root / CHAT_TEMPLATE_JINJA, None),
        (root / TOKENIZER_CONFIG, "chat_template"),
    )
    for path, key in candidates:
        if key is None:
            template = _read_text(path)
        else:
            template = _default_template((_read_object(path) or {}).get(key), path)
        if template:
            return template
    return None


def _default_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # tokenizer_config.json: [{"name": ..., "template": ...}]
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        template = value.get("default")
        if template is None or isinstance(template, str):
            return template
    raise ConfigError(f"{path}: 'chat_template' must be a string or named templates")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def _read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when the file does not exist."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
