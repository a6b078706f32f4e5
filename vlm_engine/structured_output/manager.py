"""The engine core's side of structured outputs: compiled grammars, a matcher per request, and
the next-token bitmask of each step.

- The tokenizer's vocabulary is turned into xgrammar's `TokenizerInfo` once per engine, on the
  first constrained request, on a worker thread.
- Each distinct constraint is compiled once, on a worker thread, and kept (least recently used
  first out past `max_grammars`): a request waits outside the scheduler until its grammar is
  ready, so a new schema never stalls the steps of other requests.
- A constrained request gets its own `GrammarMatcher`; after each step, the matcher accepts the
  tokens its request was given (`accept`); before the step samples, `fill_bitmask` writes the
  tokens each constrained row may take into a pinned host buffer (all ones for the other rows).
  End-of-sequence and the request's stop tokens are allowed only where the grammar may end.
- JSON rows also lose every token holding a control character (bytes 0x00-0x1f; newline and
  carriage return stay allowed where `any_whitespace` lets whitespace in): JSON text never needs
  one raw, and xgrammar's rule for length-bounded strings would let them into a string, where a
  JSON parser rejects them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlm_engine.sampling_params import StructuredOutputs
from vlm_engine.structured_output.grammars import compile_constraint
from vlm_engine.vocab.request import Request

logger = logging.getLogger("vlm_engine")

MAX_GRAMMARS = 512  # compiled constraints kept; a JSON schema's takes tens of kilobytes


@dataclass
class _Matcher:
    matcher: Any  # xgrammar.GrammarMatcher
    json_mask: torch.Tensor | None  # [words] int32: tokens a JSON row may take at all
    num_accepted: int = 0  # output tokens the matcher has taken


class StructuredOutputManager:
    def __init__(
        self,
        load_tokenizer: Callable[[], Any],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_batch: int,
        device: torch.device,
        max_grammars: int = MAX_GRAMMARS,
    ):
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.max_batch = max_batch
        self.device = device
        self.max_grammars = max_grammars
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="vlm-grammar")
        self._compiler: Any = None
        self._vocab_bytes: list[bytes] = []  # each token's text, as xgrammar decodes it
        self._json_masks: dict[bool, torch.Tensor] = {}  # any_whitespace -> [words] int32
        self._compiler_lock = threading.Lock()
        self._grammars: OrderedDict[StructuredOutputs, Future] = OrderedDict()
        self._matchers: dict[str, _Matcher] = {}
        self._bitmasks: list[torch.Tensor] = []  # two pinned [max_batch, words] buffers
        self._parity = 0
        self._batch_matcher: Any = None
        self.num_compiled = 0
        self.num_grammar_hits = 0
        self.compile_seconds = 0.0
        self.bitmask_seconds = 0.0  # host time filling bitmasks

    # -- grammars ------------------------------------------------------------------------

    def warm_up(self) -> Future:
        """Build the vocabulary's tables now, on a worker thread, so that the first constrained
        request waits for its own grammar only (seconds for a 262k-token vocabulary)."""

        def build() -> None:
            self._get_compiler()
            for any_whitespace in (False, True):
                self._json_mask(any_whitespace)

        return self._executor.submit(build)

    def submit(self, request: Request) -> Future:
        """Start compiling the request's constraint, unless it is compiled or compiling."""
        spec = request.sampling_params.structured_outputs
        future = self._grammars.get(spec)
        if future is not None:
            self._grammars.move_to_end(spec)
            self.num_grammar_hits += 1
            return future
        future = self._executor.submit(self._compile, spec)
        self._grammars[spec] = future
        while len(self._grammars) > self.max_grammars:
            self._grammars.popitem(last=False)  # a request holding it keeps its own matcher
        return future

    def start(self, request: Request, future: Future) -> None:
        """Give a request whose grammar compiled its matcher; raises the compile error."""
        import xgrammar

        stop_ids = set(request.eos_token_ids) | set(request.sampling_params.stop_token_ids)
        matcher = xgrammar.GrammarMatcher(
            future.result(), override_stop_tokens=sorted(stop_ids) or None
        )
        spec = request.sampling_params.structured_outputs
        json_mask = None
        if spec.json is not None or spec.json_object:
            json_mask = self._json_mask(spec.any_whitespace)
        state = _Matcher(matcher, json_mask)
        self._matchers[request.request_id] = state
        self._advance(request, state)  # a preempted or resubmitted request's earlier outputs

    def _compile(self, spec: StructuredOutputs) -> Any:
        start = time.perf_counter()
        compiled = compile_constraint(self._get_compiler(), spec)
        self.compile_seconds += time.perf_counter() - start
        self.num_compiled += 1
        return compiled

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._load_tokenizer(),
                    vocab_size=self.vocab_size,
                    stop_token_ids=self.eos_token_ids or None,
                )
                self._vocab_bytes = info.decoded_vocab
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
                )
            return self._compiler

    def _json_mask(self, any_whitespace: bool) -> torch.Tensor:
        """Bits of the tokens free of raw control characters, in xgrammar's bitmask layout
        (token t is bit t % 32 of word t // 32)."""
        self._get_compiler()  # reads the vocabulary
        mask = self._json_masks.get(any_whitespace)
        if mask is None:
            allowed_controls = b"\n\r" if any_whitespace else b""
            controls = bytes(set(range(32)) - set(allowed_controls))
            words = -(-self.vocab_size // 32)
            allowed = np.ones(words * 32, dtype=bool)  # tokens past the vocabulary: xgrammar's
            for token_id, text in enumerate(self._vocab_bytes[: self.vocab_size]):
                if len(text.translate(None, controls)) != len(text):
                    allowed[token_id] = False
            packed = np.packbits(allowed, bitorder="little").view("<i4")
            mask = self._json_masks[any_whitespace] = torch.from_numpy(packed.copy())
        return mask

    # -- matchers ------------------------------------------------------------------------

    def is_constrained(self, request: Request) -> bool:
        return request.request_id in self._matchers

    def accept(self, requests: Sequence[Request]) -> list[Request]:
        """Advance the matchers of `requests` over their new output tokens; forget those that
        finished. Returns the requests that were given a token their grammar rejects."""
        rejected = []
        for request in requests:
            state = self._matchers.get(request.request_id)
            if state is None:
                continue
            if not self._advance(request, state):
                rejected.append(request)
            if request.is_finished or request in rejected:
                del self._matchers[request.request_id]
        return rejected

    def _advance(self, request: Request, state: _Matcher) -> bool:
        tokens = request.output_token_ids
        while state.num_accepted < len(tokens):
            if state.matcher.is_terminated() or not state.matcher.accept_token(
                tokens[state.num_accepted]
            ):
                logger.error(
                    "request %s: token %d is outside its grammar",
                    request.request_id,
                    tokens[state.num_accepted],
                )
                return False
            state.num_accepted += 1
        return True

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def fill_bitmask(self, requests: Sequence[Request]) -> torch.Tensor | None:
        """[len(requests), words] int32 host tensor (pinned on a GPU): bit t of row i set where
        request i may sample token t; all bits set for unconstrained and finished rows. None
        when no row is constrained."""
        rows = [
            (i, state)
            for i, r in enumerate(requests)
            if (state := self._matchers.get(r.request_id)) is not None
            and not state.matcher.is_terminated()
        ]
        if not rows:
            return None
        start = time.perf_counter()
        import xgrammar

        if not self._bitmasks:
            shape = xgrammar.get_bitmask_shape(self.max_batch, self.vocab_size)
            pin = self.device.type == "cuda"
            self._bitmasks = [
                torch.empty(shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)
            ]
            self._batch_matcher = xgrammar.BatchGrammarMatcher(max_threads="auto")
        self._parity ^= 1  # the other buffer: the last copy from this one may still run
        bitmask = self._bitmasks[self._parity][: len(requests)]
        bitmask.fill_(-1)
        indices, matchers = [i for i, _ in rows], [state.matcher for _, state in rows]
        if len(rows) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, indices[0])
        else:
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, indices)
        by_mask: dict[int, tuple[torch.Tensor, list[int]]] = {}
        for i, state in rows:
            if state.json_mask is not None:
                by_mask.setdefault(id(state.json_mask), (state.json_mask, []))[1].append(i)
        for mask, indices in by_mask.values():  # one masked copy per kind of JSON row
            index = torch.tensor(indices)
            bitmask.index_copy_(0, index, bitmask.index_select(0, index).bitwise_and_(mask))
        self.bitmask_seconds += time.perf_counter() - start
        return bitmask

    def stats(self) -> dict[str, object]:
        return {
            "grammars_cached": len(self._grammars),
            "grammars_compiled": self.num_compiled,
            "grammar_cache_hits": self.num_grammar_hits,
            "compile_seconds": self.compile_seconds,
            "active_matchers": len(self._matchers),
            "bitmask_seconds": self.bitmask_seconds,
        }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._matchers.clear()
        self._bitmasks = []
