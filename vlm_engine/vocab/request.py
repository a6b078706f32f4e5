"""A request as the engine core sees it: token ids, images, sampling, and progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vocab.inputs import ImagePlaceholder

if TYPE_CHECKING:
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class MultiModalFeature:
    """One image of a request: its identity, where its embeddings go, and its pixels."""

    mm_hash: str
    placeholder: ImagePlaceholder
    pixel_values: torch.Tensor  # [1 + crops, 3, H, W] uint8, normalized on the device

    @property
    def offset(self) -> int:
        return self.placeholder.offset

    @property
    def length(self) -> int:
        return self.placeholder.length


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None  # seeded per request: same seed, same samples
    # Another sample of the same prompt (n > 1): this request waits until that one has computed
    # the prompt, then finds its KV blocks in the prefix cache.
    prefill_after: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # advanced when a step is scheduled, not when it finishes
    num_pending: int = 0  # tokens sampled by scheduled steps whose ids are not yet on the host
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
