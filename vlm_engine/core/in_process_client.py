"""The engine core in the frontend's own process, behind the `CoreClient` interface.

The model, the runtime and the kernels are imported only when such a core is started, so a
frontend whose core runs in its own process never loads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_engine.core.client import CoreClient
from vlm_engine.engine_config import EngineConfig
from vlm_engine.vocab.protocol import EngineCoreOutput
from vlm_engine.vocab.request import Request, RequestStatus

if TYPE_CHECKING:
    from vlm_engine.core.engine_core import EngineCore


class InProcessClient(CoreClient):
    """An `EngineCore` in this process, called directly."""

    @classmethod
    def start(cls, checkpoint_dir: Path, config: EngineConfig) -> InProcessClient:
        """Build the core here: load the model, size the KV cache, capture CUDA graphs."""
        from vlm_engine.core.launch import build_core

        return cls(build_core(checkpoint_dir, config))

    def __init__(self, engine_core: EngineCore):
        self.engine_core = engine_core
        self.max_model_len = engine_core.max_model_len
        self._closed = False

    def add_request(self, request: Request) -> None:
        self.engine_core.add_request(request)

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        self.engine_core.abort_requests(request_ids, status)

    def has_unfinished(self) -> bool:
        return self.engine_core.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        return self.engine_core.step()

    def stats(self) -> dict[str, Any]:
        return self.engine_core.stats()

    def all_blocks_free(self) -> bool:
        return self.engine_core.all_blocks_free()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def evict_unreferenced_encoder_outputs(self) -> None:
        self.engine_core.evict_unreferenced_encoder_outputs()

    @property
    def is_alive(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        self.engine_core.close()
