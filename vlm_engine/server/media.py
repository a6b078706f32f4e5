"""Images named in a request (`image_url` parts) as sources the engine loads.

- `data:` URLs (base64) become the encoded bytes;
- `file://` URLs only inside the folder the server allows (`--allowed-local-media-path`): the
  path is resolved (links and `..` included) and must stay inside that folder;
- `http(s)://` URLs only when the server allows them, fetched with a timeout and a size cap.

Every refusal is an `InvalidImageError` (a 400 for the client) that says why.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from vlm_engine.errors import ImageFileError, InvalidImageError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// URLs only below this folder
    allow_remote: bool = False  # http(s):// URLs
    remote_timeout_s: float = 10.0
    remote_max_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.allowed_local_path is not None:
            object.__setattr__(self, "allowed_local_path", self.allowed_local_path.resolve())


async def resolve_image(
    url: str, policy: MediaPolicy, client: httpx.AsyncClient | None
) -> bytes | str:
    """The bytes (data:, http(s):) or the checked path (file:) of an image URL."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url)
    if scheme == "file":
        return _local_path(url, policy)
    if scheme in ("http", "https"):
        if not policy.allow_remote or client is None:
            raise InvalidImageError("http(s) image URLs are not allowed by this server")
        return await _fetch(url, policy, client)
    raise InvalidImageError(
        f"unsupported image URL scheme {scheme!r}: use a data: URL (base64), or a file:// or "
        "http(s):// URL where the server allows them"
    )


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidImageError("a data: image URL must be base64: data:<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"the data: image URL is not valid base64: {e}") from None


def _local_path(url: str, policy: MediaPolicy) -> str:
    root = policy.allowed_local_path
    if root is None:
        raise InvalidImageError("file:// image URLs are not allowed by this server")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidImageError(f"a file:// URL must name a local path, got host {parsed.netloc!r}")
    path = Path(urllib.parse.unquote(parsed.path))
    try:
        resolved = path.resolve()  # links and ".." followed as far as they exist
    except (OSError, RuntimeError):
        raise InvalidImageError(f"cannot resolve the image path {path}") from None
    if not path.is_absolute() or not resolved.is_relative_to(root):
        raise InvalidImageError(f"{path} is outside the folder this server reads images from")
    if not resolved.is_file():
        raise ImageFileError(f"image file not found: {path}")
    return os.fspath(resolved)


async def _fetch(url: str, policy: MediaPolicy, client: httpx.AsyncClient) -> bytes:
    limit = policy.remote_max_bytes
    try:
        async with client.stream("GET", url, timeout=policy.remote_timeout_s) as response:
            if response.status_code != 200:
                raise InvalidImageError(f"fetching {url} gave HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise InvalidImageError(f"{url} is larger than {limit} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InvalidImageError(f"{url} is larger than {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise InvalidImageError(f"cannot fetch {url}: {e}") from None
