"""What passes between the frontend and an engine core, in the same process or another one.

The core answers each step with one `EngineCoreOutput` per request that advanced. Between two
processes (core/messages.py encodes them), every message is a list of frames whose first frame
names its kind, below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[list[tuple[int, float, int]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int | None = None
    error: Exception | None = None


ADD = b"add"  # frontend -> core: a request (header + pixel frames)
ABORT = b"abort"  # frontend -> core: {"ids": [...], "status": RequestStatus name}
CALL = b"call"  # frontend -> core: {"id": n, "method": name}; answered by a REPLY
SHUTDOWN = b"shutdown"  # frontend -> core: finish and exit
READY = b"ready"  # core -> frontend: {"max_model_len": n}
OUTPUTS = b"outputs"  # core -> frontend: one step's outputs
REPLY = b"reply"  # core -> frontend: {"id": n, "result": value}
FAILED = b"failed"  # core -> frontend: {"type", "message", "traceback"}; the core exits


class MessageError(ValueError):
    """A message that does not decode to what its kind promises."""
