"""Scheduler-side books of the encoder cache: which image embeddings the runner holds.

An entry is keyed by mm_hash and referenced by every request that still has that image's tokens
to compute; an image shared by requests scheduled together is encoded once. An entry is freed
as soon as nothing references it, and the runner drops its tensor when told.
"""

from __future__ import annotations

from vlm_engine.core.request import Request


class EncoderCacheManager:
    def __init__(self) -> None:
        self.refs: dict[str, set[str]] = {}  # mm_hash -> ids of requests that need it
        self.freed: list[str] = []  # unreferenced since the runner was last told
        self.num_encoded = 0
        self.num_hits = 0

    def is_cached(self, mm_hash: str) -> bool:
        return mm_hash in self.refs

    def acquire(self, request: Request, mm_hash: str) -> bool:
        """Reference the entry for `request`; True when it must be computed (a miss)."""
        owners = self.refs.get(mm_hash)
        if owners is not None:
            self.num_hits += request.request_id not in owners
            owners.add(request.request_id)
            return False
        self.refs[mm_hash] = {request.request_id}
        self.num_encoded += 1
        return True

    def release(self, request: Request, mm_hash: str) -> None:
        owners = self.refs.get(mm_hash)
        if owners is None or request.request_id not in owners:
            return
        owners.discard(request.request_id)
        if not owners:
            del self.refs[mm_hash]
            self.freed.append(mm_hash)

    def release_all(self, request: Request) -> None:
        for feature in request.mm_features:
            self.release(request, feature.mm_hash)

    def take_freed(self) -> list[str]:
        freed, self.freed = self.freed, []
        return freed

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.refs), "encoded": self.num_encoded, "hits": self.num_hits}
