"""Runs a scheduled step on the device: encoder, decoder over the paged KV cache, sampling."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vlm_engine.device import to_device
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.connectors import ECConnector
from vlm_engine.runtime.cuda_graphs import CudaGraphRunner, PrefillGraphRunner
from vlm_engine.runtime.encoder_runner import EncoderRunner
from vlm_engine.runtime.input_batch import (
    BlockTableRows,
    DecodeInputs,
    PendingIds,
    fill_pending,
)
from vlm_engine.runtime.memory import allocate_kv_caches
from vlm_engine.runtime.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow
from vlm_engine.vocab.request import Request
from vlm_engine.vocab.scheduler_output import ScheduledChunk, SchedulerOutput


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int]  # request id -> new token, for chunks that sample
    logprobs: dict[str, list[tuple[int, float, int]]]  # request id -> (token, logprob, rank)...


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampler's results are copied to `host` as it ends.
    A step launched without sampling holds its `logits` instead, until `ModelRunner.sample`."""

    requests: list[Request]  # those that sample, in the order of the rows of `host`
    host: SamplerOutput | None  # pinned host copies (None: nothing samples, or not yet)
    done: torch.cuda.Event | None  # recorded after the copies (None off a GPU)
    logits: torch.Tensor | None = None  # [len(requests), V] while sampling waits

    @property
    def awaits_sampling(self) -> bool:
        return self.logits is not None


class ModelRunner:
    def __init__(
        self,
        model: Gemma3Model,
        num_blocks: int,
        block_size: int,
        seed: int | None,
        max_num_seqs: int,
        max_model_len: int,
        connector: ECConnector | None = None,
        to_model_input: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ):
        model.fuse_projections()  # one GEMM for q/k/v and one for gate/up
        self.model = model
        self.device = model.language_model.embed_tokens.weight.device
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size)
        self.sampler = Sampler(seed)
        self.encoder = EncoderRunner(model, connector, to_model_input)
        self.graphs: CudaGraphRunner | None = None
        self.prefill_graphs: PrefillGraphRunner | None = None
        max_blocks = -(-max_model_len // block_size)
        self.block_rows = BlockTableRows(max_num_seqs, max_blocks, self.device)
        self.decode_inputs = [
            DecodeInputs(max_num_seqs, max_blocks, block_size, self.device) for _ in range(2)
        ]
        self._decode_parity = 0
        self._sampled = torch.zeros(0, dtype=torch.int64, device=self.device)  # last step's ids
        self._sampled_row: dict[str, int] = {}  # request id -> its row in `_sampled`
        self.prepare_seconds = 0.0  # host time spent building step inputs
        self.vocab_size = model.config.text.vocab_size
        self._sample_now = True  # launch() samples, or holds the logits for sample()

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run a step and wait for its sampled tokens."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, sample: bool = True) -> LaunchedStep:
        """Queue a step's work on the device and return without waiting for it. Input tokens
        not yet on the host (pending) are those the previous launched step sampled. With
        `sample=False` the step stops at its logits: `sample` must follow before the next
        launch (which reads the tokens it samples)."""
        self._sample_now = sample
        self.release(step)
        self.encoder.run(step.chunks)
        start = time.perf_counter()
        rows = self.block_rows.rows(step.chunks)
        if self._graph_step(step):
            self._decode_parity ^= 1  # the other buffers: the previous step may still read these
            inputs = self.decode_inputs[self._decode_parity].fill(
                step.chunks, rows, self.block_rows
            )
            pending = self._pending_ids(step.chunks)
            self.prepare_seconds += time.perf_counter() - start
            logits = self.graphs.run(*inputs, pending=pending)
            return self._sample_or_hold(logits, [c.request for c in step.chunks])
        ids, ctx, image_embeds, image_rows = self._prepare_inputs(step.chunks, rows)
        self.prepare_seconds += time.perf_counter() - start
        if self._prefill_graph_step(step):
            (chunk,) = step.chunks
            logits = self.prefill_graphs.run(
                self.model.embed_inputs(ids, image_embeds, image_rows), ctx
            )
            if not chunk.samples:
                return _NOTHING_SAMPLED
            return self._sample_or_hold(logits, [chunk.request])
        hidden = self.model(ids, ctx, image_embeds, image_rows)
        sampling = [c for c in step.chunks if c.samples]
        if not sampling:
            return _NOTHING_SAMPLED
        ends = itertools.accumulate(c.num_tokens for c in step.chunks)  # on the host: no sync
        last = [end - 1 for end, c in zip(ends, step.chunks, strict=True) if c.samples]
        logits = self.model.compute_logits(hidden[self._to_device(torch.tensor(last))])
        return self._sample_or_hold(logits, [c.request for c in sampling])

    @torch.inference_mode()
    def sample(self, launched: LaunchedStep, token_bitmask: torch.Tensor | None) -> LaunchedStep:
        """Sample a step launched with `sample=False`, under a host bitmask of the tokens each
        row may take ([rows, ceil(V / 32)] int32, or None for no constraint)."""
        return self._sample(launched.logits, launched.requests, token_bitmask)

    def _sample_or_hold(self, logits: torch.Tensor, requests: list[Request]) -> LaunchedStep:
        if self._sample_now:
            return self._sample(logits, requests)
        return LaunchedStep(requests, None, None, logits)

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step and read its sampled tokens (and logprobs)."""
        if launched.host is None:
            return ModelRunnerOutput({}, {})
        if launched.done is not None:
            launched.done.synchronize()
        out, requests = launched.host, launched.requests
        ids = [r.request_id for r in requests]
        sampled = dict(zip(ids, out.sampled_token_ids.tolist(), strict=True))
        logprobs = _logprob_entries(out, requests) if out.logprobs is not None else {}
        return ModelRunnerOutput(sampled, logprobs)

    def close(self) -> None:
        """Let go of the device memory: KV cache, CUDA graphs, embeddings, pinned buffers."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.kv_caches = []
        self.graphs = self.prefill_graphs = None
        self.encoder.close()
        self._sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.decode_inputs = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back: a later engine sizes by them

    def release(self, step: SchedulerOutput) -> None:
        """Forget what the step says is gone: evicted image embeddings, and the batch rows of
        requests that finished or were preempted. Also for steps with nothing to run."""
        self.drop_encoder_outputs(step.free_encoder_hashes)
        self.block_rows.release(itertools.chain(step.finished_ids, step.preempted_ids))

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, max_tokens: int) -> None:
        """Capture decode graphs up to `max_batch` sequences, and single-sequence prompt-chunk
        graphs up to `max_tokens` tokens (capped: past ~1k tokens the GPU work dwarfs launches)."""
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = CudaGraphRunner(self.model, self.kv_caches, max_batch, max_blocks)
        self.graphs.capture()
        max_tokens = min(max_tokens, MAX_PREFILL_GRAPH_TOKENS)
        self.prefill_graphs = PrefillGraphRunner(self.model, self.kv_caches, max_tokens, max_blocks)
        self.prefill_graphs.capture()

    def _graph_step(self, step: SchedulerOutput) -> bool:
        if self.graphs is None or step.free_encoder_hashes:
            return False
        chunks = step.chunks
        return all(c.num_tokens == 1 and c.samples and not c.encoder_inputs for c in chunks) and (
            self.graphs.fits(len(chunks), max(len(c.block_ids) for c in chunks))
        )

    def _prefill_graph_step(self, step: SchedulerOutput) -> bool:
        chunks = step.chunks
        return (
            self.prefill_graphs is not None
            and len(chunks) == 1
            and self.prefill_graphs.fits(chunks[0].num_tokens, len(chunks[0].block_ids))
        )

    def drop_encoder_outputs(self, mm_hashes: list[str]) -> None:
        self.encoder.drop(mm_hashes)

    def _prepare_inputs(self, chunks: list[ScheduledChunk], rows: np.ndarray):
        ids, slots, embeds, mask = [], [], [], np.zeros(sum(c.num_tokens for c in chunks), bool)
        offset, bs = 0, self.block_size
        tables = self.block_rows.tables(rows)  # [S, width]
        for chunk, table in zip(chunks, tables, strict=True):
            known = chunk.request.all_token_ids[chunk.start : chunk.end]
            ids += known + [0] * (chunk.num_tokens - len(known))  # pending: filled on the device
            positions = np.arange(chunk.start, chunk.end)
            slots.append(table[positions // bs].astype(np.int64) * bs + positions % bs)
            embeds += self._image_rows(chunk, mask[offset : offset + chunk.num_tokens])
            offset += chunk.num_tokens
        ctx = ForwardContext.build(
            [c.num_tokens for c in chunks],
            [c.end for c in chunks],
            [[g for f in c.request.mm_features for g in f.placeholder.groups] for c in chunks],
            self.device,
            slot_mapping=self._to_device(torch.from_numpy(np.concatenate(slots))),
            block_tables=self._to_device(torch.from_numpy(tables)),
            kv_caches=self.kv_caches,
        )
        image_embeds = torch.cat(embeds) if embeds else None
        image_rows = self._to_device(torch.from_numpy(np.flatnonzero(mask))) if embeds else None
        ids = self._to_device(torch.tensor(ids, dtype=torch.int64))
        fill_pending(ids, self._pending_ids(chunks))
        return ids, ctx, image_embeds, image_rows

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return to_device(host, self.device)

    def _image_rows(self, chunk: ScheduledChunk, mask: np.ndarray) -> list[torch.Tensor]:
        """Slices of embedding rows for the image tokens of the chunk, in token order; marks in
        `mask` (the chunk's tokens) which take them: by position, since a generated token is
        text whatever its id."""
        slices = []
        for feature in chunk.request.mm_features:
            base = 0
            for group in feature.placeholder.groups:
                lo, hi = max(group.offset, chunk.start), min(group.end, chunk.end)
                if lo < hi:
                    embeds = self.encoder.cache[feature.mm_hash]
                    slices.append(embeds[base + lo - group.offset : base + hi - group.offset])
                    mask[lo - chunk.start : hi - chunk.start] = True
                base += group.length
        return slices

    def _pending_ids(self, chunks: list[ScheduledChunk]) -> PendingIds | None:
        """Where the step's pending input tokens go (token rows on the device, or None for the
        first rows in order) and their ids, from the previous launched step's samples."""
        rows, sources, offset = [], [], 0
        for chunk in chunks:
            if chunk.start >= chunk.request.num_tokens:  # a one-token chunk
                rows.append(offset)
                sources.append(self._sampled_row[chunk.request.request_id])
            offset += chunk.num_tokens
        if not rows:
            return None
        if rows == sources == list(range(len(rows))):  # the same requests, in the same order
            return None, self._sampled[: len(rows)]
        rows_device = self._to_device(torch.tensor(rows))
        return rows_device, self._sampled[self._to_device(torch.tensor(sources))]

    def _sample(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        token_bitmask: torch.Tensor | None = None,
    ) -> LaunchedStep:
        batch = SamplingBatch.from_rows(
            [_sampling_row(r) for r in requests], self.vocab_size, self.device, token_bitmask
        )
        out = self.sampler(logits, batch)
        self._sampled = out.sampled_token_ids
        self._sampled_row = {r.request_id: i for i, r in enumerate(requests)}
        host = SamplerOutput(*(_to_host(t) for t in dataclasses.astuple(out)))
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return LaunchedStep(requests, host, done)


_NOTHING_SAMPLED = LaunchedStep([], None, None)
MAX_PREFILL_GRAPH_TOKENS = 1024


def _to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy, made without blocking (the caller waits on an event to read it)."""
    if tensor is None or tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _logprob_entries(out: SamplerOutput, requests: list[Request]):
    """Per request asking for logprobs: (sampled token, logprob, rank), then the top-n by rank."""
    tokens, values = out.logprob_token_ids.tolist(), out.logprobs.tolist()
    ranks = out.sampled_ranks.tolist()
    entries = {}
    for i, request in enumerate(requests):
        n = request.sampling_params.logprobs
        if n is not None:
            top = [(tokens[i][j], values[i][j], j) for j in range(1, n + 1)]
            entries[request.request_id] = [(tokens[i][0], values[i][0], ranks[i]), *top]
    return entries


def _sampling_row(request: Request) -> SamplingRow:
    params = request.sampling_params
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= request.eos_token_ids
    return SamplingRow(
        params,
        request.prompt_token_ids,
        request.output_token_ids,
        request.generator,
        frozenset(stop_ids),
        request.num_pending - 1,  # the pending tokens before this step's own
    )
