"""Which KV blocks each request holds, and which of its blocks the prefix cache already has.

The scheduler's view of the paged KV cache (the model runner owns the tensors):
`get_computed_blocks` finds a new request's cached prefix, `can_fit`/`allocate_slots` give a
request room for the tokens of a step, `free` gives its blocks back. A request's block `i`
holds the KV of its tokens `[i * block_size, (i + 1) * block_size)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vlm_engine.scheduler.block_pool import BlockPool, KVCacheBlock
from vlm_engine.scheduler.prefix_hash import update_block_hashes

if TYPE_CHECKING:
    from vlm_engine.vocab.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already in the cache
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request's full blocks, and the tokens it covers.

        The hit never covers the last token, whose forward pass must run to give logits. The
        lookup is counted in the stats when the request is scheduled (`allocate_slots`).
        """
        if not self.enable_prefix_caching:
            return [], 0
        update_block_hashes(request, self.block_size)
        max_hit_blocks = max(request.num_tokens - 1, 0) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def can_fit(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> bool:
        """Whether `allocate_slots` with these arguments would succeed."""
        num_new_blocks = self._num_new_blocks(
            request, num_new_tokens, new_computed_blocks, num_new_computed_tokens
        )
        # A free hit block leaves the free queue when touched, so it is no longer spare.
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        return num_new_blocks + num_free_hits <= self.block_pool.num_free_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Room for `num_computed_tokens + num_new_computed_tokens + num_new_tokens` tokens.

        `new_computed_blocks` (with `num_new_computed_tokens`) is the hit `get_computed_blocks`
        returned, passed on the request's first allocation. Returns the newly taken blocks, or
        None, changing nothing, when too few blocks are free.
        """
        if not self.can_fit(request, num_new_tokens, new_computed_blocks, num_new_computed_tokens):
            return None
        num_new_blocks = self._num_new_blocks(
            request, num_new_tokens, new_computed_blocks, num_new_computed_tokens
        )
        if request.request_id not in self.req_to_blocks and self.enable_prefix_caching:
            self._num_queried_tokens += request.num_tokens  # a (re)scheduled request's lookup
            self._num_hit_tokens += num_new_computed_tokens
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            num_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
            self._cache_full_blocks(request, blocks, num_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        """Give back the request's blocks, last first (so its tail is evicted first). Idempotent."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks is not None:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any request holds blocks."""
        return self.block_pool.reset_prefix_cache()

    def prefix_cache_stats(self) -> dict[str, float]:
        queries, hits = self._num_queried_tokens, self._num_hit_tokens
        return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else 0.0}

    def all_blocks_free(self) -> bool:
        return self.block_pool.all_free()

    def _num_new_blocks(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_new_computed_tokens: int,
    ) -> int:
        num_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = -(-num_tokens // self.block_size)
        num_held = len(self.req_to_blocks.get(request.request_id, ())) + len(new_computed_blocks)
        return max(num_required - num_held, 0)

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_tokens: int
    ) -> None:
        """Cache the request's blocks that are full once its first `num_tokens` are computed."""
        update_block_hashes(request, self.block_size)
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        num_cached = self._num_cached_blocks.get(request.request_id, 0)
        if num_full > num_cached:
            self.block_pool.cache_full_blocks(
                blocks[num_cached:num_full], request.block_hashes[num_cached:num_full]
            )
            self._num_cached_blocks[request.request_id] = num_full
