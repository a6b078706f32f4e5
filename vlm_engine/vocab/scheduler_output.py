"""What the scheduler hands the model runner for one step: data only."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_engine.vocab.request import Request


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # tokens already computed before this step
    num_tokens: int  # tokens computed in this step
    block_ids: list[int]
    encoder_inputs: list[int] = field(default_factory=list)  # feature indices to encode now
    samples: bool = field(init=False)  # reaches the last token: its logits pick the next

    def __post_init__(self) -> None:
        self.samples = self.end == self.request.num_tokens + self.request.num_pending

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    free_encoder_hashes: list[str]
    preempted_ids: list[str]
    finished_ids: list[str] = field(default_factory=list)  # finished since the previous step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)
