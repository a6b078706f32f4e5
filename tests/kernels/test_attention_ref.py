"""The batched decode path of the reference attention equals attending one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.kernels.attention.reference import attend_one_ref, attention_ref, gather_kv_ref


@pytest.mark.parametrize("window", [None, 5])
def test_decode_batch_matches_per_sequence(window):
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks, kv_heads, heads, dim = 4, 40, 2, 4, 8
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen)
    seq_lens = [9, 1, 17, 12, 30]
    query_lens = [1, 1, 3, 1, 1]  # one 3-token chunk among single-token decodes
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in seq_lens:
        need = -(-n // block_size)
        tables.append(order[used : used + need] + [0] * (8 - need))
        used += need
    ctx = ForwardContext.build(
        query_lens,
        seq_lens,
        [[]] * len(seq_lens),
        torch.device("cpu"),
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        kv_caches=[cache],
    )
    assert ctx.decode_batch is not None and ctx.decode_batch.seq_ids == [0, 1, 3, 4]
    query = torch.randn(sum(query_lens), heads, dim, generator=gen)
    out = attention_ref(query, query, query, ctx, 0, 0.3, window)
    start = 0
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        rows = slice(start, start + q_len)
        start += q_len
        key, value = gather_kv_ref(cache, ctx.block_tables[i], s_len)
        expected = attend_one_ref(
            query[rows], key, value, ctx.positions[rows], ctx.kv_limits[rows], 0.3, window
        )
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-6)
