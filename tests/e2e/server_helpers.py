"""Helpers of the server tests: demo pictures as data URLs, chat messages, metrics."""

from __future__ import annotations

import base64
import io
import random
import re
import time

import httpx

from vlm_engine.demo.model import DEMO_PROMPT
from vlm_engine.demo.shapes import caption, make_example

MODEL = "demo"


def picture(seed: int) -> tuple[str, str]:
    """A demo picture as a data: URL, and its true caption."""
    image, scene = make_example(random.Random(seed))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), caption(scene)


def chat(url: str, text: str = DEMO_PROMPT) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def wait_for_idle(server, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "vlm_requests_running") == 0 and metric(text, "vlm_requests_waiting") == 0:
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.2)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))
