"""Host-side batch state that persists across steps, so a step does not rebuild it from lists.

Each request the runner has seen keeps a row of a block table held in pinned host memory: a step
writes only the blocks a request gained since its previous step, and the rows of the step's
requests are gathered with one numpy index. A request's row is released when it finishes or is
preempted (the scheduler reports both with the next step), and reused by a later request.
Decode inputs (ids, positions, KV slots, lengths) are computed from these rows in vectorized
numpy, in pinned buffers the device copies from asynchronously.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm_engine.device import pinned

if TYPE_CHECKING:
    from vlm_engine.vocab.scheduler_output import ScheduledChunk


# Where a step's pending input tokens go (token rows on the device; None: the first rows, in
# order) and their ids on the device, sampled by the step before.
PendingIds = tuple[torch.Tensor | None, torch.Tensor]


def fill_pending(input_ids: torch.Tensor, pending: PendingIds | None) -> None:
    """Write the pending token ids into a step's input ids, on the device."""
    if pending is None:
        return
    rows, values = pending
    if rows is None:
        input_ids[: values.shape[0]].copy_(values)
    else:
        input_ids[rows] = values


class BlockTableRows:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.table = pinned((max_rows, max_blocks), torch.int32, device)
        self.np_table = self.table.numpy()
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def release(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.num_blocks[row] = 0
                self.free_rows.append(row)

    def rows(self, chunks: Sequence[ScheduledChunk]) -> np.ndarray:
        """Row of each chunk's request, its blocks up to date. [S] int64"""
        rows = np.empty(len(chunks), dtype=np.int64)
        for i, chunk in enumerate(chunks):
            request_id = chunk.request.request_id
            row = self.row_of.get(request_id)
            if row is None:
                row = self.row_of[request_id] = self.free_rows.pop()
            known, blocks = self.num_blocks[row], chunk.block_ids
            if len(blocks) > known:
                self.np_table[row, known : len(blocks)] = blocks[known:]
                self.num_blocks[row] = len(blocks)
            rows[i] = row
        return rows

    def tables(self, rows: np.ndarray) -> np.ndarray:
        """Block tables of `rows`, as wide as the longest: [len(rows), max blocks] int32."""
        return self.np_table[rows, : int(self.num_blocks[rows].max())]


class DecodeInputs:
    """Pinned host buffers for a decode-only step: one token per sequence."""

    def __init__(self, max_seqs: int, max_blocks: int, block_size: int, device: torch.device):
        self.block_size = block_size
        self.input_ids = pinned((max_seqs,), torch.int64, device)
        self.positions = pinned((max_seqs,), torch.int64, device)
        self.slot_mapping = pinned((max_seqs,), torch.int64, device)
        self.seq_lens = pinned((max_seqs,), torch.int32, device)
        self.block_tables = pinned((max_seqs, max_blocks), torch.int32, device)

    def fill(
        self, chunks: Sequence[ScheduledChunk], rows: np.ndarray, table: BlockTableRows
    ) -> tuple[torch.Tensor, ...]:
        """Inputs of the step as views of the pinned buffers (valid until the next fill)."""
        n = len(chunks)
        positions = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
        ids = np.fromiter(
            (_known_token(c.request.all_token_ids, c.start) for c in chunks), np.int64, n
        )
        tables = table.tables(rows)  # [n, width]
        width = tables.shape[1]
        bs = self.block_size
        blocks = tables[np.arange(n), positions // bs]
        self.input_ids.numpy()[:n] = ids
        self.positions.numpy()[:n] = positions
        self.slot_mapping.numpy()[:n] = blocks * bs + positions % bs
        self.seq_lens.numpy()[:n] = positions + 1
        self.block_tables.numpy()[:n, :width] = tables
        return (
            self.input_ids[:n],  # pending tokens (0 here) are filled in on the device
            self.positions[:n],
            self.slot_mapping[:n],
            self.block_tables[:n, :width],
            self.seq_lens[:n],
        )


def _known_token(token_ids: Sequence[int], position: int) -> int:
    return token_ids[position] if position < len(token_ids) else 0  # 0: pending
