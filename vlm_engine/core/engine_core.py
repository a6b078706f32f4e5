"""The engine core: scheduler + model runner, one `step()` at a time.

It speaks in token ids only; text, images-as-files and stop strings belong to the frontend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from vlm_engine.caches.ec_connector import ECConnector
from vlm_engine.caches.kv_cache_manager import KVCacheManager
from vlm_engine.core.request import Request, RequestStatus
from vlm_engine.core.scheduler import Scheduler
from vlm_engine.engine_config import EngineConfig
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.model_runner import ModelRunner


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[list[tuple[int, float, int]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int | None = None
    error: Exception | None = None


class EngineCore:
    def __init__(
        self,
        model: Gemma3Model,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        connector: ECConnector | None = None,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.config = config
        self.max_model_len = max_model_len
        self.connector = connector
        self.kv_manager = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.kv_manager, max_model_len)
        self.runner = ModelRunner(
            model, num_blocks, config.block_size, config.seed, config.max_num_seqs,
            max_model_len, connector, normalize,
        )  # fmt: skip
        self.num_steps = 0
        self.step_seconds = {"schedule": 0.0, "execute": 0.0, "update": 0.0}  # host wall time
        if config.use_cuda_graphs and self.runner.device.type == "cuda":
            self.runner.enable_cuda_graphs(config.max_num_seqs, max_model_len)

    def add_request(self, request: Request) -> None:
        seed = request.sampling_params.seed
        if seed is not None:
            request.generator = torch.Generator(self.runner.device).manual_seed(seed)
        self.scheduler.add_request(request)

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        for request_id in request_ids:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self.scheduler.finish(request, status)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        if not self.scheduler.has_unfinished():
            return []
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            self.runner.release(scheduled)
            return []
        scheduled_at = time.perf_counter()
        result = self.runner.execute(scheduled)  # returns once the sampled ids are on the host
        executed_at = time.perf_counter()
        finished = {
            r.request_id for r in self.scheduler.update_from_output(scheduled, result.sampled)
        }
        self.num_steps += 1
        self.step_seconds["schedule"] += scheduled_at - start
        self.step_seconds["execute"] += executed_at - scheduled_at
        self.step_seconds["update"] += time.perf_counter() - executed_at
        outputs = []
        for chunk in scheduled.chunks:
            request = chunk.request
            token = result.sampled.get(request.request_id)
            if token is None or request.status == RequestStatus.FINISHED_ABORTED:
                continue
            logprobs = result.logprobs.get(request.request_id)
            outputs.append(
                EngineCoreOutput(
                    request.request_id,
                    [token],
                    [logprobs] if logprobs else None,
                    request.finish_reason if request.request_id in finished else None,
                    request.stop_reason,
                    request.num_cached_tokens,
                )
            )
        return outputs

    def evict_unreferenced_encoder_outputs(self) -> None:
        """Drop now every image embedding no request references (evictions otherwise happen
        inside `schedule()` and reach the runner with that step)."""
        self.scheduler.encoder_cache.evict_unreferenced()
        self.runner.drop_encoder_outputs(self.scheduler.encoder_cache.take_freed())

    def reset_prefix_cache(self) -> bool:
        return self.kv_manager.reset_prefix_cache()

    def stats(self) -> dict[str, object]:
        stats = self.scheduler.stats()
        kv = self.kv_manager
        stats["kv_cache"] = {
            "usage": stats.pop("kv_cache_usage"),
            "num_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "num_free_blocks": kv.num_free_blocks,
        }
        connector = self.connector
        stats["ec_connector"] = connector.stats() if connector is not None else {"enabled": False}
        stats["num_steps"] = self.num_steps
        stats["vision_encoder"] = self.runner.encoder.stats()
        steps = max(self.num_steps, 1)
        seconds = {**self.step_seconds, "prepare_inputs": self.runner.prepare_seconds}
        stats["step_time_ms"] = {k: v / steps * 1e3 for k, v in seconds.items()}
        return stats

    def close(self) -> None:
        """Finish pending connector saves and release the KV cache."""
        if self.connector is not None:
            self.connector.close()
        self.runner.kv_caches = []

    def all_blocks_free(self) -> bool:
        encoder = self.scheduler.encoder_cache
        # Batch rows of finished requests are released with the next step.
        rows_held = set(self.runner.block_rows.row_of) - set(self.scheduler.finished_ids)
        return (
            not rows_held
            and self.kv_manager.all_blocks_free()
            and encoder.num_referenced() == 0
            and set(self.runner.encoder.cache) == set(encoder.refs)
        )
