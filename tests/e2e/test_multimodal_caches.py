"""The three multimodal cache layers through the engine: vision-tower run counts, persistence,
sharing, failures, and outputs that do not depend on any cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm_engine import Engine, InvalidInputError, SamplingParams
from vlm_engine.frontend import image_processor, mm_hash
from vlm_engine.runtime.connectors import entry_key
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image, random_words

GREEDY = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
OPTIONS = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


def image_prompt(seed: int, question: str = "What is this?") -> dict:
    return {"prompt": "<start_of_image>" + question, "images": [random_image(40, 30, seed)]}


def encoded(engine: Engine) -> int:
    return engine.stats()["vision_encoder"]["items_encoded"]


def test_repeated_image_runs_the_tower_once(checkpoint):
    engine = Engine(checkpoint, **OPTIONS)
    first = engine.generate(image_prompt(1), GREEDY)
    second = engine.generate(image_prompt(1, "And the color?"), GREEDY)
    stats = engine.stats()
    assert encoded(engine) == 1
    assert stats["processor_cache"]["hits"] == 1 and stats["processor_cache"]["misses"] == 1
    assert stats["encoder_cache"]["hits"] == 1
    assert first[0].token_ids and second[0].num_cached_tokens > 0  # prefix cache too


def test_one_image_in_many_concurrent_requests(checkpoint):
    engine = Engine(checkpoint, **OPTIONS, max_num_batched_tokens=64)  # prefills over steps
    questions = [random_words(np.random.default_rng(i), 5) for i in range(12)]
    outs = engine.generate([image_prompt(2, q) for q in questions], GREEDY)
    assert len(outs) == 12 and encoded(engine) == 1
    assert engine.core.all_blocks_free()


def test_eviction_under_a_small_encoder_cache(checkpoint):
    engine = Engine(checkpoint, **OPTIONS, encoder_cache_size=32)  # two 16-embedding images
    for seed in (10, 11, 12, 13):
        engine.generate(image_prompt(seed), GREEDY)
    assert encoded(engine) == 4
    engine.generate(image_prompt(13), GREEDY)  # still cached
    assert encoded(engine) == 4
    engine.generate(image_prompt(10), GREEDY)  # evicted: encoded again
    stats = engine.stats()["encoder_cache"]
    assert encoded(engine) == 5 and stats["evictions"] >= 2
    assert stats["used_embeddings"] <= 32


def test_an_image_larger_than_the_encoder_cache_is_rejected(checkpoint):
    engine = Engine(checkpoint, **OPTIONS, encoder_cache_size=8)
    with pytest.raises(InvalidInputError, match="encoder_cache_size"):
        engine.generate(image_prompt(3), GREEDY)
    (out,) = engine.generate("text still works", GREEDY)
    assert len(out.token_ids) == 6


def test_disk_connector_survives_a_restart(checkpoint, tmp_path):
    spec = f"disk:{tmp_path / 'ec'}"
    prompts = [image_prompt(20), image_prompt(21), image_prompt(20, "again?")]
    with Engine(checkpoint, **OPTIONS, ec_connector=spec) as first:
        expected = first.generate(prompts, GREEDY)
        assert encoded(first) == 2
    second = Engine(checkpoint, **OPTIONS, ec_connector=spec)
    outs = second.generate(prompts, GREEDY)
    assert encoded(second) == 0
    assert second.stats()["vision_encoder"]["images_loaded"] == 2
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    second.close()


def transparent_prompt() -> dict:
    image = random_image(40, 30, 25).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((40, 30)))  # clear at the top
    return {"prompt": "<start_of_image>What is this?", "images": [image]}


@pytest.mark.parametrize("revision_bumped", [True, False])
def test_entries_of_an_older_preprocessing_are_not_served(
    checkpoint, tmp_path, monkeypatch, revision_bumped
):
    """An engine that dropped alpha (the preprocessing before compositing onto white) filled the
    connector; a newer engine on it encodes the image afresh, since the revision of the
    preprocessing is part of the mm_hash and so of the connector's key. Without the revision
    (the control case) the stale embedding would be served."""
    spec = f"disk:{tmp_path / 'ec'}"
    fresh = Engine(checkpoint, **OPTIONS).generate(transparent_prompt(), GREEDY)
    with monkeypatch.context() as old_release:
        old_release.setattr(image_processor, "convert_to_rgb", lambda image: image.convert("RGB"))
        if revision_bumped:
            revision = mm_hash.PREPROCESSING_REVISION
            old_release.setattr(mm_hash, "PREPROCESSING_REVISION", revision - 1)
        with Engine(checkpoint, **OPTIONS, ec_connector=spec) as old:
            stale = old.generate(transparent_prompt(), GREEDY)
            assert encoded(old) == 1
    assert stale[0].token_ids != fresh[0].token_ids  # the two preprocessings disagree
    with Engine(checkpoint, **OPTIONS, ec_connector=spec) as new:
        (out,) = new.generate(transparent_prompt(), GREEDY)
        loaded = new.stats()["vision_encoder"]["images_loaded"]
    if revision_bumped:
        assert loaded == 0 and out.token_ids == fresh[0].token_ids
    else:
        assert loaded == 1 and out.token_ids == stale[0].token_ids


def test_a_corrupt_entry_is_a_miss(checkpoint, tmp_path):
    spec = f"disk:{tmp_path / 'ec'}"
    with Engine(checkpoint, **OPTIONS, ec_connector=spec) as first:
        (expected,) = first.generate(image_prompt(30), GREEDY)
        (mm_hash,) = first.core.engine_core.runner.encoder.cache
        fingerprint = first.core.engine_core.connector.fingerprint
    key = entry_key(fingerprint, mm_hash)
    import diskcache

    with diskcache.Cache(str(tmp_path / "ec")) as store:
        assert key in store
        store[key] = b"\x00garbage that is not a tensor entry"
    second = Engine(checkpoint, **OPTIONS, ec_connector=spec)
    (out,) = second.generate(image_prompt(30), GREEDY)
    assert out.token_ids == expected.token_ids
    assert encoded(second) == 1 and second.stats()["ec_connector"]["corrupt"] == 1
    second.close()


def test_two_engines_share_one_redis(checkpoint, redis_server):
    a = Engine(checkpoint, **OPTIONS, ec_connector=redis_server.url)
    b = Engine(checkpoint, **OPTIONS, ec_connector=redis_server.url)
    (from_a,) = a.generate(image_prompt(40), GREEDY)
    a.core.engine_core.connector.flush()
    (from_b,) = b.generate(image_prompt(40), GREEDY)
    assert encoded(a) == 1 and encoded(b) == 0
    assert from_a.token_ids == from_b.token_ids
    a.close()
    b.close()


def test_redis_stopped_mid_run(checkpoint, redis_server):
    reference = Engine(checkpoint, **OPTIONS)
    engine = Engine(checkpoint, **OPTIONS, ec_connector=redis_server.url)
    prompts = [image_prompt(50 + i) for i in range(6)]
    engine.add_request(prompts[0], GREEDY)
    engine.step()
    redis_server.stop()
    try:
        for prompt in prompts[1:]:
            engine.add_request(prompt, GREEDY)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                done[out.request_id] = out
    finally:
        redis_server.start()
    expected = reference.generate(prompts, GREEDY)
    assert [done[f"req-{i}"].token_ids for i in range(6)] == [o.token_ids for o in expected]
    stats = engine.stats()["ec_connector"]
    assert stats["load_errors"] + stats["save_errors"] + stats.get("skipped", 0) > 0
    engine.close()


def test_outputs_do_not_depend_on_any_cache(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    prompts = []
    pool = [random_image(30 + k, 40, 60 + k) for k in range(4)]
    for i in range(10):
        images = [pool[(i + k) % 4] for k in range(i % 3)]
        prompts.append({"prompt": random_words(rng, 12), "images": images})
    prompts += prompts[:4]  # repeats: hits in every layer
    none = Engine(
        checkpoint,
        **OPTIONS,
        processor_cache_bytes=0,
        enable_prefix_caching=False,
        encoder_cache_size=32,
        encoder_compute_budget=32,
    )
    every = Engine(checkpoint, **OPTIONS, ec_connector=f"disk:{tmp_path / 'ec'}")
    expected = [o.token_ids for o in none.generate(prompts, GREEDY)]
    assert [o.token_ids for o in every.generate(prompts, GREEDY)] == expected
    every.core.engine_core.connector.flush()
    again = Engine(checkpoint, **OPTIONS, ec_connector=f"disk:{tmp_path / 'ec'}")
    assert [o.token_ids for o in again.generate(prompts, GREEDY)] == expected
    distinct = {id(image) for p in prompts for image in p["images"]}
    assert encoded(again) == 0 and encoded(every) == len(distinct)
    for engine in (none, every, again):
        assert engine.core.all_blocks_free()


def test_image_uuid_skips_hashing(checkpoint):
    engine = Engine(checkpoint, **OPTIONS)
    image = random_image(40, 30, 70)
    prompt = {"prompt": "<start_of_image>What?", "images": [image], "image_uuids": ["photo-1"]}
    (first,) = engine.generate(prompt, GREEDY)
    (second,) = engine.generate(prompt, GREEDY)
    assert first.token_ids == second.token_ids and encoded(engine) == 1
    assert engine.stats()["processor_cache"]["hits"] == 1


def test_reset_caches(checkpoint):
    engine = Engine(checkpoint, **OPTIONS)
    engine.generate(image_prompt(80), GREEDY)
    engine.reset_mm_cache()
    assert engine.reset_prefix_cache()
    (out,) = engine.generate(image_prompt(80), GREEDY)
    stats = engine.stats()
    assert encoded(engine) == 2 and out.num_cached_tokens == 0
    assert stats["processor_cache"]["hits"] == 0 and stats["processor_cache"]["memo_hits"] == 0
    assert out.time_to_first_token > 0
