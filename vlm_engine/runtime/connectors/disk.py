"""DiskECConnector: embeddings in a local diskcache directory that outlives the engine."""

from __future__ import annotations

import os

import diskcache

from vlm_engine.runtime.connectors.base import ECConnector

DEFAULT_DISK_SIZE_LIMIT_BYTES = 16 * 1024**3


class DiskECConnector(ECConnector):
    """Entries are raw codec bytes in a `diskcache.Cache`; diskcache evicts past the size limit.

    Several engines (processes) may share one directory: diskcache guards it with SQLite.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        size_limit_bytes: int = DEFAULT_DISK_SIZE_LIMIT_BYTES,
        *,
        fingerprint: str,
        max_pending_saves: int = 64,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(fingerprint, max_pending_saves=max_pending_saves)
        if size_limit_bytes <= 0:
            raise ValueError(f"size_limit_bytes must be positive, got {size_limit_bytes}")
        self.path = os.fspath(path)
        # timeout bounds how long SQLite waits on a lock held by another process. Past the size
        # limit each save evicts up to two oldest entries: diskcache's default of ten can evict
        # the entry just written, and empty the cache, when the limit holds only a few entries.
        self._cache = diskcache.Cache(
            self.path, size_limit=size_limit_bytes, cull_limit=2, timeout=timeout_s
        )

    def _get_bytes(self, key: str) -> bytes | None:
        return self._cache.get(key)

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._cache.set(key, data)

    def _exists(self, key: str) -> bool:
        return key in self._cache

    def _delete(self, key: str) -> None:
        self._cache.delete(key)

    def _close_store(self) -> None:
        self._cache.close()

    def __repr__(self) -> str:
        return f"DiskECConnector({self.path!r}, fingerprint={self.fingerprint[:12]}...)"
