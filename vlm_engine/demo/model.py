"""The built-in demo model: where it ships, and the request it was trained to answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The one instruction the demo model was trained on; the chat turn is the image, then this text.
DEMO_PROMPT = "Describe the image."
DEMO_MAX_TOKENS = 24  # the longest caption is 13 tokens, then <end_of_turn>


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
