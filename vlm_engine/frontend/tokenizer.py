"""The checkpoint's tokenizer, with the chat template the checkpoint's processor files name."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer

from vlm_engine.vision import processor_files


def load_tokenizer(checkpoint_dir: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer of the checkpoint, offline. Its chat template is the one
    `processor_files.chat_template` finds first, wherever the checkpoint keeps it (a tokenizer
    alone would miss a template kept only for the processor, in `chat_template.json`)."""
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(checkpoint_dir), local_files_only=True)
    template = processor_files.chat_template(checkpoint_dir)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
