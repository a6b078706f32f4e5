"""The engine core: scheduler + model runner, one `step()` at a time.

It speaks in token ids only; text, images-as-files and stop strings belong to the frontend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from vlm_engine import envs
from vlm_engine.engine_config import EngineConfig
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.connectors import ECConnector
from vlm_engine.runtime.model_runner import LaunchedStep, ModelRunner
from vlm_engine.scheduler.kv_cache_manager import KVCacheManager
from vlm_engine.scheduler.scheduler import Scheduler
from vlm_engine.structured_output.manager import StructuredOutputManager
from vlm_engine.vocab.protocol import EngineCoreOutput
from vlm_engine.vocab.request import Request, RequestStatus
from vlm_engine.vocab.scheduler_output import SchedulerOutput

logger = logging.getLogger("vlm_engine")


@dataclass
class _StepInFlight:
    scheduled: SchedulerOutput
    launched: LaunchedStep
    needs_all_tokens: bool  # a request's sampling reads its outputs: no step may overlap it


GRAMMAR_WAIT_SECONDS = 0.05  # longest a step with nothing to run waits for a grammar to compile


class EngineCore:
    def __init__(
        self,
        model: Gemma3Model,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        connector: ECConnector | None = None,
        to_model_input: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
        load_tokenizer: Callable[[], Any] | None = None,
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
            max_model_len, connector, to_model_input,
        )  # fmt: skip
        self.num_steps = 0
        self.step_seconds = {"schedule": 0.0, "execute": 0.0, "update": 0.0}  # host wall time
        async_scheduling = config.async_scheduling
        if async_scheduling is None:
            async_scheduling = self.runner.device.type == "cuda"
        self.async_scheduling = async_scheduling
        self._in_flight: _StepInFlight | None = None  # launched, outputs not yet taken
        # Structured outputs: requests whose grammar compiles wait here, outside the scheduler.
        self.structured: StructuredOutputManager | None = None
        if load_tokenizer is not None:
            self.structured = StructuredOutputManager(
                load_tokenizer, self.runner.vocab_size, model.config.eos_token_ids,
                config.max_num_seqs, self.runner.device,
            )  # fmt: skip
            if self.runner.device.type == "cuda":  # a serving engine: no first-request stall
                self.structured.warm_up()
        self._compiling: dict[str, tuple[Request, Future]] = {}
        self._rejected: list[EngineCoreOutput] = []  # outputs of requests that could not run
        if config.use_cuda_graphs and self.runner.device.type == "cuda":
            self.runner.enable_cuda_graphs(
                config.max_num_seqs, max_model_len, config.max_num_batched_tokens
            )

    def add_request(self, request: Request) -> None:
        seed = request.sampling_params.seed
        if seed is not None:
            request.generator = torch.Generator(self.runner.device).manual_seed(seed)
        if request.sampling_params.structured_outputs is None:
            self.scheduler.add_request(request)
            return
        if self.structured is None:
            self._reject(request, "this engine core has no tokenizer for structured outputs")
            return
        self._compiling[request.request_id] = (request, self.structured.submit(request))
        self._admit_compiled()

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar is ready, in the order they arrived."""
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                self.structured.start(request, future)
            except Exception as e:  # the frontend checked it: a failure here is unexpected
                self._reject(request, f"its grammar failed to compile: {e}")
                continue
            self.scheduler.add_request(request)

    def _reject(self, request: Request, why: str) -> None:
        logger.error("request %s cannot run: %s", request.request_id, why)
        request.status = RequestStatus.FINISHED_ERROR
        self._rejected.append(EngineCoreOutput(request.request_id, [], None, "error"))

    def _wait_for_grammars(self) -> None:
        """With nothing to run but requests whose grammar compiles, wait a little for one."""
        futures = [future for _, future in self._compiling.values()]
        concurrent.futures.wait(
            futures, GRAMMAR_WAIT_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
        )
        self._admit_compiled()

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        for request_id in request_ids:
            if self._compiling.pop(request_id, None) is not None:
                continue
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self.scheduler.finish(request, status)
            if self.structured is not None:
                self.structured.release(request_id)
        self._settle_if_idle()

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_unfinished()
            or self._in_flight is not None
            or bool(self._compiling or self._rejected)
        )

    def step(self) -> list[EngineCoreOutput]:
        """Run one step and return the outputs of a step that finished.

        With async scheduling the step is launched and the previous one's outputs returned:
        the next step is scheduled and its inputs prepared while the device runs this one, and
        its pending input tokens are taken from the device. Without it (or when a request's
        sampling reads its output tokens), the step's own outputs are returned.

        A step with requests under a grammar samples once the step before it has finished:
        its forward pass is launched first, the previous step's tokens advance the matchers
        while the device runs it, then the bitmask goes with the sampling.
        """
        if self._compiling:
            self._admit_compiled()
        rejected, self._rejected = self._rejected, []
        previous, self._in_flight = self._in_flight, None
        outputs: list[EngineCoreOutput] = []
        if previous is not None and previous.needs_all_tokens:
            outputs, previous = self._finish(previous), None
        current = self._launch()
        if previous is not None:
            outputs = self._finish(previous)
        if current is not None:
            if current.launched.awaits_sampling:
                start = time.perf_counter()
                bitmask = self.structured.fill_bitmask(current.launched.requests)
                current.launched = self.runner.sample(current.launched, bitmask)
                self.step_seconds["update"] += time.perf_counter() - start
            if self.async_scheduling:
                self._in_flight = current
            else:
                outputs = self._finish(current)
        elif previous is None and self._compiling and not self.scheduler.has_unfinished():
            self._wait_for_grammars()
        self._settle_if_idle()
        return rejected + outputs if rejected else outputs

    def _settle_if_idle(self) -> None:
        """With no request left unfinished, wait for the step in flight (whose tokens are all
        dropped), so that `has_unfinished` turns False with the last output."""
        if self._in_flight is not None and not self.scheduler.has_unfinished():
            in_flight, self._in_flight = self._in_flight, None
            self._finish(in_flight)

    def _launch(self) -> _StepInFlight | None:
        if not self.scheduler.has_unfinished():
            return None
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            self.runner.release(scheduled)
            return None
        launched_at = time.perf_counter()
        constrained = self.structured is not None and any(
            c.samples and self.structured.is_constrained(c.request) for c in scheduled.chunks
        )
        launched = self.runner.launch(scheduled, sample=not constrained)
        self.step_seconds["schedule"] += launched_at - start
        self.step_seconds["execute"] += time.perf_counter() - launched_at
        penalized = any(r.sampling_params.has_penalties for r in launched.requests)
        return _StepInFlight(scheduled, launched, penalized)

    def _finish(self, step: _StepInFlight) -> list[EngineCoreOutput]:
        """Wait for a launched step, advance its requests and make their outputs."""
        start = time.perf_counter()
        result = self.runner.collect(step.launched)
        collected_at = time.perf_counter()
        scheduled = step.scheduled
        finished = {
            r.request_id for r in self.scheduler.update_from_output(scheduled, result.sampled)
        }
        if self.structured is not None and result.sampled:
            for request in self.structured.accept([c.request for c in scheduled.chunks]):
                self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
                finished.add(request.request_id)
        self.num_steps += 1
        self.step_seconds["execute"] += collected_at - start
        self.step_seconds["update"] += time.perf_counter() - collected_at
        outputs = []
        for chunk in scheduled.chunks:
            request = chunk.request
            token = result.sampled.get(request.request_id)
            if token is None or (
                request.is_finished and request.request_id not in finished
            ):  # aborted, or stopped by an earlier step, while this one ran
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
        runner = self.runner
        if runner.graphs is not None:
            stats["cuda_graph_replays"] = {
                "decode": runner.graphs.num_replays,
                "prompt_chunk": runner.prefill_graphs.num_replays,
            }
        steps = max(self.num_steps, 1)
        seconds = {**self.step_seconds, "prepare_inputs": self.runner.prepare_seconds}
        stats["step_time_ms"] = {k: v / steps * 1e3 for k, v in seconds.items()}
        stats["switches"] = envs.values.by_variable()  # of the process the kernels run in
        if self.structured is not None:
            stats["structured_outputs"] = {
                **self.structured.stats(),
                "waiting_for_grammar": len(self._compiling),
            }
        return stats

    def close(self) -> None:
        """Finish pending connector saves, wait for the step in flight, and release the device
        memory the core holds (KV cache, graphs, image embeddings, pinned buffers)."""
        if self.connector is not None:
            self.connector.close()
        if self.structured is not None:
            self.structured.close()
        self._in_flight = None  # its tokens are not wanted; runner.close() waits for the device
        self.runner.close()

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
