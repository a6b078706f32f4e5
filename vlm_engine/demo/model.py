"""The built-in demo model: where it ships, and the request it was trained to answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The instructions the demo model was trained on; the chat turn is the image, then this text.
DEMO_PROMPT = "Describe the image."  # answered with a caption
DEMO_JSON_PROMPT = "Describe the image as JSON."  # answered with DEMO_SCHEMA's object
DEMO_MAX_TOKENS = 24  # the longest caption is 13 tokens, then <end_of_turn>
DEMO_JSON_MAX_TOKENS = 64  # the longest JSON answer is 55 tokens, then <end_of_turn>


def demo_schema() -> dict[str, Any]:
    """The JSON schema of the demo model's JSON answers: every attribute of a picture, in the
    order the model writes them (``shapes.scene_json``)."""
    from vlm_engine.demo.shapes import BACKGROUNDS, COLORS, COUNTS, KINDS, POSITIONS

    return {
        "type": "object",
        "properties": {
            "shape": {"enum": list(KINDS)},
            "color": {"enum": list(COLORS)},
            "count": {"type": "integer", "minimum": min(COUNTS), "maximum": max(COUNTS)},
            "position": {"enum": list(POSITIONS)},
            "background": {"enum": list(BACKGROUNDS)},
        },
        "required": ["shape", "color", "count", "position", "background"],
        "additionalProperties": False,
    }


def default_model_path() -> Path:
    """The trained demo checkpoint that ships inside the package (HF layout, a few MB).

    Raises FileNotFoundError, naming the script that makes it, when the files are missing.
    """
    path = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {path}; "
            "run `python scripts/train_demo_model.py` in the repository to make it"
        )
    return path


def demo_request(image: Any, prompt: str = DEMO_PROMPT) -> dict[str, Any]:
    """A chat request for the engine: one user turn with ``image`` (path, bytes or PIL image)
    followed by ``prompt``, as the demo model saw it in training."""
    content = [{"type": "image", "image": image}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}]}
