"""Scheduler-side books of the encoder cache: which image embeddings the runner holds.

Entries are keyed by mm_hash and sized in embeddings (rows of `[tokens, hidden]`). A request
references an entry while it still has that image's tokens to compute; an image shared by
requests is computed once. An entry nobody references stays cached, in LRU order, and is evicted
only when a new entry needs its space; the runner drops the tensor when told (`take_freed`).
Each step may compute at most `compute_budget` embeddings.
"""

from __future__ import annotations

from collections import OrderedDict

from vlm_engine.vocab.request import Request


class EncoderCacheManager:
    def __init__(self, capacity: int, compute_budget: int):
        self.capacity = capacity
        self.compute_budget = compute_budget
        self.refs: dict[str, set[str]] = {}  # cached mm_hash -> ids of requests that need it
        self.sizes: dict[str, int] = {}  # cached mm_hash -> embeddings
        self.unreferenced: OrderedDict[str, int] = OrderedDict()  # evictable, oldest first
        self.num_free = capacity  # embeddings held by no entry at all
        self.freed: list[str] = []  # evicted since the runner was last told
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0

    @property
    def num_reclaimable(self) -> int:
        return self.reclaimable_without(())

    def reclaimable_without(self, keep: set[str] | tuple[()]) -> int:
        """Embeddings that allocations could free, not counting the entries in `keep`."""
        return self.num_free + sum(size for h, size in self.unreferenced.items() if h not in keep)

    def is_cached(self, mm_hash: str) -> bool:
        return mm_hash in self.refs

    def acquire_cached(self, request: Request, mm_hash: str) -> bool:
        """Reference an entry already cached; False if it is not."""
        owners = self.refs.get(mm_hash)
        if owners is None:
            return False
        if request.request_id not in owners:
            self.num_hits += 1
            owners.add(request.request_id)
        self.unreferenced.pop(mm_hash, None)
        return True

    def can_allocate(self, size: int, budget_left: int, keep: set[str] | tuple[()] = ()) -> bool:
        """Whether `size` new embeddings fit this step's budget and the cache, without evicting
        the entries in `keep` (those the same chunk is about to reuse)."""
        return size <= budget_left and size <= self.reclaimable_without(keep)

    def allocate(self, request: Request, mm_hash: str, size: int) -> None:
        """Make room (evicting unreferenced entries, oldest first) for an entry to compute."""
        while self.num_free < size:
            self._evict_oldest()
        self.refs[mm_hash] = {request.request_id}
        self.sizes[mm_hash] = size
        self.num_free -= size
        self.num_misses += 1

    def evict_unreferenced(self) -> None:
        while self.unreferenced:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        victim, victim_size = self.unreferenced.popitem(last=False)
        del self.refs[victim], self.sizes[victim]
        self.num_free += victim_size
        self.freed.append(victim)
        self.num_evictions += 1

    def release(self, request: Request, mm_hash: str) -> None:
        owners = self.refs.get(mm_hash)
        if owners is None or request.request_id not in owners:
            return
        owners.discard(request.request_id)
        if not owners:
            self.unreferenced[mm_hash] = self.sizes[mm_hash]

    def release_all(self, request: Request) -> None:
        for feature in request.mm_features:
            self.release(request, feature.mm_hash)

    def take_freed(self) -> list[str]:
        freed, self.freed = self.freed, []
        return freed

    def num_referenced(self) -> int:
        return sum(1 for owners in self.refs.values() if owners)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.num_hits,
            "misses": self.num_misses,
            "evictions": self.num_evictions,
            "entries": len(self.refs),
            "used_embeddings": self.capacity - self.num_free,
            "capacity_embeddings": self.capacity,
        }
