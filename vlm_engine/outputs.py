"""What the engine returns to callers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """Log probability of one token under the model's raw distribution, and its rank (1 = top)."""

    token_id: int
    logprob: float
    rank: int
    text: str


@dataclass
class RequestMetrics:
    """Times in seconds (time.monotonic clock)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first one."""
        if self.num_output_tokens < 2 or self.first_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class CompletionOutput:
    """One sample of a request: its text and tokens so far (or, streamed, what is new)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[list[Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output so far (cumulative) or, when streamed, what is new since the last one.

    `outputs` holds one `CompletionOutput` per sample (`SamplingParams.n`); streamed, only the
    samples that have something new. The fields beside it (`text`, `token_ids`, `finish_reason`,
    `stop_reason`, `logprobs`) are those of sample 0, and `finished` is True once every sample
    has finished. `logprobs[i]` lists, for output token i, the sampled token first and then the
    top-n tokens.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", or "error" when `error` is set
    num_prompt_tokens: int
    num_cached_tokens: int
    metrics: RequestMetrics
    logprobs: list[list[Logprob]] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: Exception | None = None  # why the request was rejected (an InvalidInputError)
    prompt: str | None = field(default=None, repr=False)
    outputs: list[CompletionOutput] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.outputs:  # a single sample: the fields above
            self.outputs = [
                CompletionOutput(
                    0,
                    self.text,
                    self.token_ids,
                    self.finish_reason,
                    self.stop_reason,
                    self.logprobs,
                )  # fmt: skip
            ]

    @classmethod
    def from_error(cls, request_id: str, error: Exception) -> RequestOutput:
        """The output of a request rejected before it ran: no text, `finish_reason="error"`."""
        now = time.monotonic()
        return cls(
            request_id=request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason="error",
            num_prompt_tokens=0,
            num_cached_tokens=0,
            metrics=RequestMetrics(arrival_time=now, finished_time=now),
            error=error,
        )

    @property
    def time_to_first_token(self) -> float | None:
        return self.metrics.time_to_first_token

    @property
    def time_per_output_token(self) -> float | None:
        return self.metrics.time_per_output_token
