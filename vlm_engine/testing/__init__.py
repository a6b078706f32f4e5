"""Test support: tiny random-weight Gemma3 checkpoints and their offline tokenizer."""

from vlm_engine.testing.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TOKEN_IDS,
    TinyTokenIds,
    build_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TOKEN_IDS",
    "TinySpec",
    "TinyTokenIds",
    "build_tokenizer",
    "make_tiny_checkpoint",
]


def __getattr__(name: str) -> object:
    # Imported on first use, so that `python -m vlm_engine.testing.tiny_checkpoint` does not find
    # its own module already imported by this package (runpy warns about that).
    if name in ("TinySpec", "make_tiny_checkpoint"):
        from vlm_engine.testing import tiny_checkpoint

        return getattr(tiny_checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
