"""Steps replayed from captured CUDA graphs: decode-only steps, one graph per padded batch size,
and prompt chunks of a single sequence, one graph per padded token count.

A step of either kind runs the same kernels every time, only on other data: the graph of the
smallest captured size that fits is replayed after the step's inputs are copied into its static
buffers. Every kernel takes its sizes from device tensors (the attention kernel's grid depends
on the padded shape only), so one graph serves any context length and any image layout.
Padding rows write no KV (slot -1); their outputs are never read. A single-sequence graph starts
from the input embeddings (image rows already placed) and returns the logits of the last real
token. Steps with several sequences of which some prefill, or larger ones, run eagerly.
"""

from __future__ import annotations

import bisect
import logging

import torch

from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.input_batch import PendingIds, fill_pending

logger = logging.getLogger("vlm_engine")


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def prefill_sizes(max_tokens: int) -> list[int]:
    """Token counts of the single-sequence graphs: every 16 up to 256, then every 64."""
    sizes = [s for s in range(16, 257, 16) if s < max_tokens]
    sizes += [s for s in range(320, max_tokens, 64)]
    return [*sizes, max_tokens]


def _token_buffers(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A graph's per-token inputs, filled as padding: positions 0, kv_limits 1, slot -1 (no KV)."""
    longs = dict(dtype=torch.int64, device=device)
    return torch.zeros(n, **longs), torch.ones(n, **longs), torch.full((n,), -1, **longs)


def _capture(forward, sizes: list[int]) -> tuple[dict, dict]:
    """One graph per size, largest first so that the smaller ones reuse its memory pool."""
    graphs, outputs, pool = {}, {}, None
    for size in reversed(sizes):
        forward(size)  # warm-up: kernels compiled, allocator settled
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    return graphs, outputs


class CudaGraphRunner:
    def __init__(
        self,
        model: Gemma3Model,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        max_blocks_per_seq: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_batch)
        device = model.language_model.embed_tokens.weight.device
        longs = dict(dtype=torch.int64, device=device)
        ints = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_batch, **longs)
        self.positions, self.kv_limits, self.slot_mapping = _token_buffers(max_batch, device)
        self.seq_lens = torch.ones(max_batch, **ints)
        self.query_start_loc = torch.arange(max_batch + 1, **ints)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, **ints)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.logits = _capture(self._forward, self.sizes)
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def _forward(self, size: int) -> torch.Tensor:
        ctx = ForwardContext(
            positions=self.positions[:size], kv_limits=self.kv_limits[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            query_lens_cpu=[1] * size, seq_lens_cpu=[], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size], kv_caches=self.kv_caches, max_query_len=1,
        )  # fmt: skip
        hidden = self.model(self.input_ids[:size], ctx)
        return self.model.compute_logits(hidden)

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and num_blocks <= self.block_tables.shape[1]

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        pending: PendingIds | None = None,
    ) -> torch.Tensor:
        """One decode token per sequence -> logits [num_seqs, vocab] (a view: copy to keep).
        Inputs may be on the device or in pinned host memory (copied asynchronously); `pending`
        overwrites input ids the previous step sampled on the device."""
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        fill_pending(self.input_ids, pending)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.kv_limits[:n].copy_(self.seq_lens[:n])  # a decode token sees keys < its seq_len
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if size > n:  # padding rows: no KV write, a one-token context at slot 0
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.kv_limits[n:size].fill_(1)
            self.positions[n:size].zero_()
            self.block_tables[n:size].zero_()
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size][:n]


class PrefillGraphRunner:
    """Graphs of one sequence's prompt chunk (any context before it), by padded token count."""

    def __init__(
        self, model: Gemma3Model, kv_caches: list[torch.Tensor], max_tokens: int, max_blocks: int
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = prefill_sizes(max_tokens)
        weight = model.language_model.embed_tokens.weight
        longs = dict(dtype=torch.int64, device=weight.device)
        ints = dict(dtype=torch.int32, device=weight.device)
        self.embeds = torch.zeros(
            max_tokens, weight.shape[1], dtype=weight.dtype, device=weight.device
        )
        self.positions, self.kv_limits, self.slot_mapping = _token_buffers(
            max_tokens, weight.device
        )
        self.query_start_loc = torch.tensor([0, 1], **ints)
        self.seq_lens = torch.ones(1, **ints)
        self.block_tables = torch.zeros(1, max_blocks, **ints)
        self.last = torch.zeros(1, **longs)  # row of the last real token
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.logits = _capture(self._forward, self.sizes)
        logger.info(
            "captured %d prompt-chunk CUDA graphs (up to %d tokens)",
            len(self.sizes),
            self.sizes[-1],
        )

    def _forward(self, size: int) -> torch.Tensor:
        ctx = ForwardContext(
            positions=self.positions[:size], kv_limits=self.kv_limits[:size],
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, query_lens_cpu=[size],
            seq_lens_cpu=[size], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables, kv_caches=self.kv_caches, max_query_len=size,
        )  # fmt: skip
        hidden = self.model.language_model(self.embeds[:size], ctx)
        return self.model.compute_logits(hidden[self.last])

    def fits(self, num_tokens: int, num_blocks: int) -> bool:
        return num_tokens <= self.sizes[-1] and num_blocks <= self.block_tables.shape[1]

    def run(self, embeds: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One sequence's chunk: embeddings [T, hidden] and its context (built for that single
        sequence, on the device) -> logits of its last token [1, vocab] (a view: copy to keep)."""
        n = embeds.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.embeds[:n].copy_(embeds)
        self.positions[:n].copy_(ctx.positions)
        self.kv_limits[:n].copy_(ctx.kv_limits)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)  # padding rows: no KV write
        self.query_start_loc.copy_(ctx.query_start_loc)
        self.seq_lens.copy_(ctx.seq_lens)
        self.block_tables[:, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        self.last.fill_(n - 1)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size]
