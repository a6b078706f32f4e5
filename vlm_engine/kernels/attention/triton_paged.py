"""Paged attention over a mixed prefill/decode step: one Triton kernel, same contract as
`attention_ref` with a paged cache (reference.py; the step's bounds in metadata.py).

Query token t at position p sees key k when `k < kv_limits[t]` and, on sliding layers,
`k > p - window`; that one rule covers causal, sliding window, prefix-cached context and
bidirectional image groups. This step's keys and values are already in the cache.

Work decomposition
- A program owns one KV head and a tile of up to BLOCK_Q query tokens of one sequence, with all
  GROUP query heads of that KV head: its BLOCK_M rows are (token, head) pairs, so every K/V
  tile is read once per group. BLOCK_M is at least 16 (tl.dot); extra rows are masked.
- Grid mapping, computed on the device from `query_start_loc` (no host sync, grid size from
  shapes only): sequence i owns tiles [first(i), first(i + 1)) with
  first(i) = query_start_loc[i] // BLOCK_Q + i, which leaves room for its
  ceil(query_len / BLOCK_Q) tiles; the spare ones exit at once. Grid: (T // BLOCK_Q + S, kv_heads),
  each program binary-searches its sequence. A decode-only step (`max_query_len=1`, so T == S)
  uses a fixed (S, kv_heads) grid with program i on sequence i: no value-dependent host work,
  ready for CUDA-graph capture.
- KV tiles of BLOCK_N keys are read through the block table with per-key addresses, so any
  cache block size works (a tile may span blocks or share one). A program visits only the tiles
  between the lowest key any of its rows may see (window bound of its smallest position) and
  the largest kv_limit of its rows; keys outside that range are never read, even inside a
  visited tile (blocks that slid out of a window may hold anything).
- Split KV for small decode batches (split_kv.py): with few sequences the (S, kv_heads) grid
  leaves most SMs idle while each program walks the whole context. A decode step may then add a
  third grid axis of NUM_SPLITS programs per (sequence, KV head), each taking an equal share of
  the tiles to visit, writing its unnormalized output and softmax statistics (running max, sum)
  to float32 scratch; the last split program of a (sequence, KV head) to finish combines them
  (kernels/arrival.py). The split count depends only on the batch size and the device, so each
  CUDA graph captures a fixed one.
- Online softmax in float32 with exp2 and a log2(e)-scaled scale.
"""

import math
from dataclasses import dataclass

import torch

from vlm_engine.kernels.arrival import COUNTER_SLOTS, arrive_last, counter_buffer, reset
from vlm_engine.kernels.attention.split_kv import default_num_splits, merge_splits
from vlm_engine.kernels.pdl import pdl_options, pdl_wait
from vlm_engine.kernels.platform import jit, tl, triton, triton_available


@jit
def paged_attention_kernel(
    out_ptr,  # [T, num_heads, head_dim]
    query_ptr,  # [T, num_heads, head_dim]
    kv_cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    query_start_loc_ptr,  # [S + 1] int32
    positions_ptr,  # [T] int64
    kv_limits_ptr,  # [T] int64
    visited_tiles_ptr,  # [T, num_kv_heads] int32, written only when COUNT_TILES
    split_acc_ptr,  # [S, num_heads, NUM_SPLITS, HEAD_DIM] float32, used when NUM_SPLITS > 1
    split_max_ptr,  # [S, num_heads, NUM_SPLITS] float32 (log2 domain)
    split_sum_ptr,  # [S, num_heads, NUM_SPLITS] float32
    counter_ptr,  # [>= S * num_kv_heads] int32 arrival counters, used when NUM_SPLITS > 1
    scale_log2e,
    window,
    num_seqs,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_ckv,
    stride_cblock,
    stride_cslot,
    stride_chead,
    stride_cd,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two (tl.arange, tl.dot)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program, >= BLOCK_Q * GROUP_PAD
    BLOCK_N: tl.constexpr,  # keys per KV tile
    KV_BLOCK_SIZE: tl.constexpr,
    ONE_QUERY_PER_SEQ: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # > 1 only with ONE_QUERY_PER_SEQ
    USE_PDL: tl.constexpr,
):
    # Up to pdl_wait this reads only the step's metadata (positions, limits, block tables),
    # written before the forward pass began: with PDL it overlaps the kernel before.
    kv_head = tl.program_id(1)
    if ONE_QUERY_PER_SEQ:
        seq = tl.program_id(0)
        tile_start = 0
    else:
        # Last tiles first: in a causal prefill they see the most keys, so the tail is shorter.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        lo = tile * 0  # invariant: first(lo) <= tile < first(hi)
        hi = lo + num_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            owns = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile
            lo = tl.where(owns, mid, lo)
            hi = tl.where(owns, hi, mid)
        seq = lo
        tile_start = (tile - tl.load(query_start_loc_ptr + seq) // BLOCK_Q - seq) * BLOCK_Q
    query_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_begin

    rows = tl.arange(0, BLOCK_M)
    row_head = rows % GROUP_PAD
    row_token = tile_start + rows // GROUP_PAD  # index inside the sequence's query
    row_valid = (rows < BLOCK_Q * GROUP_PAD) & (row_head < GROUP) & (row_token < query_len)
    token = (query_begin + row_token).to(tl.int64)
    head = kv_head * GROUP + row_head
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM  # padded dims read as zeros and are never written

    seq_len = tl.load(seq_lens_ptr + seq)
    position = tl.load(positions_ptr + token, mask=row_valid, other=0)
    kv_limit = tl.minimum(tl.load(kv_limits_ptr + token, mask=row_valid, other=0), seq_len)
    # Keys [kv_start, kv_end) are the union of what the rows see; nothing else is read.
    kv_end = tl.max(kv_limit, axis=0).to(tl.int32)
    if USE_WINDOW:
        lowest_visible = tl.where(row_valid, position - window + 1, seq_len)
        kv_start = tl.maximum(tl.min(lowest_visible, axis=0), 0).to(tl.int32)
    else:
        kv_start = 0
    first_tile = (kv_start // BLOCK_N) * BLOCK_N
    last_key = kv_end
    if NUM_SPLITS > 1:  # this program's share of the tiles to visit
        tiles_per_split = tl.cdiv(tl.cdiv(kv_end - first_tile, BLOCK_N), NUM_SPLITS)
        first_tile += tl.program_id(2) * tiles_per_split * BLOCK_N
        last_key = tl.minimum(kv_end, first_tile + tiles_per_split * BLOCK_N)

    table = block_tables_ptr + seq * stride_bt
    keys = first_tile + tl.arange(0, BLOCK_N)
    first_needed = (keys >= kv_start) & (keys < tl.minimum(kv_end, last_key))
    first_blocks = tl.load(table + keys // KV_BLOCK_SIZE, mask=first_needed, other=0)
    cache = kv_cache_ptr + kv_head * stride_chead
    # q and the newest keys and values come from the kernels before this one.
    pdl_wait(USE_PDL)
    if tile_start >= query_len:
        return
    q_offsets = token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(
        query_ptr + q_offsets, mask=row_valid[:, None] & dim_valid[None, :], other=0.0
    )  # [BLOCK_M, HEAD_DIM_PAD]

    # A finite floor: a tile a row cannot see gives exp2(-inf - floor) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    num_visited = kv_end * 0
    for tile_key in range(first_tile, last_key, BLOCK_N):
        keys = tile_key + tl.arange(0, BLOCK_N)
        needed = (keys >= kv_start) & (keys < kv_end)
        in_first = keys < first_tile + BLOCK_N  # whose block ids were read before waiting
        block = tl.load(table + keys // KV_BLOCK_SIZE, mask=needed & ~in_first, other=0)
        block = tl.where(in_first, first_blocks, block).to(tl.int64)
        slot = block * stride_cblock + (keys % KV_BLOCK_SIZE) * stride_cslot
        k = tl.load(
            cache + slot[None, :] + dims[:, None] * stride_cd,
            mask=needed[None, :] & dim_valid[:, None],
            other=0.0,
        )  # [HEAD_DIM_PAD, BLOCK_N]
        v = tl.load(
            cache + stride_ckv + slot[:, None] + dims[None, :] * stride_cd,
            mask=needed[:, None] & dim_valid[None, :],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM_PAD]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2e
        visible = keys[None, :] < kv_limit[:, None]
        if USE_WINDOW:
            visible = visible & (keys[None, :] > position[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        if COUNT_TILES:
            num_visited += 1

    if NUM_SPLITS > 1:  # token == seq here; the last split of this KV head merges
        split_row = (token * (num_kv_heads * GROUP) + head) * NUM_SPLITS + tl.program_id(2)
        tl.store(split_max_ptr + split_row, m_i, mask=row_valid)
        tl.store(split_sum_ptr + split_row, l_i, mask=row_valid)
        acc_offsets = split_row[:, None] * HEAD_DIM + dims[None, :]
        tl.store(split_acc_ptr + acc_offsets, acc, mask=row_valid[:, None] & dim_valid[None, :])
        group_id = seq * num_kv_heads + kv_head
        if arrive_last(counter_ptr, group_id, NUM_SPLITS):
            for g in tl.static_range(GROUP):
                h = kv_head * GROUP + g
                merged = merge_splits(
                    split_acc_ptr, split_max_ptr, split_sum_ptr,
                    seq.to(tl.int64) * (num_kv_heads * GROUP) + h, HEAD_DIM, HEAD_DIM_PAD,
                    NUM_SPLITS,
                )  # fmt: skip
                o_offsets = query_begin.to(tl.int64) * stride_ot + h * stride_oh + dims * stride_od
                tl.store(out_ptr + o_offsets, merged.to(out_ptr.dtype.element_ty), mask=dim_valid)
            reset(counter_ptr, group_id)
        return
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only masked padding rows see no key
    out = acc / l_i[:, None]
    o_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od
    o_mask = row_valid[:, None] & dim_valid[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    if COUNT_TILES:
        tl.store(visited_tiles_ptr + token * num_kv_heads + kv_head, num_visited, mask=row_valid)


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: `block_m` rows (query tokens x padded GQA group) by `block_n` keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def default_tile_config(head_dim: int, decode_only: bool, num_splits: int = 1) -> TileConfig:
    # Starting points for Hopper; head_dim 256 keeps the fp32 accumulator in registers.
    if decode_only:  # one query token per program: bandwidth bound, pipeline the K/V loads
        # Split KV (small batches) leaves each program a tile or two: a shallower pipeline has
        # less to fill (docs/kernels.md has the sweep).
        stages = 2 if num_splits > 1 else 3
        return TileConfig(block_m=16, block_n=64 if head_dim <= 128 else 32, num_stages=stages)
    if head_dim <= 128:
        return TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    kv_limits: torch.Tensor,
    scale: float,
    window: int | None,
    max_query_len: int | None = None,
    *,
    tile_config: TileConfig | None = None,
    visited_tiles: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of a step's query tokens over the paged cache -> [T, num_heads, head_dim].

    query: [T, num_heads, head_dim]; kv_cache: [2, num_blocks, block_size, num_kv_heads,
    head_dim] holding this step's keys/values already; block_tables [S, max_blocks] int32;
    seq_lens [S] int32; query_start_loc [S + 1] int32 with query_start_loc[S] == T (rows past
    it are left unwritten); positions, kv_limits [T] int64. Nothing is read back to the host.

    `max_query_len` is a host-side hint: 1 promises exactly one query token per sequence and
    selects the fixed decode grid (T == S is checked); larger values only shrink the query
    tile, so a wrong one costs speed, not correctness. `tile_config` overrides
    `default_tile_config`; `visited_tiles` ([T, num_kv_heads] int32, for tests) receives how
    many KV tiles the program of each token read. `num_splits` (a power of two, decode-only
    steps) overrides `default_num_splits`.
    """
    _check_inputs(query, kv_cache, block_tables, seq_lens, query_start_loc, positions, kv_limits)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], kv_cache.shape[3]
    _check_options(query, kv_cache, num_seqs, window, max_query_len, visited_tiles, num_splits)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    decode_only = max_query_len == 1
    if not decode_only or visited_tiles is not None:
        num_splits = 1
    elif num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, query.device)
    if num_seqs * num_kv_heads > COUNTER_SLOTS:  # one arrival counter per (sequence, KV head)
        num_splits = 1
    split_acc = split_max = split_sum = None
    if num_splits > 1:
        f32 = dict(dtype=torch.float32, device=query.device)
        split_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, **f32)
        split_max = torch.empty(num_seqs, num_heads, num_splits, **f32)
        split_sum = torch.empty(num_seqs, num_heads, num_splits, **f32)
    config = tile_config or default_tile_config(head_dim, decode_only, num_splits)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = 1 if decode_only else max(1, config.block_m // group_pad)
    if max_query_len is not None:
        block_q = min(block_q, triton.next_power_of_2(max_query_len))
    num_programs = num_seqs if decode_only else num_tokens // block_q + num_seqs
    paged_attention_kernel[(num_programs, num_kv_heads, num_splits)](
        out,
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        positions,
        kv_limits,
        visited_tiles,
        split_acc,
        split_max,
        split_sum,
        counter_buffer(query.device),
        scale * math.log2(math.e),
        window or 0,
        num_seqs,
        num_kv_heads,
        *query.stride(),
        *out.stride(),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        kv_cache.stride(4),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=max(16, block_q * group_pad),
        BLOCK_N=config.block_n,
        KV_BLOCK_SIZE=kv_cache.shape[2],
        ONE_QUERY_PER_SEQ=decode_only,
        USE_WINDOW=window is not None,
        COUNT_TILES=visited_tiles is not None,
        # fp32 inputs would otherwise go through TF32 on the GPU (~1e-3 error).
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        NUM_SPLITS=num_splits,
        **pdl_options(query.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def _check_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    kv_limits: torch.Tensor,
) -> None:
    if triton is None:
        raise RuntimeError("paged_attention needs triton; use attention_ref without it")
    _check_query_and_cache(query, kv_cache)
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be [S], got {tuple(seq_lens.shape)}")
    num_seqs, num_tokens = seq_lens.shape[0], query.shape[0]
    metadata = {
        "block_tables": (block_tables, torch.int32, (num_seqs, block_tables.shape[-1])),
        "seq_lens": (seq_lens, torch.int32, (num_seqs,)),
        "query_start_loc": (query_start_loc, torch.int32, (num_seqs + 1,)),
        "positions": (positions, torch.int64, (num_tokens,)),
        "kv_limits": (kv_limits, torch.int64, (num_tokens,)),
    }
    for name, (tensor, dtype, shape) in metadata.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query on {query.device}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if not triton_available(query.device, paged_attention_kernel):
        raise RuntimeError(
            f"paged_attention cannot run on {query.device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before importing vlm_engine.kernels.attention.triton_paged"
        )


def _check_query_and_cache(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [T, num_heads, head_dim], got {tuple(query.shape)}")
    num_heads, head_dim = query.shape[1:]
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim] with the "
            f"query's head_dim {head_dim}, got {tuple(kv_cache.shape)}"
        )
    if head_dim < 16 or head_dim > 256:
        raise ValueError(f"head_dim must be in [16, 256], got {head_dim}")
    if num_heads % kv_cache.shape[3]:
        raise ValueError(
            f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_cache.shape[3]}"
        )
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if kv_cache.dtype != query.dtype:
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} differs from query dtype {query.dtype}")
    if kv_cache.device != query.device:
        raise ValueError(f"kv_cache is on {kv_cache.device}, query on {query.device}")


def _check_options(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    num_seqs: int,
    window: int | None,
    max_query_len: int | None,
    visited_tiles: torch.Tensor | None,
    num_splits: int | None,
) -> None:
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    if max_query_len is not None and max_query_len < 1:
        raise ValueError(f"max_query_len must be None or >= 1, got {max_query_len}")
    if max_query_len == 1 and query.shape[0] != num_seqs:
        raise ValueError(
            f"max_query_len=1 means one query token per sequence, but T={query.shape[0]} "
            f"tokens for S={num_seqs} sequences"
        )
    if visited_tiles is not None:
        shape = (query.shape[0], kv_cache.shape[3])
        if tuple(visited_tiles.shape) != shape or visited_tiles.dtype != torch.int32:
            raise ValueError(f"visited_tiles must be int32 of shape {shape}")
        if not visited_tiles.is_contiguous() or visited_tiles.device != query.device:
            raise ValueError("visited_tiles must be contiguous, on the query's device")
