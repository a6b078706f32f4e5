"""Continuous batching: which tokens of which requests run in the next step.

One token budget per step is shared by decodes and prefill chunks. Running requests go first,
then waiting ones (FCFS, or by priority). A chunk never ends inside an image's token span (its
tokens attend to each other bidirectionally). When KV blocks run out, the lowest-priority running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (its outputs so far become part of what it recomputes).

Scheduling a step advances its requests at once (`num_computed_tokens`), and each chunk that
samples leaves a pending token (`num_pending`) until its id reaches the host. So the next step
can be scheduled while this one still runs: a request's pending token is the input of its next
decode chunk, which the model runner takes from the device. A request whose pending tokens will
reach its length limit is not scheduled again; one that stops on a sampled token (EOS, a stop
token) has at most one more step computed, and that step's token is dropped.
"""

from __future__ import annotations

from collections import deque

from vlm_engine.engine_config import EngineConfig
from vlm_engine.scheduler.encoder_cache import EncoderCacheManager
from vlm_engine.scheduler.kv_cache_manager import KVCacheManager
from vlm_engine.vocab.request import Request, RequestStatus
from vlm_engine.vocab.scheduler_output import ScheduledChunk, SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv_manager
        self.encoder_cache = EncoderCacheManager(
            config.encoder_cache_size, config.encoder_compute_budget
        )
        self._encoder_budget = 0  # embeddings the current step may still compute
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.finished_ids: list[str] = []  # reported with the next step, then cleared

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        self._encoder_budget = self.encoder_cache.compute_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        if self.config.scheduling_policy == "priority":
            self.running.sort(key=_priority_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = (
                0
                if self._at_length_limit(request)
                else self._chunk_size(request, request.num_computed_tokens, budget)
            )
            if num_new == 0:
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, request.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
        if not preempted:
            budget = self._schedule_waiting(chunks, budget)
        finished, self.finished_ids = self.finished_ids, []
        return SchedulerOutput(chunks, self.encoder_cache.take_freed(), preempted, finished)

    def _schedule_waiting(self, chunks: list[ScheduledChunk], budget: int) -> int:
        if self.config.scheduling_policy == "priority":
            self.waiting = deque(sorted(self.waiting, key=_priority_key))
        index = 0
        while (
            index < len(self.waiting)
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[index]
            if self._waits_for_sibling(request):
                index += 1
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = self._chunk_size(request, num_hit, budget)
            if num_new == 0:
                break
            if self.kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                break
            del self.waiting[index]
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, num_hit, num_new))
            budget -= num_new
        return budget

    def _waits_for_sibling(self, request: Request) -> bool:
        """A sample of a prompt another sample is still computing waits for it, to take the
        prompt's KV blocks from the prefix cache instead of computing them again."""
        if request.prefill_after is None or not self.kv.enable_prefix_caching:
            return False
        sibling = self.requests.get(request.prefill_after)
        return (
            sibling is not None
            and not sibling.is_finished
            and sibling.num_computed_tokens < sibling.num_prompt_tokens
        )

    def _chunk_size(self, request: Request, start: int, budget: int) -> int:
        """Tokens to compute from `start`: at most `budget`, never ending inside an image span,
        and stopping before an image whose embeddings can be neither found nor computed now."""
        end = min(request.num_tokens + request.num_pending, start + budget)
        for feature in request.mm_features:
            span_end = feature.offset + feature.length
            if feature.offset < end < span_end:
                # Stop before the image, or, already inside it (a prefix hit), take all of it.
                end = feature.offset if feature.offset > start else span_end
                if end - start > budget:
                    return 0
                break
        return self._fit_encoder(request, start, end) - start

    def _fit_encoder(self, request: Request, start: int, end: int) -> int:
        cache = self.encoder_cache
        overlapping = [f for f in request.mm_features if _overlaps(f, start, end)]
        in_use = {f.mm_hash for f in overlapping}
        planned: set[str] = set()
        needed = 0
        for feature in overlapping:
            if feature.mm_hash in planned or cache.is_cached(feature.mm_hash):
                continue
            needed += feature.placeholder.num_embeds
            if not cache.can_allocate(needed, self._encoder_budget, keep=in_use):
                return max(feature.offset, start)
            planned.add(feature.mm_hash)
        return end

    def _chunk(self, request: Request, start: int, num_tokens: int) -> ScheduledChunk:
        overlapping = [
            (i, f)
            for i, f in enumerate(request.mm_features)
            if _overlaps(f, start, start + num_tokens)
        ]
        # Reference what is cached first, so that making room cannot evict it.
        missing = [
            (i, f)
            for i, f in overlapping
            if not self.encoder_cache.acquire_cached(request, f.mm_hash)
        ]
        encoder_inputs = []
        for index, feature in missing:
            if self.encoder_cache.acquire_cached(request, feature.mm_hash):
                continue  # the same image earlier in this prompt
            size = feature.placeholder.num_embeds
            self.encoder_cache.allocate(request, feature.mm_hash, size)
            self._encoder_budget -= size
            encoder_inputs.append(index)
        block_ids = self.kv.get_block_ids(request.request_id)
        chunk = ScheduledChunk(request, start, num_tokens, block_ids, encoder_inputs)
        request.num_computed_tokens = chunk.end
        request.num_pending += chunk.samples
        return chunk

    def _at_length_limit(self, request: Request) -> bool:
        """Whether the tokens already sampled (some maybe still pending) reach a length limit."""
        if not request.num_pending:
            return False  # a request at its limit with nothing pending has been finished
        num_outputs = request.num_output_tokens + request.num_pending
        return (
            num_outputs >= request.sampling_params.max_tokens
            or request.num_tokens + request.num_pending >= self.max_model_len
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.encoder_cache.release_all(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Take a finished step's sampled tokens; return the requests that finished."""
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            request.num_pending -= chunk.samples
            if request.is_finished:  # aborted, or stopped by an earlier step, while this one ran
                continue
            if request.status == RequestStatus.PREEMPTED:
                # Preempted while the step ran (its images were released then); the token stands.
                token = sampled.get(request.request_id)
                if token is not None and self._append(request, token):
                    finished.append(request)
                continue
            done = {f.mm_hash for f in request.mm_features if f.offset + f.length <= chunk.end}
            pending = {f.mm_hash for f in request.mm_features if f.offset + f.length > chunk.end}
            for mm_hash in done - pending:  # an image twice in a prompt: kept for its second use
                self.encoder_cache.release(request, mm_hash)
            token = sampled.get(request.request_id)
            if token is not None and self._append(request, token):
                finished.append(request)
        return finished

    def _append(self, request: Request, token: int) -> bool:
        """Append a sampled token; finish the request (True) if it stops there."""
        request.append_output_token(token)
        status = self._check_stop(request, token)
        if status is not None:
            self.finish(request, status)
        return status is not None

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request wherever it is (running, waiting, or preempted) and free what it holds."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self.encoder_cache.release_all(request)
        self.requests.pop(request.request_id, None)
        self.finished_ids.append(request.request_id)

    def stats(self) -> dict[str, object]:
        return {
            "num_requests": len(self.requests),  # running, waiting, or finished this step
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions,
            "kv_cache_usage": self.kv.usage,
            "prefix_cache": self.kv.prefix_cache_stats(),
            "encoder_cache": self.encoder_cache.stats(),
        }


def _overlaps(feature, start: int, end: int) -> bool:
    return feature.offset < end and start < feature.offset + feature.length


def _priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time
