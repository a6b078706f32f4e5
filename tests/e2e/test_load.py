"""Load: 1000 requests arriving at random steps, a fifth of them aborted midway. Every other
request completes with the tokens it gets alone; afterwards everything is released, and repeated
rounds do not grow Python memory. Once with the core in-process, once in its own process (where
the core steps ahead of the frontend, so aborts race with finishing)."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from vlm_engine import Engine, SamplingParams
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image, random_words

NUM_REQUESTS = 1000
NUM_DISTINCT = 40  # prompts repeat: prefix-cache and image-cache hits are part of the load


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "core-process"])
def engine(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)
    options = dict(device="cpu", dtype="float32", block_size=8, max_num_seqs=32)
    with Engine(path, **options, core_process=request.param) as engine:
        yield engine


@pytest.fixture(scope="module")
def workload(engine):
    """Distinct prompts (text, and one image each for a quarter) and each one's tokens alone."""
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(NUM_DISTINCT):
        text = f"{i}: {random_words(rng, int(rng.integers(3, 40)))}"
        if i % 4 == 0:
            prompts.append(
                {"prompt": "<start_of_image>" + text, "images": [random_image(48, 40, i)]}
            )
        else:
            prompts.append(text)
    params = [
        SamplingParams(temperature=0, max_tokens=int(n)) for n in rng.integers(1, 12, NUM_DISTINCT)
    ]
    expected = [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    return prompts, params, expected


def run_round(engine: Engine, workload, seed: int) -> tuple[int, int]:
    prompts, params, expected = workload
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.integers(0, 400, NUM_REQUESTS))  # the step each request arrives at
    aborts = {
        i: int(arrivals[i] + rng.integers(0, 6)) for i in range(NUM_REQUESTS) if rng.random() < 0.2
    }
    which = rng.integers(0, NUM_DISTINCT, NUM_REQUESTS)
    ids: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    aborted: set[str] = set()
    step, next_request = 0, 0
    while next_request < NUM_REQUESTS or engine.has_unfinished():
        while next_request < NUM_REQUESTS and arrivals[next_request] <= step:
            k = int(which[next_request])
            request_id = engine.add_request(prompts[k], params[k], stream=True)
            ids[request_id], tokens[request_id] = next_request, []
            next_request += 1
        due = [r for r, i in ids.items() if aborts.get(i) == step and r not in finished]
        for out in engine.abort_request(due):
            aborted.add(out.request_id)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
    completed = finished - aborted
    for request_id in completed:
        assert tokens[request_id] == expected[which[ids[request_id]]], request_id
    assert completed | aborted == set(ids)
    return len(completed), len(aborted)


def assert_all_released(engine: Engine) -> None:
    stats = engine.stats()
    assert engine.core.all_blocks_free()
    assert stats["scheduler"]["num_running"] == 0 and stats["scheduler"]["num_waiting"] == 0
    assert not engine.output_processor.states and stats["scheduler"]["num_requests"] == 0
    assert stats["kv_cache"]["num_free_blocks"] == stats["kv_cache"]["num_blocks"]


def test_random_arrivals_and_aborts(engine, workload):
    completed, aborted = run_round(engine, workload, seed=1)
    assert completed > 700 and aborted > 100
    assert_all_released(engine)


def test_memory_does_not_grow_across_rounds(engine, workload):
    run_round(engine, workload, seed=2)  # caches and pools reach their steady state
    tracemalloc.start()
    try:
        sizes = []
        for seed in (3, 4):
            run_round(engine, workload, seed=seed)
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert_all_released(engine)
    assert sizes[1] - sizes[0] < 256 * 1024, sizes  # bytes held after round 4 vs round 3
