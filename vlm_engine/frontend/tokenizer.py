"""The checkpoint's tokenizer, with the chat template the checkpoint's processor files name."""

from __future__ import annotations

import json
import os
from typing import Any

from vlm_engine.frontend import processor_files

# The class transformers registers for Gemma3 checkpoints (gemma3 and gemma3_text).
GEMMA_TOKENIZER = "GemmaTokenizer"


def load_tokenizer(checkpoint_dir: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of the checkpoint, offline, as `AutoTokenizer` resolves it.

    A checkpoint whose tokenizer config names Gemma's tokenizer class loads that class directly:
    `AutoTokenizer` would pick the same class, but importing it loads transformers' model
    registry (and with it torch's compiler and triton) into the frontend. Other checkpoints go
    through `AutoTokenizer`. The chat template is the one `processor_files.chat_template` finds
    first, wherever the checkpoint keeps it (a tokenizer alone would miss a template kept only
    for the processor, in `chat_template.json`).
    """
    path = os.fspath(checkpoint_dir)
    if _named_class(path) == GEMMA_TOKENIZER:
        from transformers import GemmaTokenizer as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class
    tokenizer = tokenizer_class.from_pretrained(path, local_files_only=True)
    template = processor_files.chat_template(checkpoint_dir)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _named_class(path: str) -> str | None:
    """The tokenizer class tokenizer_config.json names, without a "Fast" suffix."""
    try:
        with open(os.path.join(path, processor_files.TOKENIZER_CONFIG), encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None  # AutoTokenizer reports what is wrong
    return name.removesuffix("Fast") if isinstance(name, str) else None
