"""The built-in demo: a small Gemma3 vision-language model trained to caption pictures of shapes,
in words (``DEMO_PROMPT``) or as a JSON object of their attributes (``DEMO_JSON_PROMPT``).

``default_model_path()`` is the checkpoint that ships with the package; ``shapes`` draws the
pictures and reads captions back; ``training`` (``scripts/train_demo_model.py``) makes the model;
``evaluation`` scores it through the engine.
"""

from vlm_engine.demo.model import (
    DEMO_JSON_MAX_TOKENS,
    DEMO_JSON_PROMPT,
    DEMO_MAX_TOKENS,
    DEMO_PROMPT,
    default_model_path,
    demo_request,
    demo_schema,
)

__all__ = [
    "DEMO_JSON_MAX_TOKENS",
    "DEMO_JSON_PROMPT",
    "DEMO_MAX_TOKENS",
    "DEMO_PROMPT",
    "default_model_path",
    "demo_request",
    "demo_schema",
]
