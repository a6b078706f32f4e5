"""The encoder cache: LRU eviction of unreferenced entries, capacity in embeddings, and the
compute budget per step, first on `EncoderCacheManager` alone, then through the `Scheduler`.

Every image here fits both the cache and the budget: the input processor rejects larger ones.
"""

import zlib

import pytest
import torch

from vlm_engine.engine_config import EngineConfig
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.scheduler.encoder_cache import EncoderCacheManager
from vlm_engine.scheduler.kv_cache_manager import KVCacheManager
from vlm_engine.scheduler.scheduler import Scheduler
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.request import MultiModalFeature, Request, RequestStatus

BLOCK_SIZE = 4
EOS = 1
OUT = 1000  # a sampled token that stops nothing
IMAGE_TOKEN = 5


def make_request(request_id, num_tokens=8, images=(), **options):
    """Distinct text tokens; `images` holds `(mm_hash, groups)`, groups as `(offset, length)`
    runs of soft tokens (several runs: an image with crops, text in between)."""
    base = 10_000 * (1 + zlib.crc32(request_id.encode()) % 100_000)
    tokens = list(range(base, base + num_tokens))
    features = []
    for mm_hash, groups in images:
        for offset, length in groups:
            tokens[offset : offset + length] = [IMAGE_TOKEN] * length
        placeholder = ImagePlaceholder(tuple(ImageGroup(o, n) for o, n in groups))
        features.append(MultiModalFeature(mm_hash, placeholder, torch.zeros(1)))
    sampling = {k: options.pop(k) for k in ("max_tokens",) if k in options}
    params = SamplingParams(**{"max_tokens": 64, **sampling})
    return Request(request_id, tokens, params, frozenset({EOS}), features, **options)


def image(mm_hash, offset, length):
    """One image of `length` soft tokens in one run: `length` embeddings."""
    return mm_hash, [(offset, length)]


def make_scheduler(encoder_cache_size, encoder_compute_budget, num_blocks=64, **options):
    config = EngineConfig(
        max_num_batched_tokens=options.pop("max_num_batched_tokens", 64),
        block_size=options.pop("block_size", BLOCK_SIZE),
        encoder_cache_size=encoder_cache_size,
        encoder_compute_budget=encoder_compute_budget,
        **options,
    )
    kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
    return Scheduler(config, kv, max_model_len=4096)


def run_step(scheduler, tokens=None):
    output = scheduler.schedule()
    sampled = {c.request.request_id: OUT for c in output.chunks if c.samples}
    sampled.update(tokens or {})
    finished = scheduler.update_from_output(output, sampled)
    return output, finished


def layout(output):
    return [(c.request.request_id, c.start, c.num_tokens) for c in output.chunks]


def encoder_inputs(output):
    return {c.request.request_id: c.encoder_inputs for c in output.chunks}


R = {rid: make_request(rid) for rid in "abcdefgh"}  # owners for the manager-only tests


def cached_unreferenced(cache, *entries):
    """Compute and release `(mm_hash, size)` entries in order: the LRU, oldest first."""
    for mm_hash, size in entries:
        cache.allocate(R["a"], mm_hash, size)
        cache.release(R["a"], mm_hash)


# --- EncoderCacheManager alone ------------------------------------------------------------------


def test_a_released_entry_stays_cached_until_its_space_is_needed():
    cache = EncoderCacheManager(capacity=10, compute_budget=10)
    cached_unreferenced(cache, ("x", 4))
    assert cache.is_cached("x") and cache.take_freed() == []
    assert (cache.num_free, cache.num_reclaimable) == (6, 10)

    cache.allocate(R["b"], "y", 6)  # fits in the free space: nothing is evicted
    assert cache.is_cached("x") and cache.take_freed() == [] and cache.num_free == 0

    cache.allocate(R["c"], "z", 3)  # needs x's space now
    assert not cache.is_cached("x") and cache.take_freed() == ["x"]
    assert cache.take_freed() == []  # told once
    assert cache.num_free == 1 and set(cache.refs) == {"y", "z"}


def test_unreferenced_entries_are_evicted_oldest_first():
    cache = EncoderCacheManager(capacity=6, compute_budget=6)
    cached_unreferenced(cache, ("x", 2), ("y", 2), ("z", 2))
    assert list(cache.unreferenced) == ["x", "y", "z"]

    cache.allocate(R["b"], "w", 3)  # 3 embeddings: x is not enough, y goes too; z stays
    assert cache.take_freed() == ["x", "y"]
    assert list(cache.unreferenced) == ["z"] and cache.num_free == 1


def test_reacquiring_an_entry_takes_it_out_of_the_lru_and_its_release_makes_it_newest():
    cache = EncoderCacheManager(capacity=6, compute_budget=6)
    cached_unreferenced(cache, ("x", 2), ("y", 2), ("z", 2))
    assert cache.acquire_cached(R["b"], "x")
    assert list(cache.unreferenced) == ["y", "z"]
    assert cache.num_reclaimable == 4  # x is referenced: not reclaimable

    cache.release(R["b"], "x")
    assert list(cache.unreferenced) == ["y", "z", "x"]
    cache.allocate(R["c"], "w", 2)
    assert cache.take_freed() == ["y"]  # not x, the oldest before it was used again


def test_referenced_entries_are_never_evicted():
    cache = EncoderCacheManager(capacity=8, compute_budget=8)
    cache.allocate(R["a"], "x", 3)  # oldest, but referenced
    cached_unreferenced(cache, ("y", 3))
    assert cache.num_free == 2 and cache.num_reclaimable == 5
    assert not cache.can_allocate(6, budget_left=8)  # only by evicting x
    assert cache.can_allocate(5, budget_left=8)

    cache.allocate(R["b"], "z", 5)
    assert cache.take_freed() == ["y"]
    assert cache.refs == {"x": {"a"}, "z": {"b"}} and cache.num_reclaimable == 0
    assert not cache.can_allocate(1, budget_left=8)


def test_can_allocate_checks_the_budget_left_as_well_as_the_space():
    cache = EncoderCacheManager(capacity=8, compute_budget=4)
    assert cache.can_allocate(4, budget_left=4)
    assert not cache.can_allocate(5, budget_left=4)  # space enough, budget short
    assert not cache.can_allocate(9, budget_left=16)  # budget enough, space short


def test_an_entry_is_unreferenced_after_its_last_owner_releases_it():
    cache = EncoderCacheManager(capacity=8, compute_budget=8)
    cache.allocate(R["a"], "x", 4)
    assert cache.acquire_cached(R["b"], "x") and not cache.acquire_cached(R["b"], "nope")
    cache.release(R["c"], "x")  # not an owner: nothing happens
    cache.release(R["a"], "x")
    assert cache.refs == {"x": {"b"}} and not cache.unreferenced and cache.num_referenced() == 1
    cache.release(R["b"], "x")
    cache.release(R["b"], "x")  # twice: still listed once
    assert dict(cache.unreferenced) == {"x": 4} and cache.num_referenced() == 0


def test_release_all_releases_every_image_of_the_request():
    cache = EncoderCacheManager(capacity=16, compute_budget=16)
    request = make_request("r", 20, images=[image("x", 2, 4), image("y", 10, 4)])
    cache.allocate(request, "x", 4)
    cache.allocate(request, "y", 4)
    cache.allocate(R["b"], "z", 4)
    cache.release_all(request)
    assert list(cache.unreferenced) == ["x", "y"] and cache.refs["z"] == {"b"}


def test_stats_count_hits_misses_evictions_and_embeddings():
    cache = EncoderCacheManager(capacity=10, compute_budget=10)
    cache.allocate(R["a"], "x", 4)
    assert cache.acquire_cached(R["b"], "x")
    assert cache.acquire_cached(R["b"], "x")  # b already holds it: not a second hit
    cache.release(R["a"], "x")
    cache.release(R["b"], "x")
    assert cache.acquire_cached(R["c"], "x")  # from the LRU: a hit
    cache.release(R["c"], "x")
    cache.allocate(R["d"], "y", 5)
    assert cache.stats() == {
        "hits": 2,
        "misses": 2,
        "evictions": 0,
        "entries": 2,
        "used_embeddings": 9,  # unreferenced entries still use their space
        "capacity_embeddings": 10,
    }
    cache.allocate(R["e"], "z", 3)
    assert cache.stats()["evictions"] == 1 and cache.stats()["used_embeddings"] == 8
    assert cache.stats()["entries"] == 2


# --- through the scheduler ----------------------------------------------------------------------


def test_the_compute_budget_limits_the_new_images_of_a_step():
    scheduler = make_scheduler(encoder_cache_size=64, encoder_compute_budget=8)
    a, b, c, d = (
        make_request("a", 10, images=[image("img-a", 2, 4)]),
        make_request("b", 10, images=[image("img-b", 2, 4)]),
        make_request("c", 10, images=[image("img-c", 2, 4)]),
        make_request("d", 10, images=[image("img-a", 2, 4)]),  # a's image: no compute
    )
    for request in (a, b, c, d):
        scheduler.add_request(request)
    output, _ = run_step(scheduler)
    # a and b spend the budget: c stops before its image, d reuses a's.
    assert layout(output) == [("a", 0, 10), ("b", 0, 10), ("c", 0, 2), ("d", 0, 10)]
    assert encoder_inputs(output) == {"a": [0], "b": [0], "c": [], "d": []}
    assert not scheduler.encoder_cache.is_cached("img-c")

    output, _ = run_step(scheduler)  # a new step, a new budget
    assert layout(output) == [("a", 10, 1), ("b", 10, 1), ("c", 2, 8), ("d", 10, 1)]
    assert encoder_inputs(output)["c"] == [0]
    assert c.output_token_ids == [OUT]


def test_a_chunk_stops_before_the_first_image_over_the_budget():
    scheduler = make_scheduler(encoder_cache_size=64, encoder_compute_budget=6)
    images = [image("x", 2, 4), image("y", 8, 2), image("z", 12, 4)]
    scheduler.add_request(make_request("a", 20, images=images))
    outputs = [run_step(scheduler)[0] for _ in range(3)]
    assert [layout(o) for o in outputs] == [
        [("a", 0, 12)],  # x and y: 6 embeddings; z waits
        [("a", 12, 8)],
        [("a", 20, 1)],
    ]
    assert [o.chunks[0].encoder_inputs for o in outputs] == [[0, 1], [2], []]


def test_the_budget_and_the_capacity_count_embeddings_not_tokens():
    """An image with crops spans the text between them: 10 tokens, 8 embeddings."""
    scheduler = make_scheduler(encoder_cache_size=8, encoder_compute_budget=8)
    crops = ("crops", [(2, 4), (8, 4)])  # tokens [2, 12), of which 8 are soft tokens
    scheduler.add_request(make_request("a", 14, images=[crops]))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 14)] and output.chunks[0].encoder_inputs == [0]
    stats = scheduler.encoder_cache.stats()
    assert (stats["used_embeddings"], stats["capacity_embeddings"]) == (8, 8)
    assert dict(scheduler.encoder_cache.unreferenced) == {"crops": 8}


def test_an_image_waits_while_referenced_entries_fill_the_cache():
    scheduler = make_scheduler(encoder_cache_size=8, encoder_compute_budget=64)
    a, b = (
        make_request("a", 10, images=[image("x", 2, 6)]),
        make_request("b", 10, images=[image("y", 2, 4)]),
    )
    scheduler.add_request(a)
    scheduler.add_request(b)
    output, _ = run_step(scheduler)
    # x is referenced while a's chunk runs: y's 4 embeddings do not fit in the 2 left.
    assert layout(output) == [("a", 0, 10), ("b", 0, 2)]
    assert scheduler.encoder_cache.stats()["evictions"] == 0

    output, _ = run_step(scheduler)  # x is released now: y evicts it
    assert layout(output) == [("a", 10, 1), ("b", 2, 8)]
    assert encoder_inputs(output)["b"] == [0] and output.free_encoder_hashes == ["x"]


def test_an_image_a_chunk_reuses_is_not_counted_as_room_for_its_new_images():
    scheduler = make_scheduler(encoder_cache_size=8, encoder_compute_budget=64)
    scheduler.add_request(make_request("a", 8, images=[image("x", 2, 4)]))
    run_step(scheduler)
    assert list(scheduler.encoder_cache.unreferenced) == ["x"]

    # b needs x (cached) and y: evicting x would make room for y, but b's chunk uses x.
    images = [image("x", 2, 4), image("y", 8, 6)]
    scheduler.add_request(make_request("b", 16, images=images))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 8, 1), ("b", 0, 8)]
    assert encoder_inputs(output)["b"] == [] and output.free_encoder_hashes == []

    output, _ = run_step(scheduler)  # x is released: now it may go
    assert layout(output) == [("a", 9, 1), ("b", 8, 8)]
    assert encoder_inputs(output)["b"] == [1] and output.free_encoder_hashes == ["x"]


def test_an_image_shared_by_concurrent_requests_is_allocated_once():
    scheduler = make_scheduler(encoder_cache_size=16, encoder_compute_budget=4)
    requests = [
        make_request("a", 10, images=[image("cat", 2, 4)]),
        make_request("b", 12, images=[image("cat", 6, 4)]),  # elsewhere in its prompt
        make_request("c", 10, images=[image("cat", 2, 4)]),
    ]
    for request in requests:
        scheduler.add_request(request)
    output = scheduler.schedule()
    # One computation fits the budget: the other two take the same entry.
    assert layout(output) == [("a", 0, 10), ("b", 0, 12), ("c", 0, 10)]
    assert encoder_inputs(output) == {"a": [0], "b": [], "c": []}
    cache = scheduler.encoder_cache
    assert cache.refs == {"cat": {"a", "b", "c"}}
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["used_embeddings"]) == (2, 1, 4)

    scheduler.update_from_output(output, {r.request_id: OUT for r in requests})
    assert list(cache.unreferenced) == ["cat"]  # released by the last of the three


def test_the_same_image_twice_in_one_prompt_is_computed_once():
    scheduler = make_scheduler(encoder_cache_size=8, encoder_compute_budget=4)
    scheduler.add_request(make_request("a", 16, images=[image("cat", 2, 4), image("cat", 9, 4)]))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 16)] and output.chunks[0].encoder_inputs == [0]
    stats = scheduler.encoder_cache.stats()
    assert (stats["misses"], stats["hits"], stats["used_embeddings"]) == (1, 0, 4)


def test_a_prefix_hit_inside_an_evicted_image_waits_for_the_budget_then_recomputes_it():
    scheduler = make_scheduler(
        encoder_cache_size=32, encoder_compute_budget=32, max_num_batched_tokens=64, block_size=16
    )
    images = [image("big", 4, 32)]  # tokens [4, 36)
    a = make_request("a", 40, images=images, max_tokens=1)
    scheduler.add_request(a)
    assert [layout(run_step(scheduler)[0]) for _ in range(2)] == [[("a", 0, 40)], []]
    assert a.status == RequestStatus.FINISHED_LENGTH

    # e's image evicts big and spends the budget; b's prefix hit (two blocks) ends inside big.
    e = make_request("e", 34, images=[image("other", 0, 32)])
    b = Request("b", list(a.prompt_token_ids), SamplingParams(), frozenset({EOS}), a.mm_features)
    scheduler.add_request(e)
    scheduler.add_request(b)
    output, _ = run_step(scheduler)
    assert layout(output) == [("e", 0, 34)] and output.free_encoder_hashes == ["big"]
    assert b.status == RequestStatus.WAITING and scheduler.kv.get_block_ids("b") == []

    output, _ = run_step(scheduler)
    assert layout(output) == [("e", 34, 1), ("b", 32, 8)]
    assert encoder_inputs(output)["b"] == [0] and output.free_encoder_hashes == ["other"]
    assert b.num_cached_tokens == 32 and b.output_token_ids == [OUT]


@pytest.mark.parametrize("encoder_cache_size, evicted", [(8, False), (4, True)])
def test_a_preempted_request_takes_its_image_from_the_cache_unless_it_was_evicted(
    encoder_cache_size, evicted
):
    scheduler = make_scheduler(
        encoder_cache_size=encoder_cache_size,
        encoder_compute_budget=8,
        num_blocks=6,
        enable_prefix_caching=False,  # b recomputes its image's tokens from the start
        scheduling_policy="priority",
    )
    a = make_request("a", 8, priority=0, arrival_time=0.0, max_tokens=6)
    b = make_request("b", 8, images=[image("cat", 2, 4)], priority=1, arrival_time=1.0)
    scheduler.add_request(a)
    scheduler.add_request(b)
    output, _ = run_step(scheduler)
    assert encoder_inputs(output) == {"a": [], "b": [0]}
    for _ in range(4):
        run_step(scheduler)
    assert scheduler.kv.num_free_blocks == 0

    output, finished = run_step(scheduler)  # a needs a 4th block: b is preempted, then a ends
    assert output.preempted_ids == ["b"] and finished == [a]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    cache = scheduler.encoder_cache
    assert list(cache.unreferenced) == ["cat"]

    # d comes first (a higher priority); its dog evicts cat when the cache holds only one.
    d = make_request("d", 6, images=[image("dog", 0, 4)], priority=0, arrival_time=2.0)
    scheduler.add_request(d)
    output, _ = run_step(scheduler)
    assert encoder_inputs(output)["d"] == [0]
    if not evicted:
        assert layout(output) == [("d", 0, 6), ("b", 0, 13)]
        assert encoder_inputs(output)["b"] == [] and output.free_encoder_hashes == []
        assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    else:
        # cat is gone and dog is in use: b stops before its image, then recomputes it.
        assert layout(output) == [("d", 0, 6), ("b", 0, 2)]
        assert output.free_encoder_hashes == ["cat"]
        output, _ = run_step(scheduler)
        assert layout(output) == [("d", 6, 1), ("b", 2, 11)]
        assert encoder_inputs(output)["b"] == [0] and output.free_encoder_hashes == ["dog"]
        assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 3
    assert b.num_computed_tokens == 13 and b.output_token_ids == [OUT] * 6
