"""Loading user images (PIL images, paths, encoded bytes) with errors a user can act on."""

import io
import os
import struct
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_engine.errors import InvalidImageError, InvalidInputError

ImageSource = Image.Image | str | os.PathLike[str] | bytes | bytearray | memoryview

# What PIL's decoders raise on corrupt or truncated data; it varies by format.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def load_image(source: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Load one image; the result has all its pixels decoded.

    A PIL image is returned as is: transformers applies no EXIF orientation to PIL inputs. A path
    or encoded bytes are decoded fully (truncated data fails here, not later) and turned upright
    by their EXIF orientation tag. PIL's decompression-bomb limit stays in force; ``max_pixels``
    adds a tighter one, checked from the header before any pixel is decoded.

    Raises InvalidImageError for an unsupported input type, a missing file, data that is not an
    image or is corrupt or truncated, a zero-size image, or more than ``max_pixels`` pixels.
    """
    if max_pixels is not None and (not _is_int(max_pixels) or max_pixels <= 0):
        raise InvalidInputError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        _check_size(source, max_pixels, "PIL image")
        return source
    if isinstance(source, str | os.PathLike):
        return _decode(source, os.fsdecode(source), max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _decode(io.BytesIO(data), f"bytes ({len(data)} bytes)", max_pixels)
    raise InvalidImageError(
        f"unsupported image input type {type(source).__name__}: "
        "expected a PIL image, a file path, or encoded image bytes"
    )


def _decode(
    file: str | os.PathLike[str] | IO[bytes], description: str, max_pixels: int | None
) -> Image.Image:
    with _open(file, description) as image:
        _check_size(image, max_pixels, description)
        try:
            image.load()
            return ImageOps.exif_transpose(image)  # a new image, independent of the file
        except _DECODE_ERRORS as e:
            raise InvalidImageError(f"corrupt or truncated image data in {description}: {e}") from e


def _open(file: str | os.PathLike[str] | IO[bytes], description: str) -> Image.Image:
    """Read the header only; pixels are decoded by ``load()``."""
    try:
        return Image.open(file)
    except FileNotFoundError:
        raise InvalidImageError(f"image file not found: {description}") from None
    except UnidentifiedImageError:
        raise InvalidImageError(f"not an image (unrecognized format): {description}") from None
    except Image.DecompressionBombError as e:
        raise InvalidImageError(
            f"image exceeds PIL's decompression-bomb pixel limit: {description} ({e})"
        ) from e
    except _DECODE_ERRORS as e:
        raise InvalidImageError(f"cannot open image {description}: {e}") from e


def _check_size(image: Image.Image, max_pixels: int | None, description: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidImageError(f"zero-size image ({width}x{height}): {description}")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidImageError(
            f"image has {width}x{height} = {width * height} pixels, "
            f"more than max_pixels={max_pixels}: {description}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
