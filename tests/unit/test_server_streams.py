"""The server's streamed answers: deltas that arrive while the server is behind go out merged."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")

from vlm_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput  # noqa: E402
from vlm_engine.server.streams import merge_deltas  # noqa: E402


def delta(samples: list[CompletionOutput], finished: bool = False) -> RequestOutput:
    head = samples[0]
    return RequestOutput(
        request_id="r", text=head.text, token_ids=head.token_ids, finished=finished,
        finish_reason=head.finish_reason, num_prompt_tokens=5, num_cached_tokens=0,
        metrics=RequestMetrics(arrival_time=0.0), logprobs=head.logprobs, outputs=samples,
    )  # fmt: skip


def test_consecutive_deltas_merge_per_sample():
    lp = [Logprob(7, -0.1, 1, "a")]
    first = delta(
        [CompletionOutput(0, "a", [7], None, None, lp), CompletionOutput(1, "x", [9], None)]
    )
    second = delta([CompletionOutput(1, "y", [10], "length")])  # only sample 1 moved
    third = delta(
        [CompletionOutput(0, "b", [8], "stop", 1, [Logprob(8, -0.2, 1, "b")])], finished=True
    )
    merged = merge_deltas(merge_deltas(first, second), third)
    assert merged.finished and [c.index for c in merged.outputs] == [0, 1]
    zero, one = merged.outputs
    assert (zero.text, zero.token_ids, zero.finish_reason, zero.stop_reason) == (
        "ab",
        [7, 8],
        "stop",
        1,
    )
    assert [e.token_id for e in zero.logprobs] == [7, 8]
    assert (one.text, one.token_ids, one.finish_reason, one.logprobs) == (
        "xy",
        [9, 10],
        "length",
        None,
    )
    assert (merged.text, merged.token_ids, merged.finish_reason) == ("ab", [7, 8], "stop")
