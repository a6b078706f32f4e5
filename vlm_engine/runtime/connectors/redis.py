"""RedisECConnector: embeddings in a Redis server shared by engines on many machines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vlm_engine.runtime.connectors.base import ECConnector

T = TypeVar("T")
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class StoreUnavailableError(ConnectionError):
    """The store failed recently; calls are skipped until the back-off interval ends."""


class _Backoff:
    """After a connection failure, skip calls for an interval that doubles up to a cap."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(
                f"need 0 < retry_interval_s <= max_retry_interval_s, got {initial_s}, {max_s}"
            )
        self.initial_s = initial_s
        self.max_s = max_s
        self._interval_s = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        with self._lock:
            wait_s = self._retry_at - time.monotonic()
        if wait_s > 0:
            raise StoreUnavailableError(f"store unreachable; next try in {wait_s:.1f}s")

    def failed(self) -> None:
        with self._lock:
            self._interval_s = min(2 * self._interval_s, self.max_s) or self.initial_s
            self._retry_at = time.monotonic() + self._interval_s

    def succeeded(self) -> None:
        with self._lock:
            self._interval_s = 0.0
            self._retry_at = 0.0


class RedisECConnector(ECConnector):
    """Entries are raw codec bytes under string keys; Redis's own maxmemory policy evicts.

    Connect and socket timeouts are short and redis-py's retries are off, so a dead server
    costs one timeout per back-off interval; calls in between are misses at once.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: int | None = None,
        socket_timeout: float = 1.0,
        *,
        fingerprint: str,
        max_pending_saves: int = 64,
        retry_interval_s: float = 1.0,
        max_retry_interval_s: float = 30.0,
    ) -> None:
        super().__init__(fingerprint, max_pending_saves=max_pending_saves)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds}")
        if socket_timeout <= 0:
            raise ValueError(f"socket_timeout must be positive, got {socket_timeout}")
        self.url = _redact(url)
        self.ttl_seconds = ttl_seconds
        self._backoff = _Backoff(retry_interval_s, max_retry_interval_s)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _call(self, operation: Callable[[], T]) -> T:
        self._backoff.check()
        try:
            result = operation()
        except _CONNECTION_ERRORS:
            self._backoff.failed()
            raise
        self._backoff.succeeded()
        return result

    def _get_bytes(self, key: str) -> bytes | None:
        return self._call(lambda: self._client.get(key))

    def _get_many_bytes(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._call(lambda: self._client.mget(keys))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._call(lambda: self._client.set(key, data, ex=self.ttl_seconds))

    def _exists(self, key: str) -> bool:
        return bool(self._call(lambda: self._client.exists(key)))

    def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        def exists_pipelined() -> list[int]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        return [bool(found) for found in self._call(exists_pipelined)]

    def _delete(self, key: str) -> None:
        self._call(lambda: self._client.delete(key))

    def _close_store(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisECConnector({self.url!r}, fingerprint={self.fingerprint[:12]}...)"


def _redact(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))
