import pytest

from vlm_engine.scheduler.block_pool import BlockPool, NoFreeBlocksError
from vlm_engine.scheduler.prefix_hash import hash_block


def hashes(n, salt=0):
    return [hash_block(None, [salt, i], ()) for i in range(n)]


def cached_blocks(pool, n, salt=0):
    blocks = pool.get_new_blocks(n)
    pool.cache_full_blocks(blocks, hashes(n, salt))
    return blocks


def test_new_blocks_come_from_the_head_with_one_reference():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(2)
    assert [b.block_id for b in blocks] == [0, 1]
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert pool.num_free_blocks == 4
    assert pool.usage == pytest.approx(2 / 6)
    assert pool.free_block_ids() == [2, 3, 4, 5]


def test_asking_beyond_the_free_blocks_raises_and_takes_nothing():
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(NoFreeBlocksError, match="asked for 2"):
        pool.get_new_blocks(2)
    assert pool.free_block_ids() == [3]


def test_freed_cached_blocks_join_the_tail_in_the_given_order():
    pool = BlockPool(6)
    blocks = cached_blocks(pool, 4)
    pool.free_blocks(reversed(blocks))  # a request frees its blocks last first
    assert pool.free_block_ids() == [4, 5, 3, 2, 1, 0]
    # Eviction takes the head: never-used blocks, then the request's tail block.
    assert [b.block_id for b in pool.get_new_blocks(3)] == [4, 5, 3]


def test_freed_unhashed_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4)
    cached = cached_blocks(pool, 2)
    partial = pool.get_new_blocks(1)
    pool.free_blocks(reversed([*cached, *partial]))
    assert pool.free_block_ids() == [2, 3, 1, 0]
    assert pool.num_evictions == 0


def test_touch_takes_a_free_block_out_of_the_queue():
    pool = BlockPool(4)
    blocks = cached_blocks(pool, 2)
    pool.free_blocks(reversed(blocks))
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 1
    assert pool.free_block_ids() == [2, 3, 1]
    assert [b.block_id for b in pool.get_new_blocks(3)] == [2, 3, 1]
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(1)
    # Freed again, the touched block returns at the tail as the most recently used.
    pool.free_blocks([blocks[0]])
    assert pool.free_block_ids() == [0]


def test_free_blocks_stay_cached_until_reused():
    pool = BlockPool(4)
    blocks = cached_blocks(pool, 2)
    h0, h1 = hashes(2)
    pool.free_blocks(reversed(blocks))
    assert pool.get_cached_block(h0) is blocks[0]
    assert pool.get_cached_block(h1) is blocks[1]
    assert pool.num_cached_blocks == 2

    reused = pool.get_new_blocks(3)  # blocks 2, 3, then 1: the cached tail block
    assert reused[-1] is blocks[1]
    assert blocks[1].block_hash is None
    assert pool.get_cached_block(h1) is None
    assert pool.get_cached_block(h0) is blocks[0]
    assert pool.num_evictions == 1


def test_two_requests_sharing_a_prefix_count_references():
    pool = BlockPool(4)
    first = cached_blocks(pool, 2)
    h0, h1 = hashes(2)
    hits = [pool.get_cached_block(h0), pool.get_cached_block(h1)]
    pool.touch(hits)
    assert [b.ref_cnt for b in first] == [2, 2]
    assert pool.num_free_blocks == 2

    pool.free_blocks(reversed(first))
    assert [b.ref_cnt for b in first] == [1, 1]
    assert pool.num_free_blocks == 2  # still held by the second request
    pool.free_blocks(reversed(hits))
    assert pool.free_block_ids() == [2, 3, 1, 0]
    assert pool.all_free()


def test_freeing_an_unreferenced_block_raises():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free_blocks([block])


def test_a_duplicate_block_does_not_replace_or_evict_the_cached_one():
    pool = BlockPool(4)
    (original,) = cached_blocks(pool, 1)
    (duplicate,) = cached_blocks(pool, 1)  # same content computed again
    (h,) = hashes(1)
    assert pool.get_cached_block(h) is original
    pool.free_blocks([duplicate])
    pool.get_new_blocks(3)  # blocks 2, 3 and the duplicate
    assert pool.get_cached_block(h) is original
    assert pool.num_evictions == 0


def test_cache_full_blocks_keeps_an_existing_hash():
    pool = BlockPool(2)
    (block,) = cached_blocks(pool, 1, salt=0)
    (other,) = hashes(1, salt=1)
    pool.cache_full_blocks([block], [other])
    assert block.block_hash == hashes(1, salt=0)[0]
    assert pool.get_cached_block(other) is None


def test_reset_prefix_cache_only_when_every_block_is_free():
    pool = BlockPool(3)
    blocks = cached_blocks(pool, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.num_cached_blocks == 2
    pool.free_blocks(reversed(blocks))
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0
    assert all(b.block_hash is None for b in pool.blocks)
    assert pool.get_cached_block(hashes(1)[0]) is None
