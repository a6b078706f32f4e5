"""The public API: `Engine(checkpoint_dir, **options)`.

    engine = Engine("gemma-3-4b-it")
    outs = engine.generate([{"prompt": "Describe the image.", "images": [img]}],
                           SamplingParams(max_tokens=64, temperature=0))

`generate` returns outputs in input order; `stream` yields incremental outputs as they come;
`add_request` / `step` / `has_unfinished` / `abort_request` are the loop underneath.

Bad input (`vlm_engine.errors.InvalidInputError`, a `ValueError`) is rejected for its request
alone, before anything reaches the scheduler; the engine goes on serving. `generate` and `stream`
raise it by default, or with `on_error="return"` hand back that request's output carrying it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlm_engine.config import ModelConfig
from vlm_engine.core.client import CoreClient
from vlm_engine.core.in_process_client import InProcessClient
from vlm_engine.core.process_client import ProcessClient
from vlm_engine.device import resolve_device
from vlm_engine.engine_config import EngineConfig
from vlm_engine.errors import (
    EngineDeadError,
    InputTypeError,
    InvalidInputError,
    RequestIdInUseError,
)
from vlm_engine.frontend.image_processor import load_image_processor
from vlm_engine.frontend.input_processor import InputProcessor, Prompt
from vlm_engine.frontend.output_processor import OutputProcessor
from vlm_engine.frontend.parallel_sampling import ParentRequest
from vlm_engine.frontend.tokenizer import load_tokenizer
from vlm_engine.frontend.workers import DaemonPool
from vlm_engine.outputs import RequestOutput
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vocab.request import Request, RequestStatus

logger = logging.getLogger("vlm_engine")
OnError = Literal["raise", "return"]


@dataclass(frozen=True)
class PreparedRequest:
    """A prompt checked, tokenized and with its images preprocessed, not yet queued."""

    request: Request
    prompt_text: str | None


_ON_ERROR = ("raise", "return")


class Engine:
    def __init__(self, checkpoint_dir: str | Path, **options: Any):
        self.config = EngineConfig.from_options(**options)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model_config = ModelConfig.from_hf(self.checkpoint_dir)
        on_gpu = resolve_device(self.config).type == "cuda"
        in_process = self.config.core_process is False or (
            self.config.core_process is None and not on_gpu
        )
        self._closed = False
        # A core in its own process builds the model while the tokenizer loads here.
        client = InProcessClient if in_process else ProcessClient
        self.core: CoreClient = client.start(self.checkpoint_dir, self.config)
        try:
            self.tokenizer = load_tokenizer(self.checkpoint_dir)
            self.core.wait_ready()
        except BaseException:
            self.core.close()
            raise
        self.max_model_len = self.core.max_model_len
        resize_on_device = self.config.resize_on_device
        if resize_on_device is None:  # the default: on a GPU
            resize_on_device = on_gpu
        self.input_processor = InputProcessor(
            self.model_config,
            self.tokenizer,
            load_image_processor(
                self.model_config, self.checkpoint_dir, self.config.processor_options
            ),
            model_id=str(self.checkpoint_dir.resolve()),
            engine_config=self.config,
            max_model_len=self.max_model_len,
            resize_on_device=resize_on_device,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._parents: dict[str, ParentRequest] = {}  # requests of several samples, by id
        self._parent_of: dict[str, ParentRequest] = {}  # by the id of each of their samples
        self._ids = itertools.count()
        self._frontend_threads = min(8, os.cpu_count() or 1)
        self._pool: DaemonPool | None = None  # preprocesses the prompts of a batch call
        self._counters = {
            "requests": 0,
            "rejected": 0,
            "finished": 0,
            "aborted": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
        }

    @property
    def is_healthy(self) -> bool:
        """False once the engine is closed or its core process has failed or exited."""
        return not self._closed and self.core.is_alive

    # ---- low-level loop ----------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queue a request and return its id. Bad input raises an `InvalidInputError` subclass
        (a `ValueError`) whose message names the request and the problem, and queues nothing."""
        prepared = self.prepare_request(prompt, sampling_params, request_id, priority, cache_salt)
        return self.add_prepared(prepared, stream)

    def prepare_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> PreparedRequest:
        """`add_request`'s first half, the frontend's work: check, load, hash and preprocess the
        prompt's images, tokenize; queue nothing. Safe on any thread, several at once (image
        decoding and resizing release the GIL), so that a server's concurrent requests do not
        preprocess one after another. Bad input raises as in `add_request`."""
        request_id = f"req-{next(self._ids)}" if request_id is None else request_id
        try:
            return PreparedRequest(
                *self._process(
                    request_id, prompt, sampling_params, priority, cache_salt, check_id=True
                )
            )
        except InvalidInputError:
            self._counters["rejected"] += 1
            raise

    def add_prepared(self, prepared: PreparedRequest, stream: bool = False) -> str:
        """Queue a prepared request (on the thread that steps the engine) and return its id;
        `RequestIdInUseError` if a request with its id was queued meanwhile."""
        request_id = prepared.request.request_id
        try:
            self._check_request_id(request_id)
        except InvalidInputError as e:
            self._counters["rejected"] += 1
            e.add_context(f"request {request_id!r}")
            raise
        self._enqueue(prepared.request, prepared.prompt_text, stream)
        return request_id

    def _process(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        check_id: bool = False,
    ) -> tuple[Request, str]:
        """Load, check and preprocess one prompt; queue nothing. Safe on several threads (ids
        are checked against the queued requests only when `check_id`, on the caller's thread)."""
        params = SamplingParams() if params is None else params
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        try:  # the clock started before images are loaded
            if check_id:
                self._check_request_id(request_id)
            return self.input_processor.process(
                request_id, prompt, params, priority, cache_salt, arrival_time
            )
        except InvalidInputError as e:
            e.add_context(f"request {request_id!r}")
            raise

    def _enqueue(self, request: Request, text: str, stream: bool) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        samples = [request]
        if request.sampling_params.n > 1:
            parent = ParentRequest(request, stream)
            samples = parent.samples
            self._parents[request.request_id] = parent
            self._parent_of.update(dict.fromkeys(parent.sample_ids, parent))
        for sample in samples:
            self.core.add_request(sample)
            self.output_processor.add_request(
                sample.request_id,
                text,
                sample.sampling_params,
                request.num_prompt_tokens,
                request.arrival_time,
                stream,
            )
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += request.num_prompt_tokens

    def _check_request_id(self, request_id: str) -> None:
        if not isinstance(request_id, str):
            raise InputTypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.output_processor.states or request_id in self._parents:
            raise RequestIdInUseError("request_id is already in use by an unfinished request")

    def step(self) -> list[RequestOutput]:
        """Run one engine step; outputs of the requests that advanced."""
        core_outputs = self.core.step()
        outputs, stopped = self.output_processor.process(core_outputs)
        self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)  # ended by a stop string
        outputs = self._gather_samples(outputs)
        self._counters["generated_tokens"] += sum(len(o.new_token_ids) for o in core_outputs)
        self._counters["finished"] += sum(out.finished for out in outputs)
        return outputs

    def _gather_samples(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The outputs of samples of a request with n > 1 become one output of that request."""
        if not self._parents:
            return outputs
        gathered: list[RequestOutput] = []
        by_parent: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            parent = self._parent_of.get(out.request_id)
            if parent is None:
                gathered.append(out)
            else:
                if parent.request_id not in by_parent:
                    gathered.append(out)  # a placeholder that keeps the order
                by_parent.setdefault(parent.request_id, []).append(out)
        for i, out in enumerate(gathered):
            parent = self._parent_of.get(out.request_id)
            if parent is not None:
                gathered[i] = parent.gather(by_parent[parent.request_id])
                if gathered[i].finished:
                    self._forget_parent(parent)
        return gathered

    def _forget_parent(self, parent: ParentRequest) -> None:
        del self._parents[parent.request_id]
        for sample_id in parent.sample_ids:
            del self._parent_of[sample_id]

    def add_requests(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_error: OnError = "raise",
        stream: bool = False,
    ) -> list[str | RequestOutput]:
        """Queue several prompts at once, preprocessed on the frontend's threads; their request
        ids in order. Bad prompts are handled as in `generate`: with `on_error="return"` the
        entry of a bad prompt is its error output. `step()` then runs them."""
        return self._add_all(prompts, sampling_params, stream=stream, on_error=on_error)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def has_ready_step(self) -> bool:
        """Whether the core has already produced the next step's outputs (it runs ahead of
        this frontend in its own process): a caller that fell behind can catch up at once."""
        return self.core.has_ready_step()

    def wait_for_step(self, timeout: float) -> bool:
        """Whether `step()` can run without waiting on a core in its own process, after up to
        `timeout` seconds of waiting for it (always True for a core in this process): a caller
        with other work can wait in short slices and do it in between."""
        return self.core.wait_for_step(timeout)

    def abort_request(self, request_id: str | Sequence[str]) -> list[RequestOutput]:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        aborted = []
        for i in ids:
            parent = self._parents.get(i)
            sample_ids = parent.sample_ids if parent is not None else [i]
            self.core.abort_requests(sample_ids)
            outs = [o for s in sample_ids if (o := self.output_processor.abort(s)) is not None]
            if parent is not None and outs:
                outs = [parent.gather(outs)]
            if parent is not None:
                self._forget_parent(parent)
            aborted += outs
        self._counters["aborted"] += len(aborted)
        return aborted

    # ---- batch and streaming -----------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        on_error: OnError = "raise",
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order.

        Prompts are preprocessed on a pool of frontend threads and queued in order. A bad one (an
        `InvalidInputError`) is raised with `on_error="raise"`, and the prompts queued before it
        are aborted; with `on_error="return"` its output carries the error (`error` set,
        `finish_reason="error"`, no text) and the others run as usual.
        """
        entries = self._add_all(prompts, sampling_params, stream=False, on_error=on_error)
        ids = [e for e in entries if isinstance(e, str)]
        done: dict[str, RequestOutput] = {}
        progress = _progress_bar(len(ids)) if use_tqdm else None
        try:
            for out in self._run(ids):
                if out.finished:
                    done[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            self._abort_unfinished(ids)  # after an error or interrupt, nothing stays queued
        return [done[e] if isinstance(e, str) else e for e in entries]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_error: OnError = "raise",
    ) -> Iterator[RequestOutput]:
        """Yield what is new for each request after each step (`request_id` tells them apart).
        Closing the iterator early aborts the requests it started. Bad prompts are handled as
        in `generate`: with `on_error="return"`, their error outputs come first."""
        entries = self._add_all(prompts, sampling_params, stream=True, on_error=on_error)
        ids = [e for e in entries if isinstance(e, str)]
        try:
            yield from (e for e in entries if isinstance(e, RequestOutput))
            yield from self._run(ids)
        finally:
            self._abort_unfinished(ids)

    def _abort_unfinished(self, ids: list[str]) -> None:
        unfinished = [i for i in ids if i in self.output_processor.states or i in self._parents]
        if unfinished:
            self.abort_request(unfinished)

    def _add_all(
        self, prompts, sampling_params, stream: bool, on_error: OnError
    ) -> list[str | RequestOutput]:
        """Queue each prompt: its request id, or (on_error="return") its error output."""
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
        prompts = _as_list(prompts)
        params = sampling_params
        if not isinstance(params, list | tuple):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        entries: list[str | RequestOutput] = []
        processed = self._process_all(ids, prompts, params)
        try:
            for index, (request_id, result) in enumerate(zip(ids, processed, strict=True)):
                if isinstance(result, InvalidInputError):
                    self._counters["rejected"] += 1
                    result.add_context(f"prompts[{index}]")
                    if on_error == "raise":
                        raise result
                    entries.append(RequestOutput.from_error(request_id, result))
                else:
                    self._enqueue(*result, stream)
                    entries.append(request_id)
        except BaseException:
            processed.close()  # prompts not yet preprocessed are dropped
            self.abort_request([e for e in entries if isinstance(e, str)])  # nothing stays queued
            raise
        return entries

    def _process_all(
        self, ids: list[str], prompts: list[Any], params: list[Any]
    ) -> Generator[tuple[Request, str] | InvalidInputError, None, None]:
        """Each prompt preprocessed (or its input error), in order. Several prompts are loaded
        and preprocessed on a pool of threads (image decoding and resizing release the GIL), so
        that the first can be queued, and a core process can start on it, before the last is
        ready."""
        arrival_time = time.monotonic()

        def process(job: tuple[str, Prompt, Any]) -> tuple[Request, str] | InvalidInputError:
            try:
                return self._process(*job, arrival_time=arrival_time)
            except InvalidInputError as e:
                return e

        jobs = list(zip(ids, prompts, params, strict=True))
        if len(jobs) < 2 or self._frontend_threads < 2:
            yield from map(process, jobs)
            return
        if self._pool is None:
            self._pool = DaemonPool(self._frontend_threads, "vlm-frontend")
        futures = []
        try:
            futures += (self._pool.submit(process, job) for job in jobs)
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def _run(self, ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        idle_steps = 0
        while pending:
            outputs = self.step()
            idle_steps = 0 if outputs else idle_steps + 1
            if idle_steps > 10_000:
                raise RuntimeError("engine made no progress in 10000 steps")
            for out in outputs:
                if out.request_id in pending:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        core = self.core.stats()
        processor = self.input_processor
        hasher = processor.hasher.stats() if processor.hasher is not None else {}
        prefix = core.pop("prefix_cache")
        prefix["misses"] = prefix["queries"] - prefix["hits"]
        return {
            "processor_cache": {**processor.processor_cache.stats(), **hasher},
            "ec_connector": core.pop("ec_connector"),
            "prefix_cache": prefix,
            "kv_cache": core.pop("kv_cache"),
            "encoder_cache": core.pop("encoder_cache"),
            "vision_encoder": core.pop("vision_encoder"),
            "switches": core.pop("switches"),
            "structured_outputs": core.pop("structured_outputs", {"enabled": False}),
            "scheduler": core,
            "requests": dict(self._counters),
        }

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block; only possible (True) when no request is running."""
        return self.core.reset_prefix_cache()

    def reset_mm_cache(self) -> None:
        """Drop cached image data: preprocessed pixels, file-hash memo, and every image embedding
        no running request needs (the second-level connector is left as it is)."""
        self.input_processor.reset_cache()
        self.core.evict_unreferenced_encoder_outputs()

    def close(self) -> None:
        """Abort what is left, finish pending connector saves, release the KV cache, and stop
        the core process if there is one. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        singles = [i for i in self.output_processor.states if i not in self._parent_of]
        self.abort_request([*self._parents, *singles])
        if self._pool is not None:
            self._pool.shutdown()
        self.core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_list(prompts: Prompt | Iterable[Prompt]) -> list[Any]:
    """One prompt (a str, a dict, or anything that is not a collection) or many."""
    if isinstance(prompts, str | bytes | Mapping) or not isinstance(prompts, Iterable):
        return [prompts]
    return list(prompts)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
