"""Frontend cache of preprocessed images: mm_hash -> ProcessedImage, LRU bounded by bytes.

A hit skips decoding, pan-and-scan, resizing and normalizing an image seen before. An entry's
size is the ``nbytes`` of its ``pixel_values``. Entries are stored as given (CPU tensors, no
copy) and handed out as stored: callers must treat them as read-only, since mutating one
changes what every later hit returns. Thread-safe: the frontend preprocesses the prompts of one
batch call on several threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from vlm_engine.frontend.image_processor import ProcessedImage


class ProcessorCache:
    def __init__(self, max_bytes: int) -> None:
        """``max_bytes == 0`` disables the cache: nothing is stored and every get is a miss."""
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        # mm_hash -> (entry, its size in bytes when stored), least recently used first
        self._entries: OrderedDict[str, tuple[ProcessedImage, int]] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, mm_hash: str) -> bool:
        """Membership only: does not count as a hit or refresh recency."""
        return mm_hash in self._entries

    def get(self, mm_hash: str) -> ProcessedImage | None:
        """The cached entry (now most recently used), or None on a miss."""
        with self._lock:
            entry = self._entries.get(mm_hash)
            if entry is None:
                self.num_misses += 1
                return None
            self._entries.move_to_end(mm_hash)
            self.num_hits += 1
            return entry[0]

    def put(self, mm_hash: str, processed: ProcessedImage) -> bool:
        """Store an entry, evicting the least recently used until it fits; False if not stored.

        An entry larger than ``max_bytes`` is not cached (the caller still uses it), and an
        existing entry of the same mm_hash is replaced.
        """
        size = processed.pixel_values.nbytes
        if self.max_bytes == 0 or size > self.max_bytes:
            return False
        with self._lock:
            self._discard(mm_hash)
            while self.num_bytes + size > self.max_bytes:
                self._evict_oldest()
            self._entries[mm_hash] = (processed, size)
            self.num_bytes += size
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.num_bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.num_hits,
            "misses": self.num_misses,
            "evictions": self.num_evictions,
            "entries": len(self._entries),
            "bytes": self.num_bytes,
            "max_bytes": self.max_bytes,
        }

    def _evict_oldest(self) -> None:
        _, (_, size) = self._entries.popitem(last=False)
        self.num_bytes -= size
        self.num_evictions += 1

    def _discard(self, mm_hash: str) -> None:
        entry = self._entries.pop(mm_hash, None)
        if entry is not None:
            self.num_bytes -= entry[1]
