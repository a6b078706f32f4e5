"""The scheduler's decisions, step by step, over the real KVCacheManager (no model, no runner).

Each test builds `Request`s by hand and drives `schedule()` / `update_from_output()` the way the
engine core does, sampling `OUT` (a token that stops nothing) for every chunk that samples.
The encoder cache's own rules (LRU eviction, capacity, compute budget) are in test_encoder_cache.py.
"""

import random
import zlib

import pytest
import torch

from vlm_engine.engine_config import EngineConfig
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.scheduler.kv_cache_manager import KVCacheManager
from vlm_engine.scheduler.scheduler import Scheduler
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.request import MultiModalFeature, Request, RequestStatus

BLOCK_SIZE = 4
EOS = 1
OUT = 1000  # a sampled token that is neither EOS nor a stop token
IMAGE_TOKEN = 5


def make_scheduler(num_blocks=64, max_model_len=4096, **options):
    """A scheduler whose encoder cache and compute budget are roomy unless a test says otherwise."""
    options = {
        "max_num_batched_tokens": 64,
        "block_size": BLOCK_SIZE,
        "encoder_cache_size": 256,
        "encoder_compute_budget": 256,
        **options,
    }
    config = EngineConfig(**options)
    kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
    return Scheduler(config, kv, max_model_len)


def make_request(
    request_id, num_tokens=8, *, tokens=None, images=(), priority=0, arrival_time=None, **sampling
):
    """A request of distinct text tokens (per id) whose image spans hold IMAGE_TOKEN.

    `images` holds `(mm_hash, offset, length)`; `sampling` goes to SamplingParams
    (max_tokens defaults to 64 so that length never ends a test by accident).
    """
    if tokens is None:
        base = 10_000 * (1 + zlib.crc32(request_id.encode()) % 100_000)
        tokens = list(range(base, base + num_tokens))
        for _, offset, length in images:
            tokens[offset : offset + length] = [IMAGE_TOKEN] * length
    features = [
        MultiModalFeature(mm_hash, ImagePlaceholder((ImageGroup(offset, length),)), torch.zeros(1))
        for mm_hash, offset, length in images
    ]
    params = SamplingParams(**{"max_tokens": 64, **sampling})
    extra = {} if arrival_time is None else {"arrival_time": arrival_time}
    return Request(
        request_id, list(tokens), params, frozenset({EOS}), features, priority=priority, **extra
    )


def add(scheduler, *requests):
    for request in requests:
        scheduler.add_request(request)
    return requests


def run_step(scheduler, token=OUT, tokens=None):
    """One engine step: schedule, sample `token` (or `tokens[id]`) where a chunk samples.

    `chunk.samples` compares with the request's current length, so it is read before the update.
    """
    output = scheduler.schedule()
    tokens = tokens or {}
    sampled = {
        c.request.request_id: tokens.get(c.request.request_id, token)
        for c in output.chunks
        if c.samples
    }
    finished = scheduler.update_from_output(output, sampled)
    return output, finished


def layout(output):
    """(request id, start, num_tokens) of each chunk, in batch order."""
    return [(c.request.request_id, c.start, c.num_tokens) for c in output.chunks]


def chunk_of(output, request_id):
    (chunk,) = [c for c in output.chunks if c.request.request_id == request_id]
    return chunk


# --- one token budget, chunked prefill ---------------------------------------------------------


def test_a_long_prompt_is_chunked_and_running_requests_go_before_waiting_ones():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    (a,) = add(scheduler, make_request("a", 20))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 8)]
    assert not output.chunks[0].samples and a.num_output_tokens == 0

    (b,) = add(scheduler, make_request("b", 4))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 8, 8)]  # the running prefill takes the whole budget
    assert b.status == RequestStatus.WAITING and list(scheduler.waiting) == [b]

    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 16, 4), ("b", 0, 4)]
    assert a.output_token_ids == b.output_token_ids == [OUT]  # both chunks sampled
    assert a.num_computed_tokens == 20 and a.output_token_ids == [OUT]

    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 20, 1), ("b", 4, 1)]


def test_decodes_and_prefill_chunks_share_one_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    add(scheduler, make_request("a", 3), make_request("b", 3))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 3), ("b", 0, 3)]

    (c,) = add(scheduler, make_request("c", 30))
    steps = [layout(run_step(scheduler)[0]) for _ in range(4)]
    assert steps == [
        [("a", 3, 1), ("b", 3, 1), ("c", 0, 8)],
        [("a", 4, 1), ("b", 4, 1), ("c", 8, 8)],
        [("a", 5, 1), ("b", 5, 1), ("c", 16, 8)],
        [("a", 6, 1), ("b", 6, 1), ("c", 24, 6)],
    ]
    assert c.num_computed_tokens == 30 and c.num_output_tokens == 1


# --- image spans are never split ---------------------------------------------------------------


def test_a_chunk_stops_before_an_image_then_takes_it_whole():
    scheduler = make_scheduler(max_num_batched_tokens=14)
    add(scheduler, make_request("a", 30, images=[("img", 10, 8)]))  # image tokens [10, 18)
    first, _ = run_step(scheduler)
    second, _ = run_step(scheduler)
    third, _ = run_step(scheduler)
    assert [layout(o) for o in (first, second, third)] == [
        [("a", 0, 10)],  # 14 tokens would end inside the image
        [("a", 10, 14)],
        [("a", 24, 6)],
    ]
    assert [o.chunks[0].encoder_inputs for o in (first, second, third)] == [[], [0], []]


def test_an_image_larger_than_the_remaining_budget_waits_for_a_later_step():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    a, b = add(
        scheduler,
        make_request("a", 4, max_tokens=2),
        make_request("b", 16, images=[("img", 2, 10)]),
    )
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 4), ("b", 0, 2)]  # b stops before its image

    output, finished = run_step(scheduler)
    assert layout(output) == [("a", 4, 1)]  # 9 tokens left: b's 10-token image waits
    assert finished == [a]
    assert b.status == RequestStatus.RUNNING and b.num_computed_tokens == 2

    output, _ = run_step(scheduler)
    assert layout(output) == [("b", 2, 10)]
    assert output.chunks[0].encoder_inputs == [0]
    output, _ = run_step(scheduler)
    assert layout(output) == [("b", 12, 4)] and b.output_token_ids == [OUT]


def test_a_prefix_hit_ending_inside_an_image_is_followed_by_the_rest_of_the_image_whole():
    scheduler = make_scheduler(max_num_batched_tokens=32, block_size=16)
    images = [("img", 4, 32)]  # image tokens [4, 36)
    (a,) = add(scheduler, make_request("a", 40, images=images, max_tokens=1))
    assert [layout(run_step(scheduler)[0]) for _ in range(3)] == [
        [("a", 0, 4)],
        [("a", 4, 32)],
        [("a", 36, 4)],
    ]
    assert a.status == RequestStatus.FINISHED_LENGTH

    # b repeats a's prompt: its hit is a's two full blocks, 32 tokens, 4 short of the image end.
    d, b = add(
        scheduler,
        make_request("d", 30),
        make_request("b", tokens=a.prompt_token_ids, images=images),
    )
    output, _ = run_step(scheduler)
    assert layout(output) == [("d", 0, 30)]  # 2 tokens left would split b's image
    assert b.status == RequestStatus.WAITING and scheduler.kv.get_block_ids("b") == []

    output, _ = run_step(scheduler)
    assert layout(output) == [("d", 30, 1), ("b", 32, 8)]
    chunk = chunk_of(output, "b")
    # The rest of the image needs its embeddings: a's are still cached, so nothing is encoded.
    assert chunk.encoder_inputs == [] and output.free_encoder_hashes == []
    assert scheduler.encoder_cache.stats()["hits"] == 1
    assert b.output_token_ids == [OUT] and b.num_cached_tokens == 32


# --- admission: max_num_seqs and order ---------------------------------------------------------


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    a, b, c = add(
        scheduler, make_request("a", 4, max_tokens=1), make_request("b", 4), make_request("c", 4)
    )
    output, finished = run_step(scheduler)
    assert layout(output) == [("a", 0, 4), ("b", 0, 4)]
    assert c.status == RequestStatus.WAITING
    assert finished == [a]

    output, _ = run_step(scheduler)
    assert layout(output) == [("b", 4, 1), ("c", 0, 4)]
    assert [r.request_id for r in scheduler.running] == ["b", "c"]


def test_fcfs_admits_in_arrival_order_whatever_the_priority():
    scheduler = make_scheduler(max_num_seqs=2)
    add(
        scheduler,
        make_request("first", 4, priority=3),
        make_request("second", 4, priority=1),
        make_request("third", 4, priority=0),
    )
    output = scheduler.schedule()
    assert [c.request.request_id for c in output.chunks] == ["first", "second"]
    assert [r.request_id for r in scheduler.waiting] == ["third"]


def test_priority_policy_admits_lower_values_first_then_earlier_arrivals():
    scheduler = make_scheduler(max_num_seqs=3, scheduling_policy="priority")
    add(
        scheduler,
        make_request("late0", 4, priority=0, arrival_time=2.0),
        make_request("p2", 4, priority=2, arrival_time=0.0),
        make_request("early0", 4, priority=0, arrival_time=1.0),
        make_request("p1", 4, priority=1, arrival_time=0.5),
    )
    output = scheduler.schedule()
    assert [c.request.request_id for c in output.chunks] == ["early0", "late0", "p1"]
    assert [r.request_id for r in scheduler.waiting] == ["p2"]


# --- preemption ---------------------------------------------------------------------------------


def schedule_a_preemption(enable_prefix_caching):
    """Two 8-token prompts fill a 6-block pool; at 13 tokens `a` needs a 4th block.

    Returns the step that preempts, scheduled but not yet updated.
    """
    scheduler = make_scheduler(num_blocks=6, enable_prefix_caching=enable_prefix_caching)
    a, b = add(scheduler, make_request("a", 8, max_tokens=6), make_request("b", 8))
    for _ in range(5):
        output, _ = run_step(scheduler)
        assert output.preempted_ids == []
    assert scheduler.kv.num_free_blocks == 0 and a.num_tokens == b.num_tokens == 13
    (c,) = add(scheduler, make_request("c", 4))
    return scheduler, scheduler.schedule(), (a, b, c)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_requeues_the_last_running_request_at_the_front(enable_prefix_caching):
    scheduler, output, (a, b, c) = schedule_a_preemption(enable_prefix_caching)
    assert output.preempted_ids == ["b"]
    assert layout(output) == [("a", 12, 1)]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert scheduler.num_preemptions == 1
    assert scheduler.kv.get_block_ids("b") == []
    assert scheduler.kv.num_free_blocks == 2  # b's 3 blocks, less the one a took
    assert list(scheduler.waiting) == [b, c]
    # A step that preempted admits nobody (the priority test shows it with a request that fits).
    assert c.status == RequestStatus.WAITING and scheduler.kv.get_block_ids("c") == []
    assert scheduler.running == [a]


@pytest.mark.parametrize("enable_prefix_caching, expected_start", [(True, 8), (False, 0)])
def test_a_preempted_request_recomputes_its_prompt_and_outputs(
    enable_prefix_caching, expected_start
):
    scheduler, output, (a, b, c) = schedule_a_preemption(enable_prefix_caching)
    finished = scheduler.update_from_output(output, {"a": OUT})
    assert finished == [a]  # its 6th token: the pool is free for b again
    computed = list(b.all_token_ids)
    assert computed == b.prompt_token_ids + [OUT] * 5

    output, _ = run_step(scheduler)
    assert [c.request.request_id for c in output.chunks] == ["b", "c"]
    chunk = chunk_of(output, "b")
    # With prefix caching, b's first two blocks are still cached (its third was evicted by a).
    assert (chunk.start, chunk.end) == (expected_start, len(computed))
    assert chunk.request.all_token_ids[: chunk.end] == computed
    assert b.status == RequestStatus.RUNNING
    assert b.num_computed_tokens == len(computed)
    assert b.output_token_ids == [OUT] * 6 and b.num_preemptions == 1


def test_priority_policy_preempts_the_lowest_priority_request():
    scheduler = make_scheduler(num_blocks=5, scheduling_policy="priority")
    (low,) = add(scheduler, make_request("low", 8, priority=5, arrival_time=0.0))
    run_step(scheduler)
    (high,) = add(scheduler, make_request("high", 7, priority=0, arrival_time=1.0))
    run_step(scheduler)  # low: 3 blocks, high: 2 blocks, none free
    assert scheduler.kv.num_free_blocks == 0
    run_step(scheduler)  # high reaches 8 tokens, low 11: still no new block
    (urgent,) = add(scheduler, make_request("urgent", 4, priority=0, arrival_time=2.0))
    output = scheduler.schedule()  # high needs a 3rd block
    assert output.preempted_ids == ["low"]  # admitted first, but the lower priority
    assert layout(output) == [("high", 8, 1)]
    assert low.status == RequestStatus.PREEMPTED and scheduler.running == [high]
    # urgent is first in line and would fit in the 2 free blocks, but this step preempted.
    assert set(scheduler.waiting) == {urgent, low} and scheduler.kv.num_free_blocks == 2
    assert urgent.status == RequestStatus.WAITING

    scheduler.update_from_output(output, {"high": OUT})
    output = scheduler.schedule()
    assert layout(output) == [("high", 9, 1), ("urgent", 0, 4)]
    assert list(scheduler.waiting) == [low]  # low no longer fits


def test_a_request_that_cannot_get_a_block_preempts_itself_when_it_is_last():
    scheduler = make_scheduler(num_blocks=2)
    (a,) = add(scheduler, make_request("a", 8))
    run_step(scheduler)
    output, _ = run_step(scheduler)  # 9 tokens need a 3rd block
    assert output.preempted_ids == ["a"] and output.chunks == []
    assert a.status == RequestStatus.PREEMPTED and list(scheduler.waiting) == [a]
    assert scheduler.kv.all_blocks_free()


# --- encoder inputs -----------------------------------------------------------------------------


def test_an_image_is_listed_once_in_the_chunk_that_overlaps_it():
    scheduler = make_scheduler(max_num_batched_tokens=12)
    images = [("x", 2, 4), ("y", 8, 4), ("z", 20, 6)]
    add(scheduler, make_request("a", 30, images=images))
    outputs = [run_step(scheduler)[0] for _ in range(4)]
    assert [layout(o) for o in outputs] == [
        [("a", 0, 12)],
        [("a", 12, 8)],  # stops before z
        [("a", 20, 10)],
        [("a", 30, 1)],
    ]
    assert [o.chunks[0].encoder_inputs for o in outputs] == [[0, 1], [], [2], []]


def test_requests_sharing_an_image_in_one_step_encode_it_once():
    scheduler = make_scheduler()
    cache = scheduler.encoder_cache
    add(scheduler, *(make_request(rid, 10, images=[("cat", 2, 4)]) for rid in ("a", "b")))
    output = scheduler.schedule()
    assert [c.encoder_inputs for c in output.chunks] == [[0], []]
    assert cache.refs == {"cat": {"a", "b"}}
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "entries": 1,
        "used_embeddings": 4,
        "capacity_embeddings": 256,
    }

    scheduler.update_from_output(output, {"a": OUT, "b": OUT})
    assert cache.refs == {"cat": set()} and dict(cache.unreferenced) == {"cat": 4}
    assert cache.num_referenced() == 0
    assert scheduler.schedule().free_encoder_hashes == []  # unreferenced, but still cached


def test_encoder_refs_are_released_once_the_whole_image_is_computed():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    cache = scheduler.encoder_cache
    add(scheduler, make_request("a", 20, images=[("dog", 8, 6)]))
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 0, 8)] and cache.refs == {}

    output = scheduler.schedule()
    assert layout(output) == [("a", 8, 8)] and output.chunks[0].encoder_inputs == [0]
    assert cache.refs == {"dog": {"a"}} and output.free_encoder_hashes == []
    assert cache.num_referenced() == 1 and not cache.unreferenced
    scheduler.update_from_output(output, {})
    assert cache.refs == {"dog": set()} and list(cache.unreferenced) == ["dog"]
    assert cache.num_referenced() == 0

    # Kept for a later request: the runner is never told to drop it while nothing needs room.
    for _ in range(2):
        output, _ = run_step(scheduler)
        assert output.free_encoder_hashes == [] and cache.is_cached("dog")


def test_a_released_image_scheduled_again_is_a_cache_hit():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, make_request("a", 8, images=[("cat", 2, 4)]))
    run_step(scheduler)  # a computes and releases cat
    add(scheduler, make_request("b", 8, images=[("cat", 2, 4)]))
    output, _ = run_step(scheduler)
    assert chunk_of(output, "b").encoder_inputs == [] and output.free_encoder_hashes == []
    assert scheduler.encoder_cache.refs == {"cat": set()}  # b computed it too, and released it
    stats = scheduler.encoder_cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)


def test_an_evicted_image_scheduled_again_is_listed_again_with_its_free():
    """The runner frees before it encodes, so a hash both freed and needed is encoded afresh."""
    scheduler = make_scheduler(encoder_cache_size=8)
    cache = scheduler.encoder_cache
    add(scheduler, make_request("a", 8, images=[("cat", 2, 4)]))
    run_step(scheduler)
    add(scheduler, make_request("b", 8, images=[("owl", 2, 4)]))
    run_step(scheduler)
    assert list(cache.unreferenced) == ["cat", "owl"] and cache.num_free == 0

    # c's dog evicts cat (the older); d's cat, needed again in the same step, evicts owl.
    add(
        scheduler,
        make_request("c", 8, images=[("dog", 2, 4)]),
        make_request("d", 8, images=[("cat", 2, 4)]),
    )
    output, _ = run_step(scheduler)
    assert layout(output) == [("a", 9, 1), ("b", 8, 1), ("c", 0, 8), ("d", 0, 8)]
    assert output.free_encoder_hashes == ["cat", "owl"]
    assert [chunk_of(output, rid).encoder_inputs for rid in "cd"] == [[0], [0]]
    assert set(cache.refs) == {"dog", "cat"} and cache.stats()["evictions"] == 2


# --- stop conditions ----------------------------------------------------------------------------


def decode(scheduler, request, tokens):
    """Sample `tokens` for `request` one step at a time; the statuses after each step."""
    statuses = []
    for token in tokens:
        run_step(scheduler, tokens={request.request_id: token})
        statuses.append(request.status)
    return statuses


def assert_freed(scheduler, request):
    assert request not in scheduler.running and request not in scheduler.waiting
    assert request.request_id not in scheduler.requests
    assert scheduler.kv.get_block_ids(request.request_id) == []
    assert scheduler.kv.all_blocks_free()


def test_eos_stops_only_once_min_tokens_are_out():
    scheduler = make_scheduler()
    (a,) = add(scheduler, make_request("a", 8, min_tokens=2))
    assert decode(scheduler, a, [EOS, EOS]) == [
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_STOPPED,
    ]
    assert a.output_token_ids == [EOS, EOS]
    assert a.stop_reason is None and a.finish_reason == "stop"
    assert_freed(scheduler, a)


def test_ignore_eos_runs_to_max_tokens():
    scheduler = make_scheduler()
    (a,) = add(scheduler, make_request("a", 8, ignore_eos=True, max_tokens=3))
    assert decode(scheduler, a, [EOS] * 3) == [RequestStatus.RUNNING] * 2 + [
        RequestStatus.FINISHED_LENGTH
    ]
    assert a.output_token_ids == [EOS] * 3


def test_a_stop_token_stops_and_sets_stop_reason():
    scheduler = make_scheduler()
    (a,) = add(scheduler, make_request("a", 8, stop_token_ids=[7], min_tokens=2))
    statuses = decode(scheduler, a, [7, 9, 7])
    assert statuses == [RequestStatus.RUNNING] * 2 + [RequestStatus.FINISHED_STOPPED]
    assert a.stop_reason == 7 and a.output_token_ids == [7, 9, 7]
    assert_freed(scheduler, a)


def test_max_tokens_finishes_with_length():
    scheduler = make_scheduler()
    (a,) = add(scheduler, make_request("a", 8, max_tokens=3))
    output, finished = run_step(scheduler)
    assert finished == []
    run_step(scheduler)
    output, finished = run_step(scheduler)
    assert finished == [a] and a.status == RequestStatus.FINISHED_LENGTH
    assert a.num_output_tokens == 3 and a.finish_reason == "length"
    assert_freed(scheduler, a)


def test_reaching_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=10)
    (a,) = add(scheduler, make_request("a", 8, max_tokens=50))
    assert decode(scheduler, a, [OUT, OUT]) == [
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_LENGTH,
    ]
    assert a.num_tokens == 10
    assert_freed(scheduler, a)


# --- finish() -----------------------------------------------------------------------------------


def test_finish_frees_a_waiting_a_running_and_a_preempted_request():
    scheduler = make_scheduler(num_blocks=6)
    a, b = add(scheduler, make_request("a", 8), make_request("b", 8))
    for _ in range(5):
        run_step(scheduler)
    (c,) = add(scheduler, make_request("c", 4))
    output, _ = run_step(scheduler)
    assert output.preempted_ids == ["b"]
    assert (a.status, b.status, c.status) == (
        RequestStatus.RUNNING,
        RequestStatus.PREEMPTED,
        RequestStatus.WAITING,
    )

    scheduler.finish(c, RequestStatus.FINISHED_ABORTED)
    assert list(scheduler.waiting) == [b]
    scheduler.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.waiting
    assert scheduler.kv.num_free_blocks == 2
    scheduler.finish(a, RequestStatus.FINISHED_ABORTED)
    scheduler.finish(a, RequestStatus.FINISHED_ERROR)  # a second finish changes nothing
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    assert not scheduler.has_unfinished() and scheduler.requests == {}
    assert scheduler.kv.all_blocks_free()


def test_a_request_finished_while_its_step_runs_is_skipped_and_releases_its_image():
    scheduler = make_scheduler()
    a, b = add(scheduler, make_request("a", 10, images=[("cat", 2, 4)]), make_request("b", 6))
    output = scheduler.schedule()
    cache = scheduler.encoder_cache
    assert cache.refs == {"cat": {"a"}}
    scheduler.finish(a, RequestStatus.FINISHED_ABORTED)
    assert cache.refs == {"cat": set()} and list(cache.unreferenced) == ["cat"]

    finished = scheduler.update_from_output(output, {"a": OUT, "b": OUT})
    assert finished == []
    assert a.output_token_ids == [] and a.num_pending == 0  # its token is dropped
    assert b.num_computed_tokens == 6 and b.output_token_ids == [OUT] and b.num_pending == 0
    assert cache.num_referenced() == 0

    # The runner encoded cat in that step: a later request with it is a hit.
    (c,) = add(scheduler, make_request("c", 10, images=[("cat", 2, 4)]))
    output = scheduler.schedule()
    assert output.free_encoder_hashes == [] and chunk_of(output, "c").encoder_inputs == []


# --- a random workload against the invariants ---------------------------------------------------

IMAGE_LENGTHS = {"cat": 4, "dog": 6, "owl": 8}
SYSTEM_PROMPT = list(range(100, 112))  # shared by some prompts, for prefix hits


def random_request(rng, index):
    tokens = list(SYSTEM_PROMPT) if rng.random() < 0.5 else []
    images = []
    for _ in range(rng.randint(0, 2)):
        tokens += [rng.randrange(200, 300) for _ in range(rng.randint(1, 5))]
        mm_hash = rng.choice(sorted(IMAGE_LENGTHS))
        images.append((mm_hash, len(tokens), IMAGE_LENGTHS[mm_hash]))
        tokens += [IMAGE_TOKEN] * IMAGE_LENGTHS[mm_hash]
    tokens += [rng.randrange(200, 300) for _ in range(rng.randint(1, 6))]
    return make_request(
        f"r{index}",
        tokens=tokens,
        images=images,
        priority=rng.randint(0, 2),
        arrival_time=float(index),
        max_tokens=rng.randint(1, 8),
    )


def check_step(scheduler, output, running_before):
    config = scheduler.config
    cache = scheduler.encoder_cache
    assert output.num_tokens <= config.max_num_batched_tokens
    encoded = [c.request.mm_features[i] for c in output.chunks for i in c.encoder_inputs]
    assert len({f.mm_hash for f in encoded}) == len(encoded)  # each image encoded once
    assert sum(f.placeholder.num_embeds for f in encoded) <= config.encoder_compute_budget
    assert sum(cache.sizes.values()) == cache.capacity - cache.num_free <= cache.capacity
    assert set(cache.unreferenced) == {h for h, owners in cache.refs.items() if not owners}
    assert len(scheduler.running) <= config.max_num_seqs
    ids = [c.request.request_id for c in output.chunks]
    assert len(set(ids)) == len(ids) and not set(ids) & set(output.preempted_ids)
    admitted = [rid not in running_before for rid in ids]
    assert admitted == sorted(admitted)  # running requests first
    if output.preempted_ids:
        assert not any(admitted)
    for chunk in output.chunks:
        assert chunk.num_tokens > 0 and chunk.end == chunk.request.num_computed_tokens
        assert len(chunk.block_ids) * config.block_size >= chunk.end
        for feature in chunk.request.mm_features:
            assert not feature.offset < chunk.end < feature.offset + feature.length


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_workload_keeps_the_invariants_and_frees_everything(seed, policy, overlap):
    """`overlapped` schedules each step before the previous one's tokens come back (async
    scheduling): pending tokens, preemption and aborts of requests whose step is in flight."""
    rng = random.Random(seed)
    # The cache holds two of the three images (not dog with owl); a step computes cat and dog, or
    # owl alone. With 24 tokens a step, both limits bind, not only the token budget.
    scheduler = make_scheduler(
        num_blocks=16,
        max_num_batched_tokens=24,
        max_num_seqs=4,
        scheduling_policy=policy,
        encoder_cache_size=12,
        encoder_compute_budget=10,
    )
    cache = scheduler.encoder_cache
    requests = [random_request(rng, i) for i in range(32)]
    pending = list(requests)
    runner_cache: set[str] = set()  # what the model runner holds: drops evictions, then encodes
    aborted = set()
    in_flight = None  # overlapped: the step whose tokens are not back yet
    for _ in range(2000):
        for _ in range(rng.randint(0, 2)):
            if pending:
                scheduler.add_request(pending.pop(0))
        if rng.random() < 0.03 and scheduler.requests:
            victim = scheduler.requests[rng.choice(sorted(scheduler.requests))]
            scheduler.finish(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim.request_id)
        if not (pending or scheduler.has_unfinished() or in_flight):
            break
        running_before = {r.request_id for r in scheduler.running}
        output = scheduler.schedule()
        check_step(scheduler, output, running_before)
        assert runner_cache >= set(output.free_encoder_hashes)  # only what it holds is evicted
        runner_cache -= set(output.free_encoder_hashes)
        for chunk in output.chunks:
            for i in chunk.encoder_inputs:
                assert chunk.request.mm_features[i].mm_hash not in runner_cache  # no recompute
                runner_cache.add(chunk.request.mm_features[i].mm_hash)
        assert runner_cache == set(cache.refs)  # the runner holds exactly the books' entries
        for chunk in output.chunks:
            for feature in chunk.request.mm_features:
                if feature.offset < chunk.end and chunk.start < feature.offset + feature.length:
                    assert chunk.request.request_id in cache.refs[feature.mm_hash]
        if overlap:  # an empty step is not launched
            output, in_flight = in_flight, (output if output.chunks else None)
        if output is not None:
            sampled = {c.request.request_id: OUT for c in output.chunks if c.samples}
            scheduler.update_from_output(output, sampled)
        # Referenced only while still needed (or used by the step in flight).
        flying = {c.request.request_id: c.start for c in in_flight.chunks} if in_flight else {}
        for mm_hash, owners in cache.refs.items():
            for owner in owners:
                request = scheduler.requests[owner]
                computed = flying.get(owner, request.num_computed_tokens)
                assert any(
                    f.mm_hash == mm_hash and f.offset + f.length > computed
                    for f in request.mm_features
                )
        sampling = {c.request.request_id for c in in_flight.chunks if c.samples} if flying else ()
        for request in scheduler.requests.values():
            assert request.num_pending == (request.request_id in sampling)
    else:
        pytest.fail("the workload did not finish in 2000 steps")

    assert scheduler.num_preemptions > 0
    assert scheduler.kv.all_blocks_free() and cache.num_referenced() == 0
    assert set(cache.unreferenced) == set(cache.refs) == runner_cache  # cached, evictable
    stats = cache.stats()
    assert stats["evictions"] > 0 and stats["hits"] > 0
    assert stats["misses"] == stats["evictions"] + stats["entries"]
    for request in requests:
        if request.request_id not in aborted:
            assert request.status == RequestStatus.FINISHED_LENGTH
            assert request.num_output_tokens == request.sampling_params.max_tokens
