"""Persistent block-table rows and decode inputs built from them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from vlm_engine.runtime.input_batch import BlockTableRows, DecodeInputs

CPU = torch.device("cpu")


def chunk(request_id: str, start: int, block_ids: list[int], tokens: list[int] | None = None):
    request = SimpleNamespace(request_id=request_id, all_token_ids=tokens or [0] * (start + 1))
    return SimpleNamespace(request=request, start=start, block_ids=block_ids)


def test_rows_persist_grow_and_are_reused_after_release():
    table = BlockTableRows(max_rows=2, max_blocks=4, device=CPU)
    rows = table.rows([chunk("a", 0, [7]), chunk("b", 0, [3, 4])])
    assert sorted(rows.tolist()) == [0, 1]
    row_a = int(rows[0])
    table.np_table[row_a, 1] = -5  # never written: only new blocks are copied in
    again = table.rows([chunk("a", 5, [7, 9])])
    assert int(again[0]) == row_a and table.np_table[row_a, :2].tolist() == [7, 9]
    table.release(["a", "unknown"])
    assert table.rows([chunk("c", 0, [1, 2, 8])]).tolist() == [row_a]
    assert table.np_table[row_a, :3].tolist() == [1, 2, 8]


def test_decode_inputs_from_rows():
    table = BlockTableRows(max_rows=4, max_blocks=3, device=CPU)
    chunks = [chunk("a", 5, [7, 2], [11] * 5 + [42]), chunk("b", 0, [4], [13])]
    rows = table.rows(chunks)
    ids, positions, slots, tables, seq_lens = DecodeInputs(4, 3, 4, CPU).fill(chunks, rows, table)
    assert ids.tolist() == [42, 13] and positions.tolist() == [5, 0]
    assert slots.tolist() == [2 * 4 + 1, 4 * 4 + 0]  # position 5 is in block 2 at offset 1
    assert seq_lens.tolist() == [6, 1] and seq_lens.dtype == torch.int32
    assert np.array_equal(tables.numpy(), [[7, 2], [4, 0]])
