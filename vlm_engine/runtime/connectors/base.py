"""ECConnector: a persistent second level under the encoder cache.

Image embeddings `[num_tokens, hidden]` are stored under `entry_key(fingerprint, mm_hash)`, so
a restarted engine, or another machine serving the same model, skips the vision tower.

Invariants:
- Reads never raise for a store problem: a missing, corrupt or truncated entry, a dead store,
  a full disk or a timeout is a miss, counted in `stats()` and logged at most once per
  interval per kind of failure.
- `save` never blocks: it queues the tensor for one background writer; when the queue is full
  the save is dropped and counted. The caller must not modify a saved tensor in place.
- A loaded tensor has passed the codec's checks (format, lengths, blake3 digest).
"""

from __future__ import annotations

import abc
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from blake3 import blake3

from vlm_engine.errors import CheckpointError
from vlm_engine.runtime.connectors.codec import CorruptEntryError, decode_tensor, encode_tensor

logger = logging.getLogger("vlm_engine")

STAT_NAMES = (
    "hits",
    "misses",
    "saves",
    "save_errors",
    "load_errors",
    "dropped_saves",
    "corrupt",
    "bytes_read",
    "bytes_written",
)
_KEY_PREFIX = "vlm-ec"
_NUM_WEIGHT_SAMPLES = 8
_WEIGHT_SAMPLE_BYTES = 4096
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def entry_key(fingerprint: str, mm_hash: str) -> str:
    """Store key of one embedding; entries of two models never share a key."""
    if not fingerprint or ":" in fingerprint:
        raise ValueError(f"fingerprint must be a non-empty string without ':', got {fingerprint!r}")
    if not mm_hash:
        raise ValueError("mm_hash must be a non-empty string")
    return f"{_KEY_PREFIX}:{fingerprint}:{mm_hash}"


def model_fingerprint(checkpoint_dir: str | os.PathLike, dtype: str | torch.dtype) -> str:
    """blake3 hex digest of what decides a model's image embeddings, cheap for any size.

    Covers config.json, the compute dtype, and for every *.safetensors file its name, size,
    JSON header (names, dtypes, shapes, offsets) and a few small windows of weight bytes, so a
    fine-tune with unchanged shapes gets a new fingerprint too.
    """
    root = Path(checkpoint_dir)
    config = root / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{root} has no config.json; cannot fingerprint the model")
    weight_files = sorted(root.glob("*.safetensors"))
    if not weight_files:
        raise CheckpointError(f"no *.safetensors weights in {root}; cannot fingerprint the model")
    hasher = blake3()
    _hash_field(hasher, b"config.json", config.read_bytes())
    _hash_field(hasher, b"dtype", str(dtype).removeprefix("torch.").encode())
    for path in weight_files:
        _hash_field(hasher, b"file", path.name.encode())
        _hash_safetensors(hasher, path)
    return hasher.hexdigest()


def _hash_field(hasher: blake3, tag: bytes, value: bytes) -> None:
    # Length-prefixed framing: no two field sequences hash the same bytes.
    hasher.update(struct.pack("<Q", len(tag)) + tag + struct.pack("<Q", len(value)))
    hasher.update(value)


def _hash_safetensors(hasher: blake3, path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 <= header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        _hash_field(hasher, b"size", struct.pack("<Q", size))
        _hash_field(hasher, b"header", f.read(header_len))
        for offset in _sample_offsets(8 + header_len, size):
            f.seek(offset)
            _hash_field(hasher, b"sample", f.read(_WEIGHT_SAMPLE_BYTES))


def _sample_offsets(start: int, end: int) -> list[int]:
    """Evenly spaced window starts over [start, end), first and last window included."""
    last = max(start, end - _WEIGHT_SAMPLE_BYTES)
    steps = _NUM_WEIGHT_SAMPLES - 1
    return sorted({start + (last - start) * i // steps for i in range(_NUM_WEIGHT_SAMPLES)})


class _WarningLimiter:
    """Logs the first failure of each kind, then at most one warning per interval."""

    def __init__(self, source: str, interval_s: float = 60.0) -> None:
        self.source = source
        self.interval_s = interval_s
        self._last_logged: dict[str, float] = {}
        self._num_suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last_logged.get(kind)
            if last is not None and now - last < self.interval_s:
                self._num_suppressed[kind] = self._num_suppressed.get(kind, 0) + 1
                return
            self._last_logged[kind] = now
            num_suppressed = self._num_suppressed.pop(kind, 0)
        note = f" ({num_suppressed} more since the last warning)" if num_suppressed else ""
        logger.warning("%s %s: %s%s", self.source, kind, message, note)


class ECConnector(abc.ABC):
    """Persistent store of image embeddings for one model (one fingerprint).

    Subclasses implement the raw byte operations `_get_bytes`, `_put_bytes`, `_exists`, and
    may batch `_get_many_bytes` / `_exists_many`. Those may raise anything: every failure is
    turned into a miss here. `_put_bytes` runs on the writer thread only.
    """

    def __init__(self, fingerprint: str, *, max_pending_saves: int = 64) -> None:
        entry_key(fingerprint, "probe")  # validates the fingerprint once, here
        if max_pending_saves < 1:
            raise ValueError(f"max_pending_saves must be >= 1, got {max_pending_saves}")
        self.fingerprint = fingerprint
        self.max_pending_saves = max_pending_saves
        self._stats = dict.fromkeys(STAT_NAMES, 0)
        self._stats_lock = threading.Lock()
        self._warnings = _WarningLimiter(type(self).__name__)
        self._pending: deque[tuple[str, torch.Tensor]] = deque()
        self._writing = False
        self._closed = False
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None

    # ----- store hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes | None:
        """The stored bytes, or None when the key is absent."""

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    def _get_many_bytes(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get_bytes(key) for key in keys]

    def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._exists(key) for key in keys]

    def _delete(self, key: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Remove a corrupt entry so that the next save replaces it."""

    def _close_store(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the store's connections or files."""

    # ----- reads ---------------------------------------------------------------------------

    def has(self, mm_hash: str) -> bool:
        return self.has_many([mm_hash])[0]

    def has_many(self, mm_hashes: Sequence[str]) -> list[bool]:
        keys = [entry_key(self.fingerprint, mm_hash) for mm_hash in mm_hashes]
        if not keys:
            return []
        try:
            return [bool(found) for found in self._exists_many(keys)]
        except Exception as exc:
            self._fail("load_errors", "lookup failed", exc)
            return [False] * len(keys)

    def load(
        self,
        mm_hash: str,
        *,
        expected_dtype: torch.dtype | None = None,
        expected_shape_tail: tuple[int, ...] | None = None,
    ) -> torch.Tensor | None:
        """The stored embedding on CPU, or None on any miss (absent, corrupt, store down)."""
        return self.load_many(
            [mm_hash], expected_dtype=expected_dtype, expected_shape_tail=expected_shape_tail
        )[0]

    def load_many(
        self,
        mm_hashes: Sequence[str],
        *,
        expected_dtype: torch.dtype | None = None,
        expected_shape_tail: tuple[int, ...] | None = None,
    ) -> list[torch.Tensor | None]:
        keys = [entry_key(self.fingerprint, mm_hash) for mm_hash in mm_hashes]
        if not keys:
            return []
        try:
            blobs = self._get_many_bytes(keys)
        except Exception as exc:
            self._fail("load_errors", "load failed", exc)
            self._count(misses=len(keys))
            return [None] * len(keys)
        return [
            self._decode(key, blob, expected_dtype, expected_shape_tail)
            for key, blob in zip(keys, blobs, strict=True)
        ]

    def _decode(
        self,
        key: str,
        blob: bytes | None,
        expected_dtype: torch.dtype | None,
        expected_shape_tail: tuple[int, ...] | None,
    ) -> torch.Tensor | None:
        if blob is None:
            self._count(misses=1)
            return None
        try:
            tensor = decode_tensor(blob, expected_dtype, expected_shape_tail)
        except CorruptEntryError as exc:
            self._fail("corrupt", "corrupt entry", exc, misses=1)
            self._try_delete(key)
            return None
        self._count(hits=1, bytes_read=len(blob))
        return tensor

    def _try_delete(self, key: str) -> None:
        try:
            self._delete(key)
        except Exception as exc:
            self._warnings.warn("delete failed", f"cannot remove a corrupt entry: {exc!r}")

    # ----- writes --------------------------------------------------------------------------

    def save(self, mm_hash: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` for storage and return at once; a full queue drops the save."""
        key = entry_key(self.fingerprint, mm_hash)
        with self._cond:
            accepted = not self._closed and len(self._pending) < self.max_pending_saves
            if accepted:
                self._pending.append((key, tensor))
                self._start_writer()
                self._cond.notify_all()
        if not accepted:
            self._count(dropped_saves=1)
            self._warnings.warn("save dropped", "the save queue is full or the connector closed")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save is written or failed; False if `timeout` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._writing, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write what is queued (up to `timeout`), drop the rest, and release the store."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout)
        with self._cond:
            num_dropped = len(self._pending)
            self._pending.clear()
        self._count(dropped_saves=num_dropped)
        self._close_store()

    def _start_writer(self) -> None:
        if self._writer is None:
            name = f"{type(self).__name__}-writer"
            self._writer = threading.Thread(target=self._write_loop, name=name, daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                key, tensor = self._pending.popleft()
                self._writing = True
            self._write(key, tensor)
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        try:
            data = encode_tensor(tensor)
            self._put_bytes(key, data)
        except Exception as exc:
            self._fail("save_errors", "save failed", exc)
            return
        self._count(saves=1, bytes_written=len(data))

    # ----- bookkeeping ---------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                self._stats[name] += value

    def _fail(self, counter: str, kind: str, exc: BaseException, **increments: int) -> None:
        self._count(**{counter: 1}, **increments)
        self._warnings.warn(kind, repr(exc))

    def __enter__(self) -> ECConnector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
