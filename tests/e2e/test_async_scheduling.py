"""Async scheduling: each step is scheduled and launched while the previous one runs, its pending
input tokens taken on the device. Outputs must equal one-step-at-a-time scheduling: seeded
sampling, penalties, min_tokens, stop tokens found one step late, logprobs, images, preemption."""

from __future__ import annotations

import pytest

from vlm_engine import Engine, SamplingParams
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

OPTIONS = dict(device="cpu", dtype="float32", block_size=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def engines(checkpoint):
    with (
        Engine(checkpoint, **OPTIONS, async_scheduling=False) as sync,
        Engine(checkpoint, **OPTIONS, async_scheduling=True) as overlapped,
    ):
        yield sync, overlapped


def prompts(n: int) -> list:
    return [
        {"prompt": f"<start_of_image>picture {i}", "images": [random_image(40, 32, seed=i % 3)]}
        if i % 2
        else f"text prompt number {i} about squares and circles"
        for i in range(n)
    ]


def assert_same_outputs(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):
        assert b.token_ids == a.token_ids
        assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
        assert b.text == a.text and (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            # Batches form differently: float32 sums may differ in the last bits.
            assert [(p.token_id, p.rank) for p in x] == [(p.token_id, p.rank) for p in y]
            assert [p.logprob for p in x] == pytest.approx([p.logprob for p in y], abs=1e-4)


def test_a_step_returns_the_previous_steps_tokens(engines):
    sync, overlapped = engines
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for engine, first_step_outputs in ((sync, 1), (overlapped, 0)):
        engine.add_request("a short prompt", params, request_id="r")
        outputs = [engine.step()]
        while engine.has_unfinished():
            outputs.append(engine.step())
        assert len(outputs[0]) == first_step_outputs  # async: the prefill is still in flight
        assert [len(o) for o in outputs if o] == [1] * 4 and outputs[-1][0].finished
        assert engine.core.all_blocks_free()
    (a,), (b,) = (
        sync.generate(["a short prompt"], params),
        overlapped.generate(["a short prompt"], params),
    )
    assert a.token_ids == b.token_ids and len(a.token_ids) == 4


def test_mixed_sampling_equals_sync(engines):
    sync, overlapped = engines
    kinds = [
        SamplingParams(temperature=0, max_tokens=9),
        SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=11),
        SamplingParams(temperature=0, max_tokens=9, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, min_tokens=4),
        SamplingParams(temperature=0.7, seed=5, max_tokens=10, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=10, presence_penalty=0.5, frequency_penalty=0.4),
    ]
    batch = prompts(12)
    params = [kinds[i % len(kinds)] for i in range(len(batch))]
    assert_same_outputs(sync.generate(batch, params), overlapped.generate(batch, params))
    assert overlapped.core.all_blocks_free()


def test_stop_tokens_and_min_tokens_equal_sync(engines):
    """A stop token is known one step after it is sampled: the step already launched for that
    request is computed and its token dropped. min_tokens counts the pending tokens."""
    sync, overlapped = engines
    batch = prompts(6)
    free = sync.generate(batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    params, exact = [], 0
    for out in free:
        # Stop on the 4th token; and, with min_tokens=7, on the 8th: allowed right at the limit.
        ids = out.token_ids
        eighth = ids[7] if ids[7] not in ids[:7] else ids[3]
        exact += ids[7] not in ids[:7]
        params += [
            SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[3]]),
            SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[eighth], min_tokens=7),
        ]
    batch = [p for p in batch for _ in range(2)]
    expected = sync.generate(batch, params)
    assert [o.finish_reason for o in expected[::2]] == ["stop"] * 6
    assert all(len(o.token_ids) <= 4 for o in expected[::2])
    assert all(len(o.token_ids) >= 7 for o in expected[1::2])
    assert exact >= 2 and sum(len(o.token_ids) == 8 for o in expected[1::2]) >= exact
    assert_same_outputs(expected, overlapped.generate(batch, params))
    assert overlapped.core.all_blocks_free()


def test_preemption_while_a_step_is_in_flight(checkpoint):
    """Few KV blocks: requests are preempted while their previous step still runs, and their
    pending token is kept for the recompute."""
    batch = prompts(8)
    params = SamplingParams(temperature=0.9, seed=1, max_tokens=24, ignore_eos=True)
    options = dict(OPTIONS, num_kv_blocks=20, max_num_batched_tokens=64)
    with (
        Engine(checkpoint, **options, async_scheduling=False) as sync,
        Engine(checkpoint, **options, async_scheduling=True) as overlapped,
    ):
        expected = sync.generate(batch, params)
        got = overlapped.generate(batch, params)
        assert overlapped.stats()["scheduler"]["num_preemptions"] > 0
        assert_same_outputs(expected, got)
        assert overlapped.core.all_blocks_free()


def test_abort_while_in_flight_frees_everything(engines):
    _, overlapped = engines
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i in range(3):
        overlapped.add_request(f"prompt {i} about triangles", params, request_id=f"x{i}")
    for _ in range(4):
        overlapped.step()
    assert overlapped.core.engine_core._in_flight is not None
    for i in range(3):
        overlapped.abort_request(f"x{i}")
    assert not overlapped.has_unfinished() and overlapped.core.all_blocks_free()
