"""ProcessorCache: an LRU of preprocessed images bounded by the bytes of their pixel values."""

import pytest
import torch

from vlm_engine.frontend.image_processor import ProcessedImage
from vlm_engine.frontend.processor_cache import ProcessorCache

ENTRY_BYTES = 1 * 3 * 4 * 4 * 4  # one [1, 3, 4, 4] float32 image


def processed(num_crops: int = 0, seed: int = 0) -> ProcessedImage:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_crops + 1, 3, 4, 4, generator=generator)
    return ProcessedImage(pixel_values=pixel_values, num_crops=num_crops)


def test_miss_then_hit_returns_the_stored_entry():
    cache = ProcessorCache(max_bytes=10 * ENTRY_BYTES)
    entry = processed()
    assert cache.get("a") is None
    assert cache.put("a", entry)
    assert cache.get("a") is entry
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "entries": 1,
        "bytes": ENTRY_BYTES,
        "max_bytes": 10 * ENTRY_BYTES,
    }


def test_evicts_least_recently_used_and_get_refreshes_recency():
    cache = ProcessorCache(max_bytes=2 * ENTRY_BYTES)
    cache.put("a", processed(seed=1))
    cache.put("b", processed(seed=2))
    assert cache.get("a") is not None  # now "b" is the least recently used
    cache.put("c", processed(seed=3))
    assert "b" not in cache
    assert "a" in cache and "c" in cache
    assert cache.stats()["evictions"] == 1


def test_contains_does_not_refresh_recency():
    cache = ProcessorCache(max_bytes=2 * ENTRY_BYTES)
    cache.put("a", processed())
    cache.put("b", processed())
    assert "a" in cache
    cache.put("c", processed())
    assert "a" not in cache and "b" in cache
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 0


def test_bound_is_in_bytes_and_evicts_as_many_as_needed():
    cache = ProcessorCache(max_bytes=4 * ENTRY_BYTES)
    for name in "abcd":
        cache.put(name, processed())
    assert len(cache) == 4 and cache.stats()["bytes"] == 4 * ENTRY_BYTES

    cache.put("crops", processed(num_crops=2))  # 3 entries' worth of bytes
    assert [name for name in "abcd" if name in cache] == ["d"]
    assert cache.stats()["evictions"] == 3
    assert cache.stats()["bytes"] == 4 * ENTRY_BYTES <= cache.max_bytes


def test_entry_larger_than_the_cache_is_not_cached_and_evicts_nothing():
    cache = ProcessorCache(max_bytes=2 * ENTRY_BYTES)
    cache.put("a", processed())
    assert not cache.put("huge", processed(num_crops=2))
    assert "huge" not in cache and "a" in cache
    assert cache.stats()["evictions"] == 0 and cache.stats()["bytes"] == ENTRY_BYTES


def test_entry_exactly_max_bytes_is_cached():
    cache = ProcessorCache(max_bytes=ENTRY_BYTES)
    assert cache.put("a", processed())
    assert cache.get("a") is not None


def test_put_replaces_an_entry_without_double_counting_bytes():
    cache = ProcessorCache(max_bytes=3 * ENTRY_BYTES)
    cache.put("a", processed())
    replacement = processed(num_crops=1)
    cache.put("a", replacement)
    assert cache.get("a") is replacement
    assert len(cache) == 1 and cache.stats()["bytes"] == 2 * ENTRY_BYTES
    assert cache.stats()["evictions"] == 0


def test_zero_bytes_disables_the_cache_and_counts_misses():
    cache = ProcessorCache(max_bytes=0)
    assert not cache.put("a", processed())
    assert cache.get("a") is None
    assert cache.get("a") is None
    assert cache.stats() == {
        "hits": 0,
        "misses": 2,
        "evictions": 0,
        "entries": 0,
        "bytes": 0,
        "max_bytes": 0,
    }


@pytest.mark.parametrize("max_bytes", [-1, 1.5, True, "10"])
def test_rejects_bad_max_bytes(max_bytes):
    with pytest.raises(ValueError, match="max_bytes"):
        ProcessorCache(max_bytes=max_bytes)
