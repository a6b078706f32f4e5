"""One API request in flight: its engine requests, answered whole or as server-sent events.

`start()` checks the request and queues it in the engine (bad input raises there, before any
byte of the answer is sent). `whole()` then gathers the answer; `events()` yields it as OpenAI
stream chunks, `data: [DONE]` last. Either way the engine requests are aborted if the answer is
abandoned (the client disconnected). Latencies and token counts go to the server's metrics.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from vlm_engine.async_engine import AsyncEngine, RequestStream
from vlm_engine.errors import InvalidInputError
from vlm_engine.outputs import CompletionOutput, RequestOutput
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.server import protocol as p
from vlm_engine.server import translate
from vlm_engine.server.chunks import (
    CHUNK_TAIL,
    DONE,
    chat_choice,
    chat_choice_json,
    chat_chunk_head,
    sse,
)
from vlm_engine.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from vlm_engine.server.app import ServerConfig


class RequestRun(abc.ABC):
    """What both endpoints share: queue the prompts, follow their outputs, keep the metrics."""

    endpoint: str  # the metrics' label
    id_prefix: str  # of the response's id

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.created = int(time.time())
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.streams: list[RequestStream] = []
        self.n = 1
        self._last_token_time: float | None = None

    @abc.abstractmethod
    async def prompts_and_params(self) -> tuple[list[Any], SamplingParams]:
        """The engine prompts of this request and their sampling parameters."""

    async def start(self) -> None:
        try:
            prompts, params = await self.prompts_and_params()
            self.n = params.n
            for prompt in prompts:
                self.streams.append(
                    await self.engine.add_request(prompt, params, cache_salt=self.cache_salt)
                )
        except BaseException as e:
            await self.close()
            if isinstance(e, InvalidInputError):
                self.metrics.requests.labels(self.endpoint, "rejected").inc()
            raise

    @property
    def cache_salt(self) -> str | None:
        return None

    async def close(self) -> None:
        for stream in self.streams:
            await stream.aclose()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) of every prompt's engine request, as they come; what came
        while the server was behind goes out as one delta per prompt."""
        batches = self._single() if len(self.streams) == 1 else self._gathered()
        finished = False
        try:
            async with contextlib.aclosing(batches):
                async for items in batches:
                    pending: dict[int, RequestOutput] = {}
                    for index, out in items:
                        earlier = pending.get(index)
                        pending[index] = out if earlier is None else merge_deltas(earlier, out)
                    for index, out in pending.items():
                        self._observe(out)
                        yield index, out
            finished = True
        finally:
            self.metrics.requests.labels(self.endpoint, "finished" if finished else "aborted").inc()
            # A task of its own: a disconnected client's cancellation (which the server repeats
            # at every await of the cancelled request) must not cut the aborts short.
            await asyncio.shield(asyncio.ensure_future(self.close()))

    async def _single(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        stream = self.streams[0]
        while batch := await stream.next_batch():
            yield [(0, out) for out in batch]

    async def _gathered(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """The outputs of several prompts' streams, merged as they come."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def follow(index: int, stream: RequestStream) -> None:
            try:
                while batch := await stream.next_batch():
                    for out in batch:
                        queue.put_nowait((index, out))
            except BaseException as e:  # handed to the consumer, which raises it
                queue.put_nowait(e)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.ensure_future(follow(i, s)) for i, s in enumerate(self.streams)]
        done = 0
        try:
            while done < len(tasks):
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = []
                for item in items:
                    if item is None:
                        done += 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append(item)
                if batch:
                    yield batch
        finally:
            for task in tasks:
                task.cancel()

    def _observe(self, out: RequestOutput) -> None:
        metrics, now = self.metrics, time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens:
            metrics.generation_tokens.inc(tokens)
            last = self._last_token_time
            if last is None:
                metrics.time_to_first_token.observe(now - out.metrics.arrival_time)
            else:
                gap = (now - last) / tokens
                for _ in range(tokens):
                    metrics.inter_token_latency.observe(gap)
            self._last_token_time = now
        if out.finished:
            metrics.prompt_tokens.inc(out.num_prompt_tokens)
            metrics.e2e_latency.observe(now - out.metrics.arrival_time)

    async def whole(self) -> dict[str, Any]:
        latest: dict[int, RequestOutput] = {}
        pieces: dict[tuple[int, int], list[CompletionOutput]] = {}
        async for index, out in self.outputs():
            latest[index] = out
            for c in out.outputs:
                pieces.setdefault((index, c.index), []).append(c)
        merged = [self._merged(latest[i], pieces, i) for i in range(len(self.streams))]
        return self.response(merged).model_dump()

    def _merged(
        self, out: RequestOutput, pieces: dict[tuple[int, int], list[CompletionOutput]], index: int
    ) -> RequestOutput:
        """A prompt's whole output from its streamed deltas."""
        samples = []
        for sample in range(self.n):
            parts = pieces.get((index, sample), [])
            logprobs = (
                [e for c in parts for e in (c.logprobs or [])]
                if parts and parts[0].logprobs is not None
                else None
            )
            samples.append(
                CompletionOutput(
                    sample,
                    "".join(c.text for c in parts),
                    [t for c in parts for t in c.token_ids],
                    parts[-1].finish_reason if parts else None,
                    parts[-1].stop_reason if parts else None,
                    logprobs,
                )
            )
        first = samples[0]
        return RequestOutput(
            request_id=out.request_id, text=first.text, token_ids=first.token_ids, finished=True,
            finish_reason=first.finish_reason, num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens, metrics=out.metrics, outputs=samples,
        )  # fmt: skip

    @abc.abstractmethod
    def response(self, outputs: list[RequestOutput]) -> Any:
        """The whole answer to the prompts' merged outputs."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events, `data: [DONE]` last."""

    def _include_usage(self, request: p.SamplingFields) -> bool:
        return request.stream_options is not None and request.stream_options.include_usage


def merge_deltas(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive streamed deltas of one request as one."""
    samples = {c.index: c for c in first.outputs}
    for c in later.outputs:
        before = samples.get(c.index)
        if before is None:
            samples[c.index] = c
            continue
        logprobs = None
        if before.logprobs is not None or c.logprobs is not None:
            logprobs = (before.logprobs or []) + (c.logprobs or [])
        samples[c.index] = CompletionOutput(
            c.index, before.text + c.text, before.token_ids + c.token_ids, c.finish_reason,
            c.stop_reason, logprobs,
        )  # fmt: skip
    outputs = [samples[i] for i in sorted(samples)]
    head = samples.get(0, outputs[0])
    return dataclasses.replace(
        later, text=head.text, token_ids=head.token_ids, finish_reason=head.finish_reason,
        stop_reason=head.stop_reason, logprobs=head.logprobs, outputs=outputs,
    )  # fmt: skip


class ChatStream(RequestRun):
    endpoint = "chat"
    id_prefix = "chatcmpl"

    def __init__(
        self,
        engine: AsyncEngine,
        request: p.ChatCompletionRequest,
        config: ServerConfig,
        metrics: ServerMetrics,
        http: httpx.AsyncClient | None,
    ):
        super().__init__(engine, config, metrics)
        self.request = request
        self.http = http

    @property
    def cache_salt(self) -> str | None:
        return self.request.cache_salt

    async def prompts_and_params(self) -> tuple[list[Any], Any]:
        request = self.request
        max_tokens = (
            request.max_completion_tokens
            if request.max_completion_tokens is not None
            else request.max_tokens
        )
        params = translate.sampling_params(
            request,
            max_tokens,
            translate.chat_logprobs_count(request),
            self.engine.engine.max_model_len,
        )
        prompt = await translate.chat_prompt(request, self.config.media, self.http)
        return [prompt], params

    def response(self, outputs: list[RequestOutput]) -> p.ChatCompletion:
        (out,) = outputs
        return p.ChatCompletion(
            id=self.id, created=self.created, model=self.config.model_name,
            choices=translate.chat_choices(out), usage=translate.usage(outputs),
        )  # fmt: skip

    def _chunk(self, choices: list[dict], usage: p.Usage | None = None) -> dict:
        """A `ChatCompletionChunk` as its dump, built directly: one goes out per delta."""
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.config.model_name, "choices": choices,
            "usage": None if usage is None else usage.model_dump(),
        }  # fmt: skip

    async def events(self) -> AsyncIterator[str]:
        """Each string is one write to the client: the role chunk goes out with the first
        delta, and the last delta with the usage chunk and `[DONE]` (the same events, fewer
        writes)."""
        roles = [chat_choice(i, "", role="assistant") for i in range(self.n)]
        unsent = sse(self._chunk(roles))
        head = chat_chunk_head(self.id, self.created, self.config.model_name)
        last: RequestOutput | None = None
        completion_tokens = 0
        async for _, out in self.outputs():
            last = out
            choices = []
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                logprobs = translate.chat_logprobs(c.logprobs)
                choices.append(
                    chat_choice_json(
                        c.index,
                        c.text,
                        logprobs.model_dump() if logprobs else None,
                        translate.finish_reason(c),
                    )  # fmt: skip
                )
            if choices:
                unsent += head + ",".join(choices) + CHUNK_TAIL
            if unsent and not out.finished:
                yield unsent
                unsent = ""
        if self._include_usage(self.request) and last is not None:
            cached = max(last.num_cached_tokens, 0)
            usage = translate.usage_of(last.num_prompt_tokens, completion_tokens, cached)
            unsent += sse(self._chunk([], usage))
        yield unsent + DONE


class CompletionStream(RequestRun):
    endpoint = "completions"
    id_prefix = "cmpl"

    def __init__(
        self,
        engine: AsyncEngine,
        request: p.CompletionRequest,
        config: ServerConfig,
        metrics: ServerMetrics,
    ):
        super().__init__(engine, config, metrics)
        self.request = request

    @property
    def cache_salt(self) -> str | None:
        return self.request.cache_salt

    async def prompts_and_params(self) -> tuple[list[Any], Any]:
        request = self.request
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's default
        params = translate.sampling_params(
            request, max_tokens, request.logprobs, self.engine.engine.max_model_len
        )
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise InvalidInputError("prompt must be a string or a non-empty list of strings")
        return list(prompts), params

    def response(self, outputs: list[RequestOutput]) -> p.Completion:
        choices = [
            c
            for i, out in enumerate(outputs)
            for c in translate.completion_choices(out, i * self.n)
        ]
        return p.Completion(
            id=self.id, created=self.created, model=self.config.model_name, choices=choices,
            usage=translate.usage(outputs),
        )  # fmt: skip

    async def events(self) -> AsyncIterator[str]:
        prompt_tokens: dict[int, int] = {}
        cached_tokens: dict[int, int] = {}
        completion_tokens = 0
        async for index, out in self.outputs():
            prompt_tokens[index] = out.num_prompt_tokens
            cached_tokens[index] = max(out.num_cached_tokens, 0)
            choices = []
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                logprobs = translate.completion_logprobs(c)
                choices.append(
                    {
                        "index": index * self.n + c.index,
                        "text": c.text,
                        "logprobs": logprobs.model_dump() if logprobs else None,
                        "finish_reason": translate.finish_reason(c),
                    }  # fmt: skip
                )
            if choices:  # a `Completion` without usage, as its dump
                yield sse(
                    {
                        "id": self.id,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.config.model_name,
                        "choices": choices,
                    }  # fmt: skip
                )
        usage_chunk = ""
        if self._include_usage(self.request):
            usage = translate.usage_of(
                sum(prompt_tokens.values()), completion_tokens, sum(cached_tokens.values())
            )
            chunk = p.Completion(
                id=self.id, created=self.created, model=self.config.model_name, choices=[],
                usage=usage,
            )  # fmt: skip
            usage_chunk = sse(chunk.model_dump())
        yield usage_chunk + DONE  # one write
