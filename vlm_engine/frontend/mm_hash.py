"""Identity of an image as the model will see it: a blake3 hash of pixels and settings.

Equal pixels give equal hashes whatever file format carried them (PNG, BMP, TIFF, lossless
WebP); the processor settings that change pixels, the revision of the preprocessing and the model
id are part of every hash, so two models, two processor configurations or two engine releases
that preprocess differently never share an entry. A caller's own image id
(``image_uuid``) stands in for the pixels when given.

Every hash input is framed: a type tag first, then each part behind its 8-byte little-endian
length, so two different inputs never frame to the same bytes. The hashes are the same in every
process (no Python ``hash()``, no pickle).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import asdict

from blake3 import blake3
from PIL import Image

from vlm_engine.errors import ImageTypeError, InvalidImageError
from vlm_engine.frontend.image_io import (
    ImageSource,
    decode_image_bytes,
    load_image,
    read_image_file,
)
from vlm_engine.frontend.image_processor import PREPROCESSING_REVISION, ImageProcessorConfig

_DOMAIN = b"vlm_engine/image/v2"
_PIXELS_TAG = b"pixels"
_UUID_TAG = b"uuid"


def processor_key(config: ImageProcessorConfig, model_id: str) -> bytes:
    """The part of every image hash that depends on the model and processor, computed once:
    the model id, the processor settings and the revision of the preprocessing itself."""
    settings = json.dumps(asdict(config), sort_keys=True, default=list)
    revision = str(PREPROCESSING_REVISION).encode()
    return _framed(_DOMAIN, model_id.encode(), settings.encode(), revision)


def image_mm_hash(image: Image.Image, key: bytes) -> str:
    """Hash of the pixels of ``image`` exactly as given (no orientation, no conversion).

    Mode and size frame the raw pixel bytes, so equal bytes of different shapes differ; palette
    images add their palette (in its own raw mode) to pin down the colors, and any transparency
    entry is included because converting to RGBA honours it.
    """
    palette_mode, palette = _palette(image)
    hasher = blake3(
        _framed(
            _PIXELS_TAG,
            key,
            image.mode.encode(),
            image.width.to_bytes(8, "little"),
            image.height.to_bytes(8, "little"),
            palette_mode,
            palette,
            repr(image.info.get("transparency")).encode(),
        )
    )
    pixels = image.tobytes()
    hasher.update(len(pixels).to_bytes(8, "little"))
    hasher.update(pixels)
    return hasher.hexdigest()


def uuid_mm_hash(image_uuid: str, key: bytes) -> str:
    """Hash of a caller's own image id; its tag keeps it apart from every pixel hash."""
    if not isinstance(image_uuid, str) or not image_uuid:
        raise InvalidImageError(f"image_uuid must be a non-empty str, got {image_uuid!r}")
    return blake3(_framed(_UUID_TAG, key, image_uuid.encode())).hexdigest()


class ImageHasher:
    """Gives each image source its mm_hash, decoding as little as it can.

    - ``image_uuid`` given: the hash of that id; the source is not read at all.
    - PIL image: its pixels as given (size checked by ``load_image``, nothing else applied).
    - Path or bytes: the file bytes are read once and blake3-hashed; a bounded LRU memo maps that
      digest to the mm_hash, so a repeated file costs one pass over its bytes and no decoding.
      On a memo miss the bytes are decoded by ``load_image`` (EXIF orientation applied) and the
      pixels hashed, so equal pixels in different formats share one mm_hash.

    ``identify`` returns the image alongside the hash whenever it had one in hand (a PIL input,
    or a path/bytes decoded on a memo miss) so the caller need not decode again; ``None`` means
    the caller must ``load_image(source, max_pixels)`` itself if it needs the pixels. Bad images
    raise an ``InvalidImageError`` subclass (see ``load_image``); a failed decode is not
    remembered. Thread-safe: the memo is guarded by a lock; decoding and hashing run outside it.
    """

    def __init__(
        self,
        processor_config: ImageProcessorConfig,
        model_id: str,
        memo_entries: int = 4096,
        max_pixels: int | None = None,
    ) -> None:
        if not _is_int(memo_entries) or memo_entries < 0:
            raise ValueError(f"memo_entries must be an int >= 0, got {memo_entries!r}")
        if max_pixels is not None and (not _is_int(max_pixels) or max_pixels <= 0):
            raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
        self.key = processor_key(processor_config, model_id)
        self.memo_entries = memo_entries
        self.max_pixels = max_pixels
        self._memo: OrderedDict[bytes, str] = OrderedDict()  # file-bytes digest -> mm_hash
        self.num_memo_hits = 0
        self.num_memo_misses = 0
        self.num_decoded = 0
        self._lock = threading.Lock()

    def identify(
        self, source: ImageSource, image_uuid: str | None = None
    ) -> tuple[str, Image.Image | None]:
        """The mm_hash of ``source``, and the loaded image when this call had one."""
        if image_uuid is not None:
            return uuid_mm_hash(image_uuid, self.key), None
        if isinstance(source, Image.Image):
            image = load_image(source, self.max_pixels)  # the same PIL image, size checked
            return image_mm_hash(image, self.key), image
        data, origin = _read_encoded(source)
        digest = blake3(data).digest()
        mm_hash = self._memo_lookup(digest)
        if mm_hash is not None:
            return mm_hash, None
        image = self._decode(data, origin)
        mm_hash = image_mm_hash(image, self.key)
        self._memo_insert(digest, mm_hash)
        return mm_hash, image

    def clear(self) -> None:
        with self._lock:
            self._memo.clear()

    def stats(self) -> dict[str, int]:
        return {
            "memo_hits": self.num_memo_hits,
            "memo_misses": self.num_memo_misses,
            "memo_entries": len(self._memo),
            "decoded": self.num_decoded,
        }

    def _memo_lookup(self, digest: bytes) -> str | None:
        with self._lock:
            mm_hash = self._memo.get(digest)
            if mm_hash is None:
                self.num_memo_misses += 1
                return None
            self._memo.move_to_end(digest)
            self.num_memo_hits += 1
            return mm_hash

    def _memo_insert(self, digest: bytes, mm_hash: str) -> None:
        if self.memo_entries == 0:
            return
        with self._lock:
            self._memo[digest] = mm_hash
            if len(self._memo) > self.memo_entries:
                self._memo.popitem(last=False)

    def _decode(self, data: bytes, origin: str | None) -> Image.Image:
        image = decode_image_bytes(data, self.max_pixels, origin)
        with self._lock:
            self.num_decoded += 1
        return image


def _read_encoded(source: object) -> tuple[bytes, str | None]:
    """The encoded bytes of a path or bytes source, and the path they came from (if any)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), None
    if isinstance(source, str | os.PathLike):
        path = os.fsdecode(source)
        return read_image_file(path), path
    raise ImageTypeError(
        f"unsupported image input type {type(source).__name__}: "
        "expected a PIL image, a file path, or encoded image bytes"
    )


def _palette(image: Image.Image) -> tuple[bytes, bytes]:
    """(raw mode, bytes) of a palette image's palette; empty for other modes."""
    if image.mode not in ("P", "PA") or image.palette is None:
        return b"", b""
    raw_mode = image.palette.mode
    return raw_mode.encode(), bytes(image.getpalette(raw_mode) or ())


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "little") + p for p in parts)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
