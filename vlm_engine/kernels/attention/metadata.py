"""Per-step attention metadata shared by every layer of one forward pass.

A step is a flat batch: the query tokens of several sequences laid end to end (`[T]` tensors),
sequence i owning rows `query_start_loc[i]:query_start_loc[i+1]`. Its query tokens are the last
`query_len` positions of a sequence of `seq_len` tokens; the earlier `seq_len - query_len`
(the context) are already in the paged KV cache.

Masking reduces to two bounds per query token at position p: it sees key positions k with
`k < kv_limits[token]` (p + 1 for causal tokens; the end of its image group for image tokens,
which attend bidirectionally inside their group) and, on sliding layers, `k > p - window`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_engine.device import to_device
from vlm_engine.vocab.inputs import ImageGroup


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences of a step that have a single query token, gathered for one batched pass."""

    seq_ids: list[int]
    rows: torch.Tensor  # [S] token row of each
    slots: torch.Tensor  # [S, L] KV slot of each key position (0 past the sequence's end)
    valid: torch.Tensor  # [S, L] key position < seq_len
    key_positions: torch.Tensor  # [L]


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64
    kv_limits: torch.Tensor  # [T] int64, exclusive upper bound of visible key positions
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    slot_mapping: torch.Tensor | None = None  # [T] int64 KV slot per token, -1 = padding
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32
    kv_caches: Sequence[torch.Tensor] | None = None  # per layer [2, blocks, bs, kv_heads, dim]
    max_query_len: int | None = None  # host-side hint for kernels (1: a decode-only step)

    @functools.cached_property
    def decode_batch(self) -> DecodeBatch | None:
        """Built once per step on first use, shared by every layer; None without decodes."""
        seq_ids = [i for i, n in enumerate(self.query_lens_cpu) if n == 1]
        if not self.uses_kv_cache or len(seq_ids) < 2:
            return None
        device = self.positions.device
        block_size = self.kv_caches[0].shape[2]
        seq_lens = self.seq_lens[seq_ids].long()
        key_positions = torch.arange(int(seq_lens.max()), device=device)
        tables = self.block_tables[seq_ids].long()
        num_blocks = tables.shape[1]
        block_index = (key_positions // block_size).clamp(max=num_blocks - 1)
        slots = tables[:, block_index] * block_size + key_positions % block_size
        valid = key_positions[None, :] < seq_lens[:, None]
        rows = self.query_start_loc[seq_ids].long()
        return DecodeBatch(seq_ids, rows, slots.masked_fill(~valid, 0), valid, key_positions)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def uses_kv_cache(self) -> bool:
        return self.kv_caches is not None

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        image_groups: Sequence[Sequence[ImageGroup]],
        device: torch.device,
        **paged: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> ForwardContext:
        """Positions and masking bounds for a step; `paged` holds the KV-cache fields."""
        positions, kv_limits = [], []
        for query_len, seq_len, groups in zip(query_lens, seq_lens, image_groups, strict=True):
            start = seq_len - query_len
            seq_positions = list(range(start, seq_len))
            limits = [p + 1 for p in seq_positions]
            for group in groups:
                for p in range(max(group.offset, start), min(group.end, seq_len)):
                    limits[p - start] = group.end
            positions += seq_positions
            kv_limits += limits
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        # Through pinned memory without blocking: a plain copy to a GPU would wait for the work
        # queued before it (the step's vision tower) instead of launching the layers meanwhile.
        return cls(
            positions=to_device(torch.tensor(positions, dtype=torch.int64), device),
            kv_limits=to_device(torch.tensor(kv_limits, dtype=torch.int64), device),
            query_start_loc=to_device(torch.tensor(starts, dtype=torch.int32), device),
            seq_lens=to_device(torch.tensor(list(seq_lens), dtype=torch.int32), device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            max_query_len=max(query_lens),
            **paged,
        )

    @classmethod
    def full_sequences(
        cls,
        seq_lens: Sequence[int],
        image_groups: Sequence[Sequence[ImageGroup]] | None = None,
        device: torch.device | str = "cpu",
    ) -> ForwardContext:
        """Whole sequences in one step with no KV cache (prefill without paging)."""
        groups = image_groups if image_groups is not None else [()] * len(seq_lens)
        return cls.build(seq_lens, seq_lens, groups, torch.device(device))
