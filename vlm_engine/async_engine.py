"""`AsyncEngine`: the engine for asyncio applications and servers.

    engine = AsyncEngine("gemma-3-4b-it")
    async for delta in engine.generate({"prompt": "Describe it.", "images": [img]}, params):
        print(delta.text, end="")

Many callers may stream at once: one background task steps the engine while any request is
unfinished and hands each step's outputs to the queue of the request they belong to. A new
request is prepared (images loaded, hashed and preprocessed, text tokenized) on a pool of
frontend threads, so concurrent requests preprocess side by side; every call that changes the
`Engine` (queueing, stepping, aborting) runs on one worker thread, one at a time. The event loop
never blocks on image preprocessing or a model step, and the engine never sees two calls at
once. A consumer that stops early (cancelled, `break`, an exception) aborts its
request, which frees its KV blocks and image references: at once when it closes the stream
(`contextlib.aclosing`), otherwise when the event loop finalizes the abandoned generator, a moment
later. With `core_process` the `Engine` underneath talks to a core in its own process, and a core
that dies ends every pending stream with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from vlm_engine.engine import Engine
from vlm_engine.errors import EngineDeadError
from vlm_engine.frontend.input_processor import Prompt
from vlm_engine.outputs import RequestOutput
from vlm_engine.sampling_params import SamplingParams

logger = logging.getLogger("vlm_engine")
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, checkpoint_dir: str | Path, **options: Any):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "vlm-engine")
        self.engine = self._executor.submit(Engine, checkpoint_dir, **options).result()
        self._frontend = concurrent.futures.ThreadPoolExecutor(
            max(2, min(8, os.cpu_count() or 1)), "vlm-frontend"
        )
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._unfinished: set[str] = set()  # requests whose last output has not come yet
        self._step_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def is_healthy(self) -> bool:
        """False once closed, after a failed step, or when the engine core has died."""
        return self._error is None and not self._closed and self.engine.is_healthy

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished (running or waiting)."""
        return len(self._unfinished)

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request: each item holds what is new since the previous one; the last has
        `finished=True`. Bad input raises its typed `InvalidInputError` before anything runs."""
        stream = await self.add_request(prompt, sampling_params, request_id, priority, cache_salt)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue one request and return its stream of outputs (what `generate` iterates). Bad
        input raises here. The caller must `aclose()` the stream, which aborts the request if
        it has not finished."""
        self._check_usable()
        prepared = await asyncio.get_running_loop().run_in_executor(
            self._frontend,
            self.engine.prepare_request,
            prompt,
            sampling_params,
            request_id,
            priority,
            cache_salt,
        )
        request_id = await self._call(self.engine.add_prepared, prepared, True)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._unfinished.add(request_id)
        self._ensure_stepping()
        return RequestStream(self, request_id, queue)

    async def _release_request(self, request_id: str, finished: bool) -> None:
        self._queues.pop(request_id, None)
        self._unfinished.discard(request_id)
        if not finished and self.is_healthy:
            await asyncio.shield(self._call(self.engine.abort_request, request_id))

    async def abort(self, request_id: str) -> None:
        queue = self._queues.pop(request_id, None)
        self._unfinished.discard(request_id)
        outputs = await self._call(self.engine.abort_request, request_id)
        if queue is not None:
            for out in outputs:
                queue.put_nowait(out)

    async def stats(self) -> dict[str, Any]:
        return await self._call(self.engine.stats)

    async def close(self) -> None:
        """Abort what is left and release the engine; pending streams end with an error."""
        if self._closed:
            return
        self._closed = True
        if self._step_task is not None:
            await asyncio.gather(self._step_task, return_exceptions=True)
        await asyncio.to_thread(self._release)

    def shutdown(self) -> None:
        """`close()` for synchronous code, once no event loop serves this engine any more (after
        a web server has stopped, at the end of a script)."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        self._fail_all(EngineDeadError("the engine was closed"))
        self._frontend.shutdown(wait=True)
        self._executor.submit(self.engine.close).result()  # on the worker, after its last call
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the stepping task ----------------------------------------------------------------

    def _ensure_stepping(self) -> None:
        if self._step_task is None or self._step_task.done():
            self._step_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def _step_loop(self) -> None:
        while self._unfinished and not self._closed:
            try:
                outputs = await self._call(self._step)
            except Exception as e:  # a failed step: nothing in flight can be trusted any more
                logger.exception("engine step failed")
                self._error = e
                self._fail_all(EngineDeadError(f"the engine failed: {e!r}"))
                return
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                if out.finished:
                    self._unfinished.discard(out.request_id)

    def _step(self) -> list[RequestOutput]:
        # On the worker thread: one step, or none when every request just finished.
        return self.engine.step() if self.engine.has_unfinished() else []

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        if self._error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self._error!r}")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class RequestStream:
    """The outputs of one request, as they come (an async iterator); `aclose()` aborts the
    request unless it has finished, and forgets it."""

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        queue: asyncio.Queue[RequestOutput | BaseException],
    ):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._engine._release_request(self.request_id, self._finished)
