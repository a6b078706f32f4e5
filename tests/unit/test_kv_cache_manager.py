import pytest
import torch

from vlm_engine.sampling_params import SamplingParams
from vlm_engine.scheduler.kv_cache_manager import KVCacheManager
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.request import MultiModalFeature, Request

BLOCK_SIZE = 4


def make_request(request_id, token_ids, images=()):
    features = [
        MultiModalFeature(mm_hash, ImagePlaceholder((ImageGroup(offset, length),)), torch.zeros(1))
        for mm_hash, offset, length in images
    ]
    return Request(request_id, list(token_ids), SamplingParams(), frozenset(), features)


def prefill(manager, request):
    """Schedule a whole prompt the way the scheduler does; returns the hit in tokens."""
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    num_new_tokens = request.num_tokens - num_hit_tokens
    assert manager.allocate_slots(request, num_new_tokens, hits, num_hit_tokens) is not None
    request.num_computed_tokens = request.num_tokens
    return num_hit_tokens


def snapshot(manager):
    pool = manager.block_pool
    return (
        pool.free_block_ids(),
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        {rid: list(blocks) for rid, blocks in manager.req_to_blocks.items()},
        pool.num_cached_blocks,
    )


def test_a_full_hit_stops_one_block_short_of_the_last_token():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_request("a", range(12))
    prefill(manager, first)
    first_block_ids = manager.get_block_ids("a")
    manager.free(first)

    again = make_request("b", range(12))
    hits, num_hit_tokens = manager.get_computed_blocks(again)
    assert num_hit_tokens == 8  # block 2 holds the last token, so it is computed again
    assert [b.block_id for b in hits] == first_block_ids[:2] == [0, 1]

    longer = make_request("c", range(13))
    hits, num_hit_tokens = manager.get_computed_blocks(longer)
    assert num_hit_tokens == 12
    assert [b.block_id for b in hits] == [0, 1, 2]


def test_a_hit_covers_only_the_shared_full_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_request("a", range(12)))
    diverges = make_request("b", [0, 1, 2, 3, 4, 5, 60, 70, 8, 9, 10, 11, 12])
    hits, num_hit_tokens = manager.get_computed_blocks(diverges)
    assert (len(hits), num_hit_tokens) == (1, 4)
    assert manager.get_computed_blocks(make_request("c", [7] + list(range(1, 12)))) == ([], 0)


def test_no_hits_with_prefix_caching_off():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_request("a", range(12))
    prefill(manager, first)
    assert manager.block_pool.num_cached_blocks == 0
    manager.free(first)
    assert manager.get_computed_blocks(make_request("b", range(12))) == ([], 0)
    assert manager.prefix_cache_stats()["queries"] == 0


def test_freed_blocks_still_hit_until_new_allocations_evict_them():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    first = make_request("a", range(12))
    prefill(manager, first)
    manager.free(first)
    # Freed last block first: the request's longest-prefix block is the next cached one evicted.
    assert manager.block_pool.free_block_ids() == [3, 4, 5, 2, 1, 0]

    second = make_request("b", range(13))
    assert prefill(manager, second) == 12
    assert manager.get_block_ids("b")[:3] == [0, 1, 2]
    assert manager.num_free_blocks == 2  # three resurrected hits plus one new block
    manager.free(second)

    # A request filling the pool takes every free block, cached ones included.
    filler = make_request("filler", range(100, 124))
    assert prefill(manager, filler) == 0
    manager.free(filler)
    assert manager.get_computed_blocks(make_request("c", range(13))) == ([], 0)
    assert manager.block_pool.num_evictions == 3  # blocks 0-2; block 3 had no hash


def test_two_running_requests_share_prefix_blocks():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    first = make_request("a", range(12))
    prefill(manager, first)
    second = make_request("b", range(20))
    # The hits are held by the first request, so only the two new blocks need free ones.
    assert prefill(manager, second) == 12
    shared = manager.req_to_blocks["a"]
    assert manager.req_to_blocks["b"][:3] == shared
    assert [b.ref_cnt for b in shared] == [2, 2, 2]
    assert manager.num_free_blocks == 0

    manager.free(first)
    assert [b.ref_cnt for b in shared] == [1, 1, 1]
    assert manager.num_free_blocks == 0
    manager.free(second)
    assert manager.all_blocks_free()


def test_allocate_returns_none_and_changes_nothing_when_short():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    running = make_request("a", range(8))
    prefill(manager, running)
    before = snapshot(manager)
    assert manager.allocate_slots(make_request("b", range(50, 62)), 12) is None
    assert snapshot(manager) == before
    assert manager.get_block_ids("b") == []


def test_free_hit_blocks_count_against_the_free_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_request("a", range(12))
    prefill(manager, first)
    manager.free(first)

    # 3 cached hits (free, ref_cnt 0) + 2 new blocks = 5 blocks of a 4-block pool.
    request = make_request("b", range(20))
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    assert num_hit_tokens == 12
    assert not manager.can_fit(request, 8, hits, num_hit_tokens)
    before = snapshot(manager)
    assert manager.allocate_slots(request, 8, hits, num_hit_tokens) is None
    assert snapshot(manager) == before
    assert manager.get_computed_blocks(request)[1] == 12  # the hits are still cached


def test_chunked_prefill_caches_only_blocks_full_after_the_chunk():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", range(10))
    new_blocks = manager.allocate_slots(request, 6)
    assert [b.block_id for b in new_blocks] == [0, 1]
    hashes = request.block_hashes
    assert manager.block_pool.get_cached_block(hashes[0]) is new_blocks[0]
    assert manager.block_pool.get_cached_block(hashes[1]) is None

    request.num_computed_tokens = 6
    assert [b.block_id for b in manager.allocate_slots(request, 4)] == [2]
    assert manager.block_pool.get_cached_block(hashes[1]) is new_blocks[1]
    assert manager.get_block_ids("a") == [0, 1, 2]


def test_decoded_tokens_fill_and_cache_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", range(6))
    prefill(manager, request)
    for token in (6, 7, 8):
        request.append_output_token(token)
        # One token per decode step: it needs a block only when it starts one.
        expected = 1 if request.num_computed_tokens % BLOCK_SIZE == 0 else 0
        assert len(manager.allocate_slots(request, 1)) == expected
        request.num_computed_tokens += 1
    assert manager.get_block_ids("a") == [0, 1, 2]

    follower = make_request("b", range(9))
    assert manager.get_computed_blocks(follower)[1] == 8  # block 1 was filled by decoding


def test_a_different_image_in_the_same_tokens_misses():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    tokens = [0, 1, 2, 3, 4] + [99] * 6 + [11, 12, 13]
    prefill(manager, make_request("a", tokens, images=[("cat", 5, 6)]))
    same = make_request("b", tokens, images=[("cat", 5, 6)])
    other = make_request("c", tokens, images=[("dog", 5, 6)])
    assert manager.get_computed_blocks(same)[1] == 12
    assert manager.get_computed_blocks(other)[1] == 4  # block [4, 8) holds the image


def test_free_is_idempotent_and_everything_ends_free():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    requests = [make_request(str(i), range(i, i + 9)) for i in range(3)]
    for request in requests:
        prefill(manager, request)
    assert not manager.all_blocks_free()
    assert manager.usage == pytest.approx(0.9)
    for request in requests:
        manager.free(request)
        manager.free(request)
    assert manager.all_blocks_free()
    assert manager.usage == 0.0
    assert manager.get_block_ids("0") == []


def test_reset_prefix_cache_needs_every_request_freed():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", range(9))
    prefill(manager, request)
    assert manager.reset_prefix_cache() is False
    manager.free(request)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_request("b", range(9))) == ([], 0)


def test_prefix_cache_stats_count_tokens():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    assert manager.prefix_cache_stats() == {"queries": 0, "hits": 0, "hit_rate": 0.0}
    prefill(manager, make_request("a", range(12)))  # 12 queried, 0 hit
    prefill(manager, make_request("b", range(13)))  # 13 queried, 12 hit
    stats = manager.prefix_cache_stats()
    assert (stats["queries"], stats["hits"]) == (25, 12)
    assert stats["hit_rate"] == pytest.approx(12 / 25)


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=0, block_size=4)
