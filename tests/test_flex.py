"""FlexAttention interoperability of compiled layouts.

``BlockLayout.to_flex_block_mask()`` must describe the same tiles as
FlexAttention's own ``create_block_mask`` (evaluated eagerly here: the sizes
are tiny), and ``flex_attention`` fed with it must give dense masked attention
computed in float64. FlexAttention compiles per shape on CPU (10-30 s each),
so only two compiled calls are made.
"""

from __future__ import annotations

import pytest
import torch

import attnmask as am
from numerics import output_unit, reference, scaled_error

fa = pytest.importorskip("torch.nn.attention.flex_attention")


def _mod3(b, h, q, k):
    return (q + k) % 3 == 0


MOD3 = am.from_mask_mod(_mod3, "mod3")


def tile_sets(bm) -> tuple[list[set], list[set]]:
    """Per query block: (set of partial key blocks, set of full key blocks) of a BlockMask, batch 0 head 0."""
    def rows(num, idx):
        if num is None:
            return None
        num, idx = num[0, 0], idx[0, 0]
        return [set(idx[i, : int(num[i])].tolist()) for i in range(num.shape[0])]
    return rows(bm.kv_num_blocks, bm.kv_indices), rows(bm.full_kv_num_blocks, bm.full_kv_indices)


def q_tile_sets(bm) -> tuple[list[set], list[set]]:
    """Per key block: (set of partial query blocks, set of full query blocks): the transposed index."""
    def cols(num, idx):
        num, idx = num[0, 0], idx[0, 0]
        return [set(idx[i, : int(num[i])].tolist()) for i in range(num.shape[0])]
    return cols(bm.q_num_blocks, bm.q_indices), cols(bm.full_q_num_blocks, bm.full_q_indices)


def offset_mask_mod(mask: am.Mask, q_offset: int):
    """``mask.mask_mod`` takes q_idx as a position (offset 0); shift rows for create_block_mask."""
    def mask_mod(b, h, q_idx, kv_idx):
        return mask.mask_mod(b, h, q_idx + q_offset, kv_idx)
    return mask_mod


CASES = [
    # (mask, q_len, kv_len, q_offset, block)
    (am.causal & (am.sliding(100) | am.sink(4)), 512, 512, None, 64),
    (am.causal, 384, 384, None, 128),
    (am.parse("causal - (rows(36, 300, 24) - diagonal)"), 320, 320, None, 32),
    (am.causal & am.document(70, 130, 90, 94), 384, 384, None, 32),
    (am.prefix_lm(100) & ~am.chunked(64) | am.diagonal, 256, 256, None, 32),
    (am.causal & am.dilated(8, 5), 256, 256, None, 16),
    (MOD3 | am.band(10, 3), 192, 192, None, 32),
    # non-square, default offset (queries are the last positions) and explicit ones
    (am.causal & am.sliding(70), 128, 512, None, 64),
    (am.causal & am.sliding(70), 192, 320, 40, 32),
    (am.causal | am.cols(100, 260, 7), 256, 192, -64, 64),
    # different query and key block sizes
    (am.causal & (am.sliding(90) | am.sink(4)), 256, 256, None, (64, 32)),
    (am.causal & am.document(100, 60, 96), 256, 384, None, (32, 128)),
]


@pytest.mark.parametrize("mask, q_len, kv_len, q_offset, block", CASES)
def test_block_structure_matches_create_block_mask(mask, q_len, kv_len, q_offset, block):
    lay = mask.compile(q_len, kv_len, block_size=block, q_offset=q_offset)
    ours = lay.to_flex_block_mask()
    theirs = fa.create_block_mask(offset_mask_mod(mask, lay.q_offset), None, None, q_len, kv_len,
                                  device="cpu", BLOCK_SIZE=block)
    pair = block if isinstance(block, tuple) else (block, block)
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE == pair
    assert tuple(ours.shape) == tuple(theirs.shape) == (1, 1, q_len, kv_len)
    assert ours.seq_lengths == theirs.seq_lengths == (q_len, kv_len)
    assert tile_sets(ours) == tile_sets(theirs)
    assert q_tile_sets(ours) == q_tile_sets(theirs)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    # the attached mask_mod carries the layout's q_offset
    q = torch.arange(q_len)[:, None]
    k = torch.arange(kv_len)[None, :]
    assert torch.equal(ours.mask_mod(0, 0, q, k), mask.to_dense(q_len, kv_len, q_offset=q_offset))


@pytest.mark.parametrize("mask, q_len, kv_len, q_offset, block", [
    (am.causal & am.sliding(50), 200, 200, None, 64),             # short last query and key blocks
    (am.causal, 100, 300, None, 128),                             # one short query block, default offset 200
    (am.full - am.rows(10, 40, 3), 70, 90, 5, 32),
    (am.causal & am.document(33, 40), 100, 100, None, 64),        # padding positions past 73
])
def test_short_edge_tiles(mask, q_len, kv_len, q_offset, block):
    # create_block_mask pads the dense mask with False to whole blocks, so a last,
    # shorter tile whose existing cells are all attended is "partial" for it but
    # "full" for attnmask (which counts only positions that exist). Everything
    # else must agree exactly; the full edge tiles must really be full.
    lay = mask.compile(q_len, kv_len, block_size=block, q_offset=q_offset)
    ours_p, ours_f = tile_sets(lay.to_flex_block_mask())
    theirs_p, theirs_f = tile_sets(fa.create_block_mask(offset_mask_mod(mask, lay.q_offset), None, None,
                                                        q_len, kv_len, device="cpu", BLOCK_SIZE=block))
    dense = mask.to_dense(q_len, kv_len, q_offset=q_offset)
    last_q, last_k = lay.n_q_blocks - 1, lay.n_kv_blocks - 1
    short_q, short_k = q_len % block != 0, kv_len % block != 0
    for qb in range(lay.n_q_blocks):
        assert ours_p[qb] | ours_f[qb] == theirs_p[qb] | theirs_f[qb]
        for kb in ours_f[qb]:
            assert bool(dense[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block].all())
            edge = (short_q and qb == last_q) or (short_k and kb == last_k)
            assert (kb in theirs_p[qb]) if edge else (kb in theirs_f[qb])
        assert theirs_f[qb] <= ours_f[qb]


def test_mask_mod_traces_without_graph_breaks():
    # A graph break in mask_mod makes create_block_mask(_compile=True) and
    # flex_attention fall back to eager N^2 evaluation (document() once did:
    # at 64K tokens create_block_mask ran out of memory). One expression holds
    # every primitive and operator.
    import torch._dynamo
    mask = (am.causal & am.document(3, 5, 4) | am.dilated(2, 3) & ~am.chunked(3) | am.rows(1, 6, 2) - am.cols(2, 7, 3)
            | am.prefix_lm(3) & am.band(1, 1) | am.sink(1) | am.strided(3) & am.sliding(4) | am.diagonal
            | am.full & am.none)
    lay = mask.compile(16, block_size=8, q_offset=2)
    q, k, z = torch.arange(16)[:, None], torch.arange(16)[None, :], torch.tensor(0)
    for mod in (mask.mask_mod, lay.to_flex_block_mask().mask_mod):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(mod)(z, z, q, k)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    torch._dynamo.reset()


def test_huge_flex_block_mask_is_refused():
    # FlexAttention's index tensors are dense per query block: (N / B)^2 entries.
    lay = am.causal.compile(1 << 20, block_size=16)
    with pytest.raises(am.DenseTooLargeError, match="block_size"):
        lay.to_flex_block_mask()


def dense_attention_fp64(q, k, v, dense: torch.Tensor) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(D)) v with the bool mask, in float64 (numerics.reference)."""
    return reference(q, k, v, dense, q.shape[-1] ** -0.5)[0]


@pytest.fixture(scope="module")
def compiled_flex():
    return torch.compile(fa.flex_attention, dynamic=False)


@pytest.mark.parametrize("mask, q_len, kv_len, q_offset, block", [
    # square, lengths a multiple of the block; full, partial and empty tiles and an opaque leaf
    (am.prefix_lm(128) | MOD3 & am.band(5, 5), 384, 384, None, 128),
    # non-square, explicit offset, short last blocks on both axes, full edge tiles
    ((am.prefix_lm(256) | am.band(0, 100)) - (am.rows(130, 200, 40) - am.diagonal), 200, 328, 120, 128),
])
def test_flex_attention_equals_dense_fp64(compiled_flex, mask, q_len, kv_len, q_offset, block):
    lay = mask.compile(q_len, kv_len, block_size=block, q_offset=q_offset)
    dense = mask.to_dense(q_len, kv_len, q_offset=q_offset)
    assert bool(dense.any(dim=-1).all()), "every row attends somewhere, so no convention question arises"
    g = torch.Generator().manual_seed(0)
    B, H, D = 1, 2, 16
    q = torch.randn(B, H, q_len, D, generator=g)
    k = torch.randn(B, H, kv_len, D, generator=g)
    v = torch.randn(B, H, kv_len, D, generator=g)
    out = compiled_flex(q, k, v, block_mask=lay.to_flex_block_mask())
    ref = dense_attention_fp64(q, k, v, dense)
    assert out.dtype == torch.float32 and out.shape == (B, H, q_len, D)
    rel = scaled_error(out, ref, output_unit(v))
    assert rel < 1e-5, f"flex_attention vs fp64 dense: error {rel:.3g}"
    # The comparison is sensitive to the block structure: the kernel really skips
    # what the BlockMask leaves out (same mask_mod and shapes, so no recompile).
    bm = lay.to_flex_block_mask()
    assert int(bm.full_kv_num_blocks.sum()) > 0
    no_full = fa.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, torch.zeros_like(bm.full_kv_num_blocks),
                                          bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod,
                                          seq_lengths=bm.seq_lengths)
    wrong = compiled_flex(q, k, v, block_mask=no_full)
    assert scaled_error(wrong, ref, output_unit(v)) > 1e-2


def test_flex_backend_runs_document_masks():
    # document's mask_mod must lower inside FlexAttention's kernel (searchsorted
    # did not; a document-id table does), not just inside create_block_mask.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    m = am.causal & am.document(100, 60, 80)
    out = am.attention(q, k, v, m, backend="flex")
    ref, _ = reference(q, k, v, m.to_dense(256), 16 ** -0.5)
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    assert torch.equal(out[:, :, 240:], torch.zeros_like(out[:, :, 240:]))   # padding rows attend nothing


def test_document_tables_follow_the_query_device():
    # FlexAttention on a GPU traces mask_mod with CUDA indices; a CPU table fails to lower there
    # (found on an H200, benchmarks/results/gpu.md). The table must be built on the query's device.
    m = am.document(3, 7)
    q = torch.arange(10, device="meta")
    assert m.kind.ids(m, q.device).device.type == "meta"
    assert m.kind.ids(m).device.type == "cpu"
    assert m.evaluate(q[:, None], q[None, :]).device.type == "meta"
    expect = am.document(3, 7).to_dense(10)
    assert torch.equal(m.evaluate(torch.arange(10)[:, None], torch.arange(10)[None, :]), expect)


def test_flex_refuses_the_silent_eager_fallback_past_the_recompile_limit():
    # Each new mask recompiles flex_attention; past torch's limit dynamo would run it eagerly
    # (all scores materialized: 256 GiB at 64K tokens on a GPU). The backend says so instead.
    import torch._dynamo
    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        pytest.skip("this torch has no fail_on_recompile_limit_hit switch")
    q = torch.randn(1, 1, 128, 16)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            am.attention(q, q, q, am.causal & am.sliding(8), backend="flex")
            with pytest.raises(am.MaskError, match="recompile limit"):
                am.attention(q, q, q, am.causal & am.sliding(16), backend="flex")
    finally:
        torch._dynamo.reset()
