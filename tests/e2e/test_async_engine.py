"""AsyncEngine: concurrent streams equal the blocking engine, cancelling aborts and frees, bad
input raises its typed error, and closing ends pending streams."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from vlm_engine import SamplingParams
from vlm_engine.async_engine import AsyncEngine, EngineDeadError
from vlm_engine.errors import InvalidInputError
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

PROMPTS = [f"Question {i}: what is in the picture?" for i in range(6)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


def make_engine(checkpoint, core_process: bool = False) -> AsyncEngine:
    return AsyncEngine(
        checkpoint, device="cpu", dtype="float32", block_size=8, core_process=core_process
    )


both_cores = pytest.mark.parametrize(
    "core_process", [False, True], ids=["in-process", "core-process"]
)


async def collect(engine: AsyncEngine, prompt, params) -> tuple[list[int], str, int]:
    tokens, text, num_items = [], "", 0
    async for delta in engine.generate(prompt, params):
        tokens += delta.token_ids
        text += delta.text
        num_items += 1
    return tokens, text, num_items


@both_cores
def test_concurrent_streams_match_the_blocking_engine(checkpoint, core_process):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [
        *PROMPTS,
        {"prompt": "<start_of_image>Describe.", "images": [random_image(40, 30, seed=3)]},
    ]

    async def run():
        async with make_engine(checkpoint, core_process) as engine:
            results = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
            # The same engine after the streams, on its own thread (no other may touch it).
            expected = await engine._call(engine.engine.generate, prompts, params)
            assert await engine._call(engine.engine.core.all_blocks_free)
            return results, expected

    results, expected = asyncio.run(run())
    for (tokens, text, num_items), out in zip(results, expected, strict=True):
        assert tokens == out.token_ids and text == out.text
        assert num_items > 1  # streamed, not delivered at the end


@both_cores
def test_cancelled_consumer_aborts_and_frees(checkpoint, core_process):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def consume_three(engine: AsyncEngine, seen: list) -> None:
        async for delta in engine.generate(PROMPTS[0], long):
            seen.append(delta)
            if len(seen) == 3:
                await asyncio.sleep(3600)  # parked until cancelled

    async def run():
        async with make_engine(checkpoint, core_process) as engine:
            seen: list = []
            task = asyncio.create_task(consume_three(engine, seen))
            other = asyncio.create_task(collect(engine, PROMPTS[1], short))
            while len(seen) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            tokens, _, _ = await other  # the other caller is not disturbed
            # The loop closes the abandoned generator (its `finally` aborts) a moment later.
            for _ in range(500):
                stats = await engine.stats()
                if stats["requests"]["aborted"]:
                    break
                await asyncio.sleep(0.01)
            free = await engine._call(engine.engine.core.all_blocks_free)
            return seen, tokens, stats, free

    seen, tokens, stats, free = asyncio.run(run())
    assert len(seen) == 3 and not seen[-1].finished
    assert len(tokens) == 5
    assert stats["requests"]["aborted"] == 1 and stats["scheduler"]["num_running"] == 0
    assert free


def test_bad_input_raises_for_that_request_only(checkpoint):
    params = SamplingParams(temperature=0, max_tokens=4)

    async def run():
        async with make_engine(checkpoint) as engine:
            with pytest.raises(InvalidInputError):
                await collect(engine, {"prompt": "x", "images": [b"not an image"]}, params)
            return await collect(engine, PROMPTS[2], params), engine.is_healthy

    (tokens, _, _), healthy = asyncio.run(run())
    assert len(tokens) == 4 and healthy


def test_close_ends_pending_streams(checkpoint):
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def run():
        engine = make_engine(checkpoint)
        stream = engine.generate(PROMPTS[3], long)
        first = await stream.__anext__()
        await engine.close()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], long)
        return first, engine.is_healthy

    first, healthy = asyncio.run(run())
    assert not first.finished and not healthy


def test_shutdown_from_synchronous_code_stops_the_core_process(checkpoint):
    engine = make_engine(checkpoint, core_process=True)
    params = SamplingParams(temperature=0, max_tokens=3)
    tokens, _, _ = asyncio.run(collect(engine, PROMPTS[4], params))  # the loop is gone after
    process = engine.engine.core.process
    engine.shutdown()
    engine.shutdown()  # twice is fine
    assert len(tokens) == 3 and process.returncode == 0 and not engine.is_healthy


def test_concurrent_requests_preprocess_side_by_side(checkpoint, monkeypatch):
    """Two requests are in preprocessing at once (each waits for the other at a barrier; had
    they been prepared one after another, the first would wait alone until the timeout)."""
    engine = make_engine(checkpoint)
    barrier = threading.Barrier(2, timeout=30)
    prepare = engine.engine.input_processor.process

    def meet_then_prepare(*args, **kwargs):
        barrier.wait()
        return prepare(*args, **kwargs)

    monkeypatch.setattr(engine.engine.input_processor, "process", meet_then_prepare)
    params = SamplingParams(temperature=0, max_tokens=3)
    prompts = [
        {"prompt": "<start_of_image>What?", "images": [random_image(60, 40, seed=s)]}
        for s in (4, 5)
    ]

    async def run():
        async with engine:
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    results = asyncio.run(run())
    assert [len(tokens) for tokens, _, _ in results] == [3, 3]


@both_cores
def test_the_engine_steps_while_the_event_loop_is_busy(checkpoint, core_process):
    """Stepping does not wait for the event loop: while the loop is blocked, the request keeps
    generating, and what it generated meanwhile is there at once when the loop comes back. (Had
    each step waited for the loop to hand out the one before, one step would be all there is.)"""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def run():
        async with make_engine(checkpoint, core_process) as engine:
            alone = await collect(engine, PROMPTS[5], params)
            stream = await engine.add_request(PROMPTS[5], params)
            try:
                batches = [await stream.next_batch()]
                time.sleep(2.0)  # the event loop is blocked: nothing can be delivered
                while batch := await stream.next_batch():
                    batches.append(batch)
            finally:
                await stream.aclose()
            return alone, batches

    (tokens, text, _), batches = asyncio.run(run())
    outputs = [out for batch in batches for out in batch]
    assert [t for out in outputs for t in out.token_ids] == tokens
    assert "".join(out.text for out in outputs) == text
    assert outputs[-1].finished
    assert len(batches[1]) >= 3  # generated while the loop was blocked


def test_one_engine_serves_one_event_loop_after_another(checkpoint):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = make_engine(checkpoint, core_process=True)
    try:
        first = asyncio.run(collect(engine, PROMPTS[0], params))
        second = asyncio.run(collect(engine, PROMPTS[0], params))
    finally:
        engine.shutdown()
    assert first[0] == second[0] and len(first[0]) == 6


def test_a_request_reaches_the_core_process_while_it_is_on_a_step(checkpoint):
    """While the core process computes a step, the engine's thread still queues new requests:
    with the core frozen mid-run (SIGSTOP), adding a request returns at once; had the thread
    waited for the step's outputs first, it would wait until the core resumes."""
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def run():
        async with make_engine(checkpoint, core_process=True) as engine:
            alone = await collect(engine, PROMPTS[2], short)
            core = engine.engine.core.process
            stream = await engine.add_request(PROMPTS[1], long)  # hundreds of steps ahead
            os.kill(core.pid, signal.SIGSTOP)
            try:
                second = await asyncio.wait_for(engine.add_request(PROMPTS[2], short), 10)
            finally:
                os.kill(core.pid, signal.SIGCONT)
            outputs = [b async for b in batches(stream)]
            later = [b async for b in batches(second)]
            return alone, outputs, later

    alone, outputs, later = asyncio.run(run())
    assert sum(len(out.token_ids) for batch in outputs for out in batch) == 200
    assert [t for batch in later for out in batch for t in out.token_ids] == alone[0]


async def batches(stream):
    try:
        while batch := await stream.next_batch():
            yield batch
    finally:
        await stream.aclose()
