"""Identity of an image as the model will see it: a blake3 hash of pixels and settings.

Equal pixels give equal hashes whatever file format carried them; the processor settings that
change pixels and the model identity are part of the hash, so two models or two processor
configurations never share an entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from blake3 import blake3
from PIL import Image

from vlm_engine.vision.image_processor import ImageProcessorConfig

_DOMAIN = b"vlm_engine/image/v1"


def processor_key(config: ImageProcessorConfig, model_id: str) -> bytes:
    """The part of every image hash that depends on the model and processor, computed once."""
    settings = json.dumps(asdict(config), sort_keys=True, default=list)
    return _framed(_DOMAIN, model_id.encode(), settings.encode())


def image_mm_hash(image: Image.Image, key: bytes) -> str:
    # mode and size frame the raw pixel bytes so that equal bytes of different shapes differ;
    # palette images also need their palette and transparency to pin down the colors.
    header = f"{image.mode}:{image.width}x{image.height}".encode()
    palette = b""
    if image.mode in ("P", "PA"):
        palette = bytes(image.getpalette() or ()) + repr(image.info.get("transparency")).encode()
    hasher = blake3(_framed(key, header, palette))
    hasher.update(image.tobytes())
    return hasher.hexdigest()


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "little") + p for p in parts)
