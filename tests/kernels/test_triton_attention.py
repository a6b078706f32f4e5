"""The Triton paged-attention kernel against `attention_ref`.

Natively on a CUDA device; without one, in float32 under the Triton interpreter, switched on
per test by the `interpret_on_cpu` fixture. Setting TRITON_INTERPRET when this module is
imported would not do: triton.jit reads it when a function is decorated, and triton decorates
its own library (tl.max, tl.sum) when triton is first imported, which may be earlier (any
module importing the kernel); and the variable would stay set for every other test.
"""

import pytest
import torch

from vlm_engine.kernels.attention import split_kv, triton_paged
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.kernels.attention.reference import attention_ref
from vlm_engine.kernels.attention.triton_paged import TileConfig, paged_attention
from vlm_engine.vocab.inputs import ImageGroup

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# 16 x 16 tiles so that short sequences still span several KV tiles and query tiles.
SMALL_TILES = TileConfig(block_m=16, block_n=16)

pytestmark = pytest.mark.skipif(triton_paged.triton is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    """Without CUDA the kernels run on Triton's interpreter (see conftest.py)."""
    if not CUDA:
        interpret(triton_paged, split_kv)


def make_step(
    query_lens,
    seq_lens,
    image_groups=None,
    *,
    num_kv_heads=2,
    group=2,
    head_dim=16,
    block_size=4,
    dtype=torch.float32,
    seed=0,
):
    """Random query and cache (never zeros) for one step, blocks handed out in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks that belong to no sequence
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq) + 2
    tables, used = [], 0
    for n in blocks_per_seq:
        # -1 padding: an entry past the sequence must never be read.
        tables.append(order[used : used + n] + [-1] * (width - n))
        used += n
    query = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=gen)
    groups = image_groups if image_groups is not None else [[]] * len(seq_lens)
    ctx = ForwardContext.build(
        query_lens,
        seq_lens,
        groups,
        DEVICE,
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        kv_caches=[cache.to(DEVICE, dtype)],
    )
    return query.to(DEVICE, dtype), ctx


def run_kernel(query, ctx, window, cache=None, **kwargs):
    kwargs.setdefault("tile_config", SMALL_TILES)
    return paged_attention(
        query,
        ctx.kv_caches[0] if cache is None else cache,
        ctx.block_tables,
        ctx.seq_lens,
        ctx.query_start_loc,
        ctx.positions,
        ctx.kv_limits,
        query.shape[-1] ** -0.5,
        window,
        **kwargs,
    )


def check_against_ref(query, ctx, window, **kwargs):
    out = run_kernel(query, ctx, window, **kwargs)
    expected = attention_ref(query, query, query, ctx, 0, query.shape[-1] ** -0.5, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_query_len", [1, None], ids=["decode-grid", "general-grid"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 6])
def test_decode_only(window, group, max_query_len):
    seq_lens = [1, 7, 23, 40, 17]
    query, ctx = make_step([1] * 5, seq_lens, group=group, seed=group)
    check_against_ref(query, ctx, window, max_query_len=max_query_len)


@pytest.mark.parametrize("num_splits", [2, 4, 16])
@pytest.mark.parametrize("window", [None, 6, 30])
def test_decode_split_kv(window, num_splits):
    # Splits of a few tiles, of one, and empty ones (16 splits over at most 4 tiles of 16).
    seq_lens = [1, 7, 23, 64, 17, 50]
    query, ctx = make_step([1] * 6, seq_lens, seed=num_splits)
    check_against_ref(query, ctx, window, max_query_len=1, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_head_dim_that_is_not_a_power_of_two(num_splits):
    # 48 (the demo model's): the kernel pads to 64 with masked dims, never read or written.
    seq_lens = [1, 7, 23, 40]
    query, ctx = make_step([1] * 4, seq_lens, head_dim=48, seed=5)
    check_against_ref(query, ctx, 6, max_query_len=1, num_splits=num_splits)
    check_against_ref(query, ctx, None, max_query_len=1, num_splits=num_splits)


def test_decode_split_kv_never_reads_invisible_keys():
    query, ctx = make_step([1, 1], [60, 45], seed=3)
    window, poisoned = 10, ctx.kv_caches[0].clone()
    block_size = poisoned.shape[2]
    flat = poisoned.view(2, -1, *poisoned.shape[3:])
    for i, seq_len in enumerate((60, 45)):
        for key in range(seq_len - window):  # slid out of the window
            flat[:, int(ctx.block_tables[i, key // block_size]) * block_size + key % block_size] = (
                float("nan")
            )
    out = run_kernel(query, ctx, window, cache=poisoned, max_query_len=1, num_splits=4)
    expected = attention_ref(query, query, query, ctx, 0, query.shape[-1] ** -0.5, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "block_size,head_dim,group", [(4, 16, 2), (16, 64, 1), (16, 16, 4), (4, 64, 4), (4, 48, 2)]
)
def test_prefill_only(block_size, head_dim, group):
    seq_lens = [5, 33, 18]
    query, ctx = make_step(
        seq_lens, seq_lens, group=group, head_dim=head_dim, block_size=block_size, seed=block_size
    )
    check_against_ref(query, ctx, None, max_query_len=max(seq_lens))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_with_prefix_context(window, block_size):
    # Decodes, a chunk after 25 cached tokens, a short first chunk, a chunk after 3 tokens.
    query_lens, seq_lens = [1, 20, 1, 7, 19], [30, 45, 9, 7, 22]
    query, ctx = make_step(query_lens, seq_lens, block_size=block_size, group=4)
    check_against_ref(query, ctx, window)


@pytest.mark.parametrize("window", [1, 3, 8, 64])
def test_sliding_window_smaller_and_larger_than_sequences(window):
    query_lens, seq_lens = [1, 30, 12, 1], [50, 30, 40, 3]
    query, ctx = make_step(query_lens, seq_lens, group=2, seed=window)
    check_against_ref(query, ctx, window, max_query_len=30)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [None, 6])
def test_image_groups_attend_bidirectionally(window, block_size):
    query_lens, seq_lens = [40, 22, 1], [40, 50, 35]
    image_groups = [
        [ImageGroup(3, 5), ImageGroup(10, 14)],  # keys 10..23 cross 4-blocks and a 16-tile
        [ImageGroup(5, 10), ImageGroup(30, 12)],  # one group in the cached context, one queried
        [ImageGroup(8, 20)],  # a decode after an image
    ]
    query, ctx = make_step(query_lens, seq_lens, image_groups, block_size=block_size)
    assert ctx.kv_limits.max() > ctx.positions.max()  # some token sees a later key
    check_against_ref(query, ctx, window)


@pytest.mark.parametrize("window", [None, 6])
def test_one_sequence_padded_to_a_graph_size(window):
    """The prompt-chunk CUDA graphs run one sequence's chunk padded to a captured token count:
    query rows past query_start_loc[1] (padding, whatever they hold) change nothing."""
    n, padded = 22, 48
    query, ctx = make_step([n], [50], [[ImageGroup(30, 12)]], block_size=4, group=2)
    expected = run_kernel(query, ctx, window, max_query_len=n)
    garbage = torch.randn(padded - n, *query.shape[1:], dtype=query.dtype, device=DEVICE)
    fill = lambda t, value: torch.cat([t, torch.full((padded - n,), value, device=DEVICE)])  # noqa: E731
    padded_ctx = ForwardContext(
        positions=fill(ctx.positions, 0), kv_limits=fill(ctx.kv_limits, 1),
        query_start_loc=ctx.query_start_loc, seq_lens=ctx.seq_lens, query_lens_cpu=[padded],
        seq_lens_cpu=[padded], block_tables=ctx.block_tables, kv_caches=ctx.kv_caches,
    )  # fmt: skip
    out = run_kernel(torch.cat([query, garbage]), padded_ctx, window, max_query_len=padded)
    torch.testing.assert_close(out[:n], expected, rtol=0, atol=0)
    check_against_ref(query, ctx, window, max_query_len=n)


def test_odd_group_strided_query_and_empty_query():
    # 3 query heads per KV head (padded to 4 rows), the query a strided slice of a wider
    # projection, and a sequence with no query tokens this step.
    query, ctx = make_step([3, 0, 9], [10, 4, 20], group=3)
    wide = torch.randn(query.shape[0], 10, query.shape[2], device=DEVICE)
    wide[:, 2:8] = query
    check_against_ref(wide[:, 2:8], ctx, 4)


def test_invisible_keys_are_never_read():
    """NaN in every cache slot no query of its sequence may see must not reach the output."""
    window = 6
    query_lens, seq_lens = [1, 30, 9, 1], [50, 30, 43, 14]
    query, ctx = make_step(query_lens, seq_lens, [[], [ImageGroup(12, 10)], [], []])
    clean = ctx.kv_caches[0]
    poisoned = torch.full_like(clean, float("nan"))
    flat_clean = clean.view(2, -1, *clean.shape[3:])
    flat_poisoned = poisoned.view(2, -1, *clean.shape[3:])
    block_size, start, num_hidden = clean.shape[2], 0, 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        rows = slice(start, start + query_len)
        start += query_len
        lowest = max(0, int(ctx.positions[rows].min()) - window + 1)
        highest = int(ctx.kv_limits[rows].max())
        num_hidden += seq_len - (highest - lowest)
        for key in range(lowest, highest):
            slot = int(ctx.block_tables[i, key // block_size]) * block_size + key % block_size
            flat_poisoned[:, slot] = flat_clean[:, slot]
    assert num_hidden > 40  # NaN keys inside the sequences, not only in unused slots
    out = run_kernel(query, ctx, window, cache=poisoned)
    expected = attention_ref(query, query, query, ctx, 0, query.shape[-1] ** -0.5, window)
    assert out.isfinite().all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def visited_tiles(query, ctx, window, **kwargs):
    visited = torch.full((query.shape[0], 2), -1, dtype=torch.int32, device=DEVICE)
    run_kernel(query, ctx, window, visited_tiles=visited, **kwargs)
    assert (visited == visited[:, :1]).all()  # every KV head visits the same tiles
    return visited[:, 0].tolist()


def test_decode_visits_only_tiles_in_window():
    query, ctx = make_step([1, 1, 1], [100, 9, 40], group=1)
    # Position 99 with window 8 sees keys 92..99: tiles [80, 96) and [96, 112) of 7.
    assert visited_tiles(query, ctx, 8, max_query_len=1) == [2, 1, 1]
    assert visited_tiles(query, ctx, None, max_query_len=1) == [7, 1, 3]


def test_prefill_visits_only_tiles_up_to_its_kv_limit():
    # group 1 with 16-row tiles: query tiles are tokens 0..15, 16..31, 32..39.
    query, ctx = make_step([40], [40], group=1)
    assert visited_tiles(query, ctx, None) == [1] * 16 + [2] * 16 + [3] * 8
    # Window 8: tokens 16..31 need keys 9..31, tokens 32..39 keys 25..39.
    assert visited_tiles(query, ctx, 8) == [1] * 16 + [2] * 16 + [2] * 8
    # An image group over keys 10..23 lets tokens 10..15 see into the second tile.
    query, ctx = make_step([40], [40], [[ImageGroup(10, 14)]], group=1)
    assert visited_tiles(query, ctx, None) == [2] * 16 + [2] * 16 + [3] * 8


def test_rejects_inconsistent_inputs():
    query, ctx = make_step([1, 3], [5, 3])
    with pytest.raises(ValueError, match="one query token per sequence"):
        run_kernel(query, ctx, None, max_query_len=1)
    with pytest.raises(ValueError, match="window"):
        run_kernel(query, ctx, 0)
    with pytest.raises(ValueError, match="head_dim must be in"):
        run_kernel(query[..., :12], ctx, None, cache=ctx.kv_caches[0][..., :12])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        run_kernel(query[:, :3], ctx, None)
    with pytest.raises(ValueError, match="num_splits"):
        run_kernel(query, ctx, None, num_splits=3)
    ctx.seq_lens = ctx.seq_lens.long()
    with pytest.raises(TypeError, match="seq_lens must be torch.int32"):
        run_kernel(query, ctx, None)


@pytest.mark.skipif(not CUDA, reason="half-precision shapes at model scale need a CUDA device")
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("window", [None, 512])
def test_half_precision_at_model_scale(dtype, tolerance, window):
    gen = torch.Generator().manual_seed(1)
    decode_lens = torch.randint(1, 2000, (60,), generator=gen).tolist()
    query_lens = [700, 400, *([1] * 60)]  # a chunk after 300 cached tokens, a whole prompt
    seq_lens = [1000, 400, *decode_lens]
    groups = [[ImageGroup(320, 256)], [ImageGroup(50, 256)], *([[]] * 60)]
    query, ctx = make_step(
        query_lens, seq_lens, groups, num_kv_heads=4, group=2, head_dim=256, block_size=16
    )
    half, cache = query.to(dtype), ctx.kv_caches[0].to(dtype)
    ctx.kv_caches = [cache.float()]  # the reference sees exactly the rounded inputs
    expected = attention_ref(half.float(), None, None, ctx, 0, 256**-0.5, window)
    for max_query_len in (700, None):  # default tiles, as the engine launches them
        out = run_kernel(
            half, ctx, window, cache=cache, max_query_len=max_query_len, tile_config=None
        )
        torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not CUDA, reason="the default split count depends on the GPU's SM count")
@pytest.mark.parametrize("window", [None, 1024])
def test_decode_default_splits_at_model_scale(window):
    query, ctx = make_step(
        [1, 1, 1], [3000, 1500, 9], num_kv_heads=4, group=2, head_dim=256, block_size=16
    )
    half, cache = query.to(torch.bfloat16), ctx.kv_caches[0].to(torch.bfloat16)
    ctx.kv_caches = [cache.float()]
    expected = attention_ref(half.float(), None, None, ctx, 0, 256**-0.5, window)
    assert split_kv.default_num_splits(3, 4, DEVICE) > 1
    out = run_kernel(half, ctx, window, cache=cache, max_query_len=1, tile_config=None)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_decode_replays_in_cuda_graph():
    """A captured decode step reads new lengths and positions from the same tensors."""
    num_seqs, scale = 8, 256**-0.5
    query, ctx = make_step(
        [1] * num_seqs, [600] * num_seqs, num_kv_heads=4, group=2, head_dim=256, block_size=16
    )
    query, cache = query.to(torch.bfloat16), ctx.kv_caches[0].to(torch.bfloat16)
    inputs = (ctx.block_tables, ctx.seq_lens, ctx.query_start_loc, ctx.positions, ctx.kv_limits)

    def step():
        return paged_attention(query, cache, *inputs, scale, None, max_query_len=1)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_lens = [1 + 71 * i for i in range(num_seqs)]
    fresh = ForwardContext.build([1] * num_seqs, new_lens, [[]] * num_seqs, DEVICE)
    ctx.seq_lens.copy_(fresh.seq_lens)
    ctx.positions.copy_(fresh.positions)
    ctx.kv_limits.copy_(fresh.kv_limits)
    graph.replay()
    fresh.block_tables, fresh.kv_caches = ctx.block_tables, [cache.float()]
    expected = attention_ref(query.float(), None, None, fresh, 0, scale, None)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
