"""Loading user images (PIL images, paths, encoded bytes) with errors a user can act on."""

import io
import os
import struct
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_engine.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageFileError,
    ImageTooLargeError,
    ImageTypeError,
    NotAnImageError,
)

ImageSource = Image.Image | str | os.PathLike[str] | bytes | bytearray | memoryview

# What PIL's decoders raise on corrupt or truncated data; it varies by format.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def load_image(source: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Load one image; the result has all its pixels decoded.

    A PIL image is returned as is: transformers applies no EXIF orientation to PIL inputs (a
    lazily opened one is decoded here, so a truncated file fails now, not later). A path or
    encoded bytes are decoded fully and turned upright by their EXIF orientation tag. PIL's
    decompression-bomb limit stays in force; ``max_pixels`` adds a tighter one, checked from the
    header before any pixel is decoded.

    Raises ``ImageTypeError`` for an unsupported input type, ``ImageFileError`` for a missing or
    unreadable file, ``NotAnImageError`` for data in no image format, ``CorruptImageError`` for
    corrupt or truncated data, ``EmptyImageError`` for zero bytes or a zero-size image, and
    ``ImageTooLargeError`` for more than ``max_pixels`` pixels. Each message names the source.
    """
    if max_pixels is not None and (not _is_int(max_pixels) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        description = describe_image_source(source)
        _check_size(source, max_pixels, description)
        _load_pixels(source, description)
        return source
    if isinstance(source, str | os.PathLike):
        path = os.fsdecode(source)
        return decode_image_bytes(read_image_file(path), max_pixels, path)
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_image_bytes(bytes(source), max_pixels)
    raise ImageTypeError(
        f"unsupported image input type {type(source).__name__}: "
        "expected a PIL image, a file path, or encoded image bytes"
    )


def read_image_file(path: str) -> bytes:
    """The bytes of an image file; ``ImageFileError`` when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except OSError as e:
        raise ImageFileError(f"cannot read image file {path}: {e}") from e


def decode_image_bytes(
    data: bytes, max_pixels: int | None = None, description: str | None = None
) -> Image.Image:
    """Decode encoded image bytes as ``load_image`` does; errors name ``description`` (the file
    the bytes came from) or else the byte count."""
    description = description or describe_image_source(data)
    if not data:
        raise EmptyImageError(f"empty image data (0 bytes): {description}")
    with _open(io.BytesIO(data), description) as image:
        _check_size(image, max_pixels, description)
        _load_pixels(image, description)
        return ImageOps.exif_transpose(image)  # a new image, independent of the data


def describe_image_source(source: object) -> str:
    """How error messages name an image: its path, its byte count, or its PIL size and mode."""
    if isinstance(source, Image.Image):
        return f"PIL image ({source.width}x{source.height}, mode {source.mode})"
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"bytes ({len(source)} bytes)"
    return type(source).__name__


def _open(file: IO[bytes], description: str) -> Image.Image:
    """Read the header only; pixels are decoded by ``load()``."""
    try:
        return Image.open(file)
    except UnidentifiedImageError:
        raise NotAnImageError(f"not an image (unrecognized format): {description}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"image exceeds PIL's decompression-bomb pixel limit: {description} ({e})"
        ) from e
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot open image {description}: {e}") from e


def _load_pixels(image: Image.Image, description: str) -> None:
    try:
        image.load()
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"corrupt or truncated image data in {description}: {e}") from e


def _check_size(image: Image.Image, max_pixels: int | None, description: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise EmptyImageError(f"zero-size image ({width}x{height}): {description}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image has {width}x{height} = {width * height} pixels, "
            f"more than max_pixels={max_pixels} (the engine's max_image_pixels): {description}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
