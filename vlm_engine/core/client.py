"""The frontend's handle on an engine core: one interface, with the core in this process
(`InProcessClient`, core/in_process_client.py) or in its own (`ProcessClient`,
core/process_client.py)."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm_engine.engine_config import EngineConfig
from vlm_engine.vocab.protocol import EngineCoreOutput
from vlm_engine.vocab.request import Request, RequestStatus


class CoreClient(abc.ABC):
    """What `Engine` asks of an engine core. Requests go in with `add_request`; each `step()`
    returns the token-level outputs of one core step; `close()` releases the core."""

    max_model_len: int

    @classmethod
    @abc.abstractmethod
    def start(cls, checkpoint_dir: Path, config: EngineConfig) -> CoreClient:
        """Start a core for the checkpoint."""

    def wait_ready(self) -> None:  # noqa: B027 (a core built in this process is ready)
        """Wait until the core can take requests; raise its start-up error if it cannot."""

    @abc.abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abc.abstractmethod
    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None: ...

    @abc.abstractmethod
    def has_unfinished(self) -> bool: ...

    @abc.abstractmethod
    def step(self) -> list[EngineCoreOutput]: ...

    def has_ready_step(self) -> bool:
        """Whether `step()` would return at once with outputs the core has already produced
        (a core in its own process steps ahead of its frontend); never for a core in this
        process, whose `step()` runs the step."""
        return False

    def wait_for_step(self, timeout: float) -> bool:
        """Whether `step()` can run without waiting on another process, after waiting up to
        `timeout` seconds for that: always for a core in this process (its `step()` computes
        the step); for a core in its own process, once the step's outputs have come (or the
        core has died, which `step()` then reports)."""
        return True

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def all_blocks_free(self) -> bool:
        """Every KV block, batch row and encoder-cache reference back in its pool."""

    @abc.abstractmethod
    def reset_prefix_cache(self) -> bool: ...

    @abc.abstractmethod
    def evict_unreferenced_encoder_outputs(self) -> None: ...

    @property
    @abc.abstractmethod
    def is_alive(self) -> bool:
        """False once the core has failed, exited or been closed."""

    @abc.abstractmethod
    def close(self) -> None: ...
