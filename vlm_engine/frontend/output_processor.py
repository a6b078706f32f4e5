"""Frontend: engine-core outputs become `RequestOutput`s (incremental text, stop strings).

Detokenization is incremental: each step decodes only a short window of recent tokens and
withholds text while it ends in an incomplete UTF-8 sequence (a character whose bytes are split
across byte-fallback tokens decodes to U+FFFD until its last byte arrives).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vlm_engine.outputs import Logprob, RequestMetrics, RequestOutput
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vocab.protocol import EngineCoreOutput


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here, for context across token boundaries
        self.read_offset = 0  # text of tokens before this is already emitted
        self.decode = _fast_decode(tokenizer)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text."""
        self.token_ids += token_ids
        decode = self.decode
        prefix = decode(
            self.token_ids[self.prefix_offset : self.read_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        full = decode(
            self.token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]


def _fast_decode(tokenizer: Any) -> Any:
    """The Rust tokenizer's own decode when transformers' wrapper would add nothing to it (no
    clean-up of tokenization spaces): the wrapper's per-call overhead is several times the
    decode of a few tokens, paid twice per request per step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return backend.decode


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[Logprob]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    sent_text: int = 0  # characters already streamed
    sent_tokens: int = 0
    stream: bool = False
    finished: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        num_prompt_tokens: int,
        arrival_time: float,
        stream: bool = False,
    ) -> None:
        self.states[request_id] = RequestState(
            request_id,
            prompt,
            params,
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            RequestMetrics(arrival_time),
            num_prompt_tokens=num_prompt_tokens,
            stream=stream,
            logprobs=[] if params.logprobs is not None else None,
        )

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Outputs for the callers, and the ids of requests a stop string ended (to abort)."""
        results, stopped = [], []
        now = time.monotonic()
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            if self._update(state, out, now):
                stopped.append(out.request_id)
            results.append(self._make_output(state, out))
            if state.finished:
                del self.states[out.request_id]
        return results, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        state.finished = True
        state.metrics.finished_time = time.monotonic()
        out = EngineCoreOutput(request_id, [], finish_reason="abort")
        return self._make_output(state, out)

    def _update(self, state: RequestState, out: EngineCoreOutput, now: float) -> bool:
        metrics = state.metrics
        if out.num_cached_tokens is not None:
            state.num_cached_tokens = out.num_cached_tokens
        searched_to = len(state.text)
        if out.new_token_ids:
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            state.token_ids += out.new_token_ids
            metrics.num_output_tokens = len(state.token_ids)
            if state.logprobs is not None and out.new_logprobs:
                state.logprobs += [self._logprobs(entry) for entry in out.new_logprobs]
            state.text += state.detokenizer.add_tokens(out.new_token_ids)
        stop = self._find_stop_string(state, searched_to)
        if stop is not None:
            out.finish_reason, out.stop_reason = "stop", stop
        state.finished = out.finish_reason is not None
        if state.finished:
            metrics.finished_time = now
        return stop is not None

    def _find_stop_string(self, state: RequestState, searched_to: int) -> str | None:
        """Earliest stop string in the text that can contain new matches (a match may begin up
        to len(stop) - 1 characters before the new text)."""
        params = state.params
        if not params.stop or len(state.text) == searched_to:
            return None
        window_start = max(0, searched_to - max(map(len, params.stop)) + 1)
        hits = [(state.text.find(s, window_start), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        state.text = state.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
        return stop

    def _logprobs(self, entry: list[tuple[int, float, int]]) -> list[Logprob]:
        return [
            Logprob(token_id, logprob, rank, self.tokenizer.decode([token_id]))
            for token_id, logprob, rank in entry
        ]

    def _make_output(self, state: RequestState, out: EngineCoreOutput) -> RequestOutput:
        text, tokens, logprobs = state.text, state.token_ids, state.logprobs
        if state.stream:
            visible = len(text) if state.finished else self._stream_safe_length(state)
            text, tokens = text[state.sent_text : visible], tokens[state.sent_tokens :]
            logprobs = logprobs[state.sent_tokens :] if logprobs is not None else None
            state.sent_text, state.sent_tokens = max(visible, state.sent_text), len(state.token_ids)
        return RequestOutput(
            request_id=state.request_id,
            text=text,
            token_ids=list(tokens),
            finished=state.finished,
            finish_reason=out.finish_reason,
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
            logprobs=list(logprobs) if logprobs is not None else None,
            stop_reason=out.stop_reason,
            error=out.error,
            prompt=state.prompt,
        )

    @staticmethod
    def _stream_safe_length(state: RequestState) -> int:
        """Hold back a tail that could still grow into a stop string."""
        if not state.params.stop:
            return len(state.text)
        return max(state.sent_text, len(state.text) - max(map(len, state.params.stop)) + 1)
