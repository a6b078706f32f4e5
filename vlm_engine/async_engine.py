"""`AsyncEngine`: the engine for asyncio applications and servers.

    engine = AsyncEngine("gemma-3-4b-it")
    async for delta in engine.generate({"prompt": "Describe it.", "images": [img]}, params):
        print(delta.text, end="")

Many callers may stream at once. The `Engine` lives on one thread of its own, which steps it for
as long as any request is unfinished and, between steps, runs the calls that change it
(queueing, aborting, statistics) in the order they came. Each step's outputs go to the event
loop in one callback, which hands every output to the queue of its request. The thread then
gives the loop a moment (up to `LOOP_WAIT_S`) to take them before it steps again: both threads
share one interpreter lock, and a thread that steps without pause would leave the loop only
scraps of time to send what it was given. A core in its own process steps on regardless; when
the loop comes back, every step the core has finished meanwhile goes out in one delivery, so a
busy loop (a server formatting and sending many streams) slows only its own sending, and deltas
that piled up reach their consumer together. A new
request is prepared (images loaded, hashed and preprocessed, text tokenized) on a pool of
frontend threads, so concurrent requests preprocess side by side. The event loop never blocks on
image preprocessing or a model step, and the engine never sees two calls at once.

A consumer that stops early (cancelled, `break`, an exception) aborts its request, which frees its
KV blocks and image references: at once when it closes the stream (`contextlib.aclosing`),
otherwise when the event loop finalizes the abandoned generator, a moment later. With
`core_process` the `Engine` underneath talks to a core in its own process, and a core that dies
ends every pending stream with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from vlm_engine.engine import Engine, PreparedRequest
from vlm_engine.errors import EngineDeadError, RequestIdInUseError
from vlm_engine.frontend.input_processor import Prompt
from vlm_engine.outputs import RequestOutput
from vlm_engine.sampling_params import SamplingParams

logger = logging.getLogger("vlm_engine")
T = TypeVar("T")
Item = RequestOutput | BaseException


class AsyncEngine:
    def __init__(self, checkpoint_dir: str | Path, **options: Any):
        self._thread = EngineThread(self._deliver)
        # The `Engine` underneath: read its configuration freely, but anything that queues,
        # steps or asks it (its core included) must run on its thread, through this class.
        self.engine: Engine = self._thread.call(Engine, checkpoint_dir, **options).result()
        self._thread.engine = self.engine
        self._frontend = concurrent.futures.ThreadPoolExecutor(
            max(2, min(8, os.cpu_count() or 1)), "vlm-frontend"
        )
        self._queues: dict[str, asyncio.Queue[Item]] = {}  # on the event loop's side
        self._unfinished: set[str] = set()  # requests whose last output has not come yet
        self._closed = False

    @property
    def is_healthy(self) -> bool:
        """False once closed, after a failed step, or when the engine core has died."""
        return self._thread.error is None and not self._closed and self.engine.is_healthy

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
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self._frontend,
            self.engine.prepare_request,
            prompt,
            sampling_params,
            request_id,
            priority,
            cache_salt,
        )
        request_id = prepared.request.request_id
        if request_id in self._queues:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        # The queue exists before the engine can produce the request's first output.
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queues[request_id] = queue
        self._unfinished.add(request_id)
        try:
            await self._call(self._thread.add, prepared, loop)
        except BaseException:
            self._queues.pop(request_id, None)
            self._unfinished.discard(request_id)
            raise
        return RequestStream(self, request_id, queue)

    async def _release_request(self, request_id: str, finished: bool) -> None:
        self._queues.pop(request_id, None)
        self._unfinished.discard(request_id)
        if not finished and self.is_healthy:
            await asyncio.shield(self._call(self._thread.abort, request_id))

    async def abort(self, request_id: str) -> None:
        queue = self._queues.pop(request_id, None)
        self._unfinished.discard(request_id)
        outputs = await self._call(self._thread.abort, request_id)
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
        self._thread.stop(self.engine.close)  # on the engine's thread, after its last call

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- on the event loop -----------------------------------------------------------------

    def _deliver(self, items: list[tuple[str, Item]]) -> None:
        """Steps' outputs (or a failure) to the queues of their requests."""
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:
                self._unfinished.discard(request_id)
        self._thread.taken()

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        if self._thread.error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self._thread.error!r}")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine's thread, between two steps."""
        return await asyncio.wrap_future(self._thread.call(fn, *args))


class EngineThread:
    """The one thread that touches the `Engine`: it runs the calls it is given in order and,
    whenever a request is unfinished, steps the engine between them. Each step's outputs go to
    the event loop of the requests they belong to, in one call of `deliver` per loop; the next
    step waits until the loops have taken them, or `LOOP_WAIT_S` has passed. While a core in its
    own process computes a step, calls still run (a new request reaches the core during that
    step, not after it)."""

    LOOP_WAIT_S = 0.05
    CALL_WAIT_S = 0.001  # slices of waiting for a core process's step, calls taken in between
    MAX_CATCH_UP = 32  # steps of a core process taken into one delivery at most

    def __init__(self, deliver: Callable[[list[tuple[str, Item]]], None]) -> None:
        self.engine: Engine | None = None  # set once the first call has built it
        self.error: BaseException | None = None  # a failed step: nothing can be trusted then
        self._deliver = deliver  # run on an event loop with [(request id, output or error)]
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # of each unfinished request
        self._calls: SimpleQueue[_Call | object | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vlm-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                future.set_exception(EngineDeadError("the engine is closed"))
            else:
                self._calls.put(_Call(fn, args, kwargs, future))
        return future

    def taken(self) -> None:
        """An event loop has taken a delivery (called on that loop)."""
        self._calls.put(_TAKEN)

    def stop(self, last: Callable[[], object]) -> None:
        """Run `last` after every call queued so far, end the thread and wait for it."""
        self.call(last).exception()
        with self._lock:
            self._stopped = True
            self._calls.put(None)
        self._thread.join()

    # ---- calls that run on the thread ------------------------------------------------------

    def add(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> str:
        request_id = self.engine.add_prepared(prepared, True)
        self._loops[request_id] = loop
        return request_id

    def abort(self, request_id: str) -> list[RequestOutput]:
        self._loops.pop(request_id, None)
        return self.engine.abort_request(request_id)

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        untaken = 0  # deliveries of the last step that their event loops have not taken yet
        deadline = 0.0  # when the next step goes ahead regardless
        while True:
            if not self._busy():
                wait = None
            else:
                wait = max(0.0, deadline - time.monotonic()) if untaken else 0.0
            item = self._next(wait)
            while item is not None:  # every call that came meanwhile, in order
                if item is _TAKEN:
                    untaken = max(0, untaken - 1)
                else:
                    item.run()
                item = self._next(0.0)
            if self._stopped:
                return
            if self._busy() and (not untaken or time.monotonic() >= deadline):
                if not self.engine.wait_for_step(self.CALL_WAIT_S):
                    continue  # a core process is still on its step: take calls meanwhile
                untaken = self._step()
                deadline = time.monotonic() + self.LOOP_WAIT_S

    def _next(self, wait: float | None) -> Any:
        """The next queued call or marker; None once `wait` seconds pass (None: no limit)."""
        try:
            if wait == 0.0:
                return self._calls.get_nowait()
            return self._calls.get(timeout=wait)
        except Empty:
            return None

    def _busy(self) -> bool:
        engine = self.engine
        return self.error is None and engine is not None and engine.has_unfinished()

    def _step(self) -> int:
        """One step, and every further step the core has already finished (a frontend that fell
        behind catches up in one delivery); returns the number of event loops delivered to."""
        loops, engine = self._loops, self.engine
        try:
            outputs = engine.step()
            for _ in range(self.MAX_CATCH_UP - 1):
                if not engine.has_ready_step():
                    break
                outputs += engine.step()
        except Exception as e:  # a failed step: nothing in flight can be trusted any more
            logger.exception("engine step failed")
            self.error = e
            failure = EngineDeadError(f"the engine failed: {e!r}")
            self._send([(loop, request_id, failure) for request_id, loop in loops.items()])
            loops.clear()
            return 0
        routed = []
        for out in outputs:
            loop = loops.get(out.request_id)
            if loop is not None:
                routed.append((loop, out.request_id, out))
                if out.finished:
                    del loops[out.request_id]
        return self._send(routed)

    def _send(self, items: list[tuple[asyncio.AbstractEventLoop, str, Item]]) -> int:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, Item]]] = {}
        for loop, request_id, item in items:
            by_loop.setdefault(loop, []).append((request_id, item))
        sent = 0
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
                loop.call_soon_threadsafe(self._deliver, batch)
                sent += 1
        return sent


_TAKEN = object()  # in the queue of calls: an event loop took a delivery


class _Call:
    __slots__ = ("fn", "args", "kwargs", "future")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, future: concurrent.futures.Future):
        self.fn, self.args, self.kwargs, self.future = fn, args, kwargs, future

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as e:
            self.future.set_exception(e)
        else:
            self.future.set_result(result)


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

    async def next_batch(self) -> list[RequestOutput]:
        """Every output that has come, in order, waiting for the next one only when none has;
        [] once the request has finished. A server that fell behind sends these as one."""
        if self._finished or self._closed:
            return []
        queue, items = self._queue, [await self._queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        outputs = []
        for item in items:
            if isinstance(item, BaseException):
                raise item
            outputs.append(item)
            if item.finished:
                self._finished = True
                break
        return outputs

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._engine._release_request(self.request_id, self._finished)
