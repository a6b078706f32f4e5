"""Attention backends: how the decoder's attention runs on a device, and the static metadata its
CUDA graphs replay.

- `TorchAttention` runs the plain torch reference (kernels/attention/reference.py): the CPU path
  and every pass without a KV cache.
- `TritonPagedAttention` runs the paged Triton kernel (kernels/attention/triton_paged.py) over
  the KV cache, and the reference for passes without one.

`attention_backend(device)` is the one choice between them. A backend also owns what a CUDA
graph needs of its metadata: `decode_graph_inputs` and `prefill_graph_inputs` give static
buffers that a graph is captured over (`context(size)`) and that each replay fills with its
step's values (`fill`), padding rows included.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence

import torch

from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.kernels.attention.reference import attention_ref
from vlm_engine.kernels.attention.triton_paged import paged_attention
from vlm_engine.kernels.platform import triton_available


class AttentionBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        ctx: ForwardContext,
        layer_idx: int,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """query [T, heads, dim], this step's key/value [T, kv_heads, dim] (already in the
        cache when `ctx` uses one) -> [T, heads, dim]."""

    def decode_graph_inputs(
        self, max_batch: int, max_blocks: int, kv_caches: Sequence[torch.Tensor]
    ) -> DecodeGraphInputs:
        return DecodeGraphInputs(max_batch, max_blocks, kv_caches)

    def prefill_graph_inputs(
        self, max_tokens: int, max_blocks: int, kv_caches: Sequence[torch.Tensor]
    ) -> PrefillGraphInputs:
        return PrefillGraphInputs(max_tokens, max_blocks, kv_caches)


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, ctx, layer_idx, scale, window):
        return attention_ref(query, key, value, ctx, layer_idx, scale, window)


class TritonPagedAttention(AttentionBackend):
    name = "triton_paged"

    def forward(self, query, key, value, ctx, layer_idx, scale, window):
        if not ctx.uses_kv_cache:  # a whole-sequence pass without a cache
            return attention_ref(query, key, value, ctx, layer_idx, scale, window)
        return paged_attention(
            query, ctx.kv_caches[layer_idx], ctx.block_tables, ctx.seq_lens,
            ctx.query_start_loc, ctx.positions, ctx.kv_limits, scale, window, ctx.max_query_len,
        )  # fmt: skip


@functools.cache
def _backend(kind: str) -> AttentionBackend:
    return TritonPagedAttention() if kind == "triton" else TorchAttention()


def attention_backend(device: torch.device) -> AttentionBackend:
    """The backend for tensors on `device`: the Triton kernel on a GPU with triton installed,
    the torch reference elsewhere."""
    return _backend("triton" if device.type == "cuda" and triton_available(device) else "torch")


def _token_buffers(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-token metadata filled as padding: positions 0, kv_limits 1, slot -1 (no KV write)."""
    longs = dict(dtype=torch.int64, device=device)
    return torch.zeros(n, **longs), torch.ones(n, **longs), torch.full((n,), -1, **longs)


class DecodeGraphInputs:
    """Static metadata of decode-only steps: one token per sequence, up to `max_batch`."""

    def __init__(self, max_batch: int, max_blocks: int, kv_caches: Sequence[torch.Tensor]):
        device = kv_caches[0].device
        ints = dict(dtype=torch.int32, device=device)
        self.kv_caches = kv_caches
        self.positions, self.kv_limits, self.slot_mapping = _token_buffers(max_batch, device)
        self.seq_lens = torch.ones(max_batch, **ints)
        self.query_start_loc = torch.arange(max_batch + 1, **ints)
        self.block_tables = torch.zeros(max_batch, max_blocks, **ints)

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def context(self, size: int) -> ForwardContext:
        """The metadata of a `size`-sequence graph, as views of the static buffers."""
        return ForwardContext(
            positions=self.positions[:size], kv_limits=self.kv_limits[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            query_lens_cpu=[1] * size, seq_lens_cpu=[], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size], kv_caches=self.kv_caches, max_query_len=1,
        )  # fmt: skip

    def fill(
        self,
        size: int,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        """A step's `n` sequences into the graph of `size` >= n; the copies are asynchronous
        (inputs on the device or in pinned host memory)."""
        n = positions.shape[0]
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


class PrefillGraphInputs:
    """Static metadata of one sequence's prompt chunk of up to `max_tokens` tokens (any context
    before it in the cache)."""

    def __init__(self, max_tokens: int, max_blocks: int, kv_caches: Sequence[torch.Tensor]):
        device = kv_caches[0].device
        ints = dict(dtype=torch.int32, device=device)
        self.kv_caches = kv_caches
        self.positions, self.kv_limits, self.slot_mapping = _token_buffers(max_tokens, device)
        self.query_start_loc = torch.tensor([0, 1], **ints)
        self.seq_lens = torch.ones(1, **ints)
        self.block_tables = torch.zeros(1, max_blocks, **ints)

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def context(self, size: int) -> ForwardContext:
        return ForwardContext(
            positions=self.positions[:size], kv_limits=self.kv_limits[:size],
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, query_lens_cpu=[size],
            seq_lens_cpu=[size], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables, kv_caches=self.kv_caches, max_query_len=size,
        )  # fmt: skip

    def fill(self, ctx: ForwardContext, size: int) -> None:
        """One sequence's chunk, its context built for that sequence alone on the device, into
        the graph of `size` tokens; padding rows write no KV."""
        n = ctx.positions.shape[0]
        self.positions[:n].copy_(ctx.positions)
        self.kv_limits[:n].copy_(ctx.kv_limits)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.query_start_loc.copy_(ctx.query_start_loc)
        self.seq_lens.copy_(ctx.seq_lens)
        self.block_tables[:, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
