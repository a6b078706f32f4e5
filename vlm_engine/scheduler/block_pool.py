"""The KV blocks' books: reference counts, the free queue, and the prefix-cache map.

Pure bookkeeping: a block is an id into the model runner's KV tensors.

Invariants:
- A block is in the free queue exactly when its `ref_cnt` is 0.
- A block in the map (`hash -> block`) carries that hash. A free block keeps its hash and stays
  in the map, so a later request can still hit it (`touch`); the hash is dropped only when
  `get_new_blocks` hands the block out again (lazy eviction).
- The free queue's head is evicted first. Freed blocks that carry a hash join the tail (LRU);
  those without one join the head, since reusing them first costs no cached content.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vlm_engine.scheduler.prefix_hash import BlockHash


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than are free; callers check `num_free_blocks` first."""


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        # block_id -> block, head first: O(1) pop at the head, append, and removal by id.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse the block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (referenced by some request)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (the next `get_new_blocks` takes the first)."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free queue, each with `ref_cnt` 1."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"asked for {num_blocks} KV blocks, only {self.num_free_blocks} are free"
            )
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._drop_hash(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block; blocks reaching 0 join the free queue in this order.

        Pass a request's blocks last first, so its longest-prefix blocks are evicted first.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"KV block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_full_blocks(
        self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[BlockHash]
    ) -> None:
        """Record the hashes of blocks that just became full, making them prefix-cache hits.

        A block that already has a hash keeps it. If the map already holds another block with
        the same content (two requests computed it at once), that block stays the cached one.
        """
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                continue
            block.block_hash = block_hash
            self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._cached.clear()
        for block in self.blocks:
            block.block_hash = None
        return True

    def all_free(self) -> bool:
        """Every block unreferenced and in the free queue (the state after freeing everything)."""
        no_refs = all(block.ref_cnt == 0 for block in self.blocks)
        return no_refs and self.num_free_blocks == self.num_blocks

    def _drop_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            self.num_evictions += 1
        block.block_hash = None
