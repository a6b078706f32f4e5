"""Attention over a flat batch of sequences: causal, sliding window, bidirectional image groups.

`attention_ref` is the plain torch reference (and the CPU path): it loops over sequences and
builds each one's mask from the bounds in the ForwardContext (kernels/attention/metadata.py).
"""

from __future__ import annotations

import torch

from vlm_engine.kernels.attention.metadata import DecodeBatch, ForwardContext


def gather_kv_ref(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # kv_cache: [2, num_blocks, block_size, kv_heads, dim] -> keys, values: [seq_len, kv_heads, dim]
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = kv_cache[:, block_table[:num_blocks].long()]
    blocks = blocks.reshape(2, num_blocks * block_size, *kv_cache.shape[-2:])
    return blocks[0, :seq_len], blocks[1, :seq_len]


def attend_one_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    kv_limits: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    # query: [Q, heads, dim]  key/value: [K, kv_heads, dim]  positions/kv_limits: [Q]
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    key_pos = torch.arange(key.shape[0], device=query.device)
    visible = key_pos[None, :] < kv_limits[:, None]
    if window is not None:
        visible &= key_pos[None, :] > positions[:, None] - window
    key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
    value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, key) * scale  # [heads, Q, K]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.einsum("hqk,khd->qhd", probs, value)


def attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: ForwardContext,
    layer_idx: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    # query: [T, heads, dim]  key/value: [T, kv_heads, dim] (this step's, already in the cache
    # when ctx uses one) -> [T, heads, dim]
    out = torch.empty_like(query)
    decode = ctx.decode_batch
    if decode is not None:  # single-token queries of many sequences: one batched pass
        rows = decode.rows
        out[rows] = decode_attention_ref(
            query[rows], ctx.kv_caches[layer_idx], decode, ctx.positions[rows], scale, window
        )
    batched = set(decode.seq_ids) if decode is not None else set()
    start = 0
    for i, (query_len, seq_len) in enumerate(
        zip(ctx.query_lens_cpu, ctx.seq_lens_cpu, strict=True)
    ):
        rows = slice(start, start + query_len)
        start += query_len
        if i in batched:
            continue
        if ctx.uses_kv_cache:
            seq_key, seq_value = gather_kv_ref(
                ctx.kv_caches[layer_idx], ctx.block_tables[i], seq_len
            )
        else:
            seq_key, seq_value = key[rows], value[rows]
        out[rows] = attend_one_ref(
            query[rows], seq_key, seq_value, ctx.positions[rows], ctx.kv_limits[rows], scale, window
        )
    return out


def decode_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    decode: DecodeBatch,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    # query: [S, heads, dim], one token per sequence -> [S, heads, dim]
    num_seqs, num_heads, dim = query.shape
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    keys, values = flat[0][decode.slots], flat[1][decode.slots]  # [S, L, kv_heads, dim]
    num_kv_heads = keys.shape[2]
    visible = decode.valid
    if window is not None:
        visible = visible & (decode.key_positions[None, :] > positions[:, None] - window)
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, dim)
    scores = torch.einsum("skgd,slkd->skgl", q, keys) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.einsum("skgl,slkd->skgd", probs, values).reshape(num_seqs, num_heads, dim)
