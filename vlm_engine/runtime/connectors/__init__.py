"""Second-level encoder-cache connectors: image embeddings persisted on disk or in Redis.

Specs accepted by `make_connector`:
    None or ""                    no connector
    "disk:/path[?size_gb=N]"      DiskECConnector in /path, N GiB at most (default 16)
    "redis://..." / "rediss://..." RedisECConnector on that server
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from vlm_engine.runtime.connectors.base import ECConnector, entry_key, model_fingerprint
from vlm_engine.runtime.connectors.codec import CorruptEntryError, decode_tensor, encode_tensor
from vlm_engine.runtime.connectors.disk import DiskECConnector

if TYPE_CHECKING:
    from vlm_engine.runtime.connectors.redis import RedisECConnector

__all__ = [
    "CorruptEntryError",
    "DiskECConnector",
    "ECConnector",
    "RedisECConnector",
    "decode_tensor",
    "encode_tensor",
    "entry_key",
    "make_connector",
    "model_fingerprint",
]


def make_connector(spec: str | None, fingerprint: str) -> ECConnector | None:
    """Build the connector a spec names, bound to one model fingerprint; None for no spec."""
    if not spec:
        return None
    if spec.startswith("disk:"):
        return _make_disk_connector(spec, fingerprint)
    if spec.startswith(("redis://", "rediss://")):
        return _redis_class()(spec, fingerprint=fingerprint)
    raise ValueError(
        f"unknown encoder-cache connector spec {spec!r}; "
        "expected 'disk:/path[?size_gb=N]', 'redis://...' or 'rediss://...'"
    )


def _make_disk_connector(spec: str, fingerprint: str) -> DiskECConnector:
    path, _, query = spec.removeprefix("disk:").partition("?")
    if not path:
        raise ValueError(f"connector spec {spec!r} names no directory; use 'disk:/path'")
    try:
        options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"connector spec {spec!r}: malformed options ({exc})") from None
    unknown = set(options) - {"size_gb"}
    if unknown:
        raise ValueError(
            f"connector spec {spec!r}: unknown options {sorted(unknown)}; only size_gb"
        )
    if "size_gb" not in options:
        return DiskECConnector(path, fingerprint=fingerprint)
    size_gb = _positive_float(options["size_gb"][-1], spec)
    return DiskECConnector(path, int(size_gb * 1024**3), fingerprint=fingerprint)


def _positive_float(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"connector spec {spec!r}: size_gb must be a positive number, got {text!r}"
        )
    return value


def _redis_class() -> type[RedisECConnector]:
    try:
        from vlm_engine.runtime.connectors.redis import RedisECConnector
    except ImportError as exc:
        raise ImportError(
            "a redis:// encoder-cache connector needs the redis client: "
            "pip install 'vlm_engine[redis]'"
        ) from exc
    return RedisECConnector


def __getattr__(name: str) -> Any:
    # RedisECConnector is imported on first use: the redis client is an optional dependency.
    if name == "RedisECConnector":
        return _redis_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
