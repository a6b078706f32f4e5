"""Steps replayed from captured CUDA graphs: decode-only steps, one graph per padded batch size,
and prompt chunks of a single sequence, one graph per padded token count.

A step of either kind runs the same kernels every time, only on other data: the graph of the
smallest captured size that fits is replayed after the step's inputs are copied into its static
buffers. Every kernel takes its sizes from device tensors (the attention kernel's grid depends
on the padded shape only), so one graph serves any context length and any image layout.
The attention backend owns the graphs' metadata buffers and fills them, padding rows included
(no KV write, slot -1); padding rows' outputs are never read. A single-sequence graph starts
from the input embeddings (image rows already placed) and returns the logits of the last real
token. Steps with several sequences of which some prefill, or larger ones, run eagerly.
"""

from __future__ import annotations

import bisect
import logging

import torch

from vlm_engine.kernels.attention.backends import attention_backend
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
        self.sizes = capture_sizes(max_batch)
        device = model.language_model.embed_tokens.weight.device
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        backend = attention_backend(device)
        self.attention = backend.decode_graph_inputs(max_batch, max_blocks_per_seq, kv_caches)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.logits = _capture(self._forward, self.sizes)
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.attention.context(size))
        return self.model.compute_logits(hidden)

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and num_blocks <= self.attention.max_blocks

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
        self.attention.fill(size, positions, slot_mapping, block_tables, seq_lens)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size][:n]


class PrefillGraphRunner:
    """Graphs of one sequence's prompt chunk (any context before it), by padded token count."""

    def __init__(
        self, model: Gemma3Model, kv_caches: list[torch.Tensor], max_tokens: int, max_blocks: int
    ):
        self.model = model
        self.sizes = prefill_sizes(max_tokens)
        weight = model.language_model.embed_tokens.weight
        self.embeds = torch.zeros(
            max_tokens, weight.shape[1], dtype=weight.dtype, device=weight.device
        )
        backend = attention_backend(weight.device)
        self.attention = backend.prefill_graph_inputs(max_tokens, max_blocks, kv_caches)
        self.last = torch.zeros(1, dtype=torch.int64, device=weight.device)  # last real token
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
        hidden = self.model.language_model(self.embeds[:size], self.attention.context(size))
        return self.model.compute_logits(hidden[self.last])

    def fits(self, num_tokens: int, num_blocks: int) -> bool:
        return num_tokens <= self.sizes[-1] and num_blocks <= self.attention.max_blocks

    def run(self, embeds: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One sequence's chunk: embeddings [T, hidden] and its context (built for that single
        sequence, on the device) -> logits of its last token [1, vocab] (a view: copy to keep)."""
        n = embeds.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.embeds[:n].copy_(embeds)
        self.attention.fill(ctx, size)
        self.last.fill_(n - 1)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size]
