"""The compiler's internal routes, each held to the dense oracle.

tests/test_layout.py checks layouts of random masks end to end; here each
resolution route is forced on purpose, so none of them hides behind another.
"""

import numpy as np
import pytest
import torch

import attnmask as am
from attnmask.compiler import Compiler, Grid


def _dense_tile_states(mask, q_len, kv_len, q_offset, bq, bk):
    d = mask.to_dense(q_len, kv_len, q_offset=q_offset).float()
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    pad = torch.nn.functional.pad(d, (0, nk * bk - kv_len, 0, nq * bq - q_len))
    ones = torch.nn.functional.pad(torch.ones_like(d), (0, nk * bk - kv_len, 0, nq * bq - q_len))
    s = pad.reshape(nq, bq, nk, bk).sum((1, 3))
    v = ones.reshape(nq, bq, nk, bk).sum((1, 3))
    return torch.where(s == 0, 0, torch.where(s == v, 2, 1)).to(torch.int8), s.long()


# Cross-class masks whose diagonal tiles are undecided after the operators:
# resolved by compiling the residual row by row.
REFINED = [
    am.causal & am.document(300, 77, 500, 123, 1000),
    am.causal - (am.rows(100, 2000, 97) - am.diagonal),
    am.prefix_lm(333),
    (am.causal & am.sink(50)) | (am.band(3, 5) & am.chunked(200)),
    ~(am.sliding(300) | am.cols(700, 900)) & am.causal,
]


@pytest.mark.parametrize("mask", REFINED, ids=str)
@pytest.mark.parametrize("shape", [(2000, 2000, None), (1500, 2000, None), (700, 1900, 333)])
def test_row_level_resolution_is_exact(mask, shape):
    q_len, kv_len, off = shape
    am.clear_cache()
    lay = mask.compile(q_len, kv_len, q_offset=off, block_size=128)
    states, sums = _dense_tile_states(mask, q_len, kv_len, lay.q_offset, 128, 128)
    assert torch.equal(lay.block_states(), states)
    assert lay.attended_pairs() == int(sums.sum())
    qb, kb, n = lay.tile_counts()
    assert torch.equal(sums[qb, kb], n)
    assert lay.dense_tiles_evaluated == 0   # no cell-by-cell evaluation was needed


def test_refinement_is_used_and_exact_per_row():
    mask = am.causal & am.document(300, 77, 500, 123, 1000)
    comp = Compiler(Grid(2000, 2000, 0, 128, 128))
    assert comp.refine_pays(mask)
    rows = np.arange(0, 2000, 7)
    ks = np.zeros(len(rows), np.int64) + 100
    ke = np.full(len(rows), 1900, np.int64)
    got = comp.count_rows(mask, rows, ks, ke)
    dense = mask.to_dense(2000)
    want = np.array([int(dense[r, 100:1900].sum()) for r in rows])
    assert np.array_equal(got, want)


def test_periodic_residuals_fall_back_to_cells_and_stay_exact():
    # Row-level work would meet a breakpoint every other key here.
    mask = am.causal - am.cols(0, 3000, 2)
    comp = Compiler(Grid(3000, 3000, 0, 128, 128))
    assert not comp.refine_pays(mask)
    am.clear_cache()
    lay = mask.compile(3000)
    states, sums = _dense_tile_states(mask, 3000, 3000, 0, 128, 128)
    assert torch.equal(lay.block_states(), states)
    assert lay.attended_pairs() == int(sums.sum())
    assert lay.dense_tiles_evaluated == lay.n_q_blocks  # exactly the diagonal tiles


def test_pure_difference_class_needs_no_tile_evaluation():
    # strided(2) & strided(3) is one d-class subtree: classified on its 1-D axis.
    mask = am.strided(2) & am.strided(3) & am.causal
    am.clear_cache()
    lay = mask.compile(1000, block_size=16)
    states, sums = _dense_tile_states(mask, 1000, 1000, 0, 16, 16)
    assert torch.equal(lay.block_states(), states)
    assert lay.attended_pairs() == int(sums.sum())
    assert lay.dense_tiles_evaluated == 0 and lay.refined_tiles == 0


def test_mask_mod_leaves_are_evaluated_only_where_undecided():
    calls = []

    def fn(b, h, q, k):
        calls.append(q.numel() * k.numel())
        return (q + k) % 3 == 0

    mod = am.from_mask_mod(fn, "mod3")
    am.clear_cache()
    lay = (am.sliding(64) & mod).compile(4096, block_size=64)
    # Only the tiles of the sliding window's band can be undecided: 2 per query block.
    assert lay.dense_tiles_evaluated <= 2 * lay.n_q_blocks
    assert lay.dense_tiles_evaluated < lay.n_q_blocks * lay.n_kv_blocks // 10


def test_layouts_too_fine_are_refused_not_allocated():
    # One key per tile column at 1M with a pattern alternating every key would
    # need ~2^36 pieces: refused with a MaskError that says what to do.
    mask = am.causal - am.cols(0, 1 << 20, 2)
    with pytest.raises(am.LayoutTooLargeError, match="larger block_size"):
        mask.compile(1 << 20, block_size=(16, 1))
    report = am.analyze(mask, 1 << 16, layers=2)   # the analysis says so instead of failing
    assert report.kv_cache_peak is None and "not computed" in str(report)
    assert report.attended_pairs == (1 << 16) ** 2 // 4
    small = am.analyze(am.causal - am.cols(0, 8192, 2), 8192, layers=2)   # resolvable here: exact
    assert small.kv_cache_peak == 4096


def test_row_counts_match_dense_for_cross_class_and_periodic_residuals():
    for mask in [am.causal & am.document(300, 77, 500, 123, 1000), am.causal - am.cols(0, 2000, 2),
                 am.prefix_lm(333) - am.strided(5)]:
        lay = mask.compile(2000, block_size=128)
        assert torch.equal(lay.row_counts(), mask.to_dense(2000).sum(1))


@pytest.mark.parametrize("mask", [
    am.causal & am.document(300, 77, 500, 1, 123, 1000),
    am.sliding(200) - am.chunked(97),
    (am.causal | am.cols(5, 40)) & ~am.document(64, 64, 900),
], ids=str)
def test_segment_cut_counts_are_exact(mask):
    # Residuals with one chunked/document leaf are counted by cutting tiles at
    # segment boundaries (closed form on each piece): no rows, no cells.
    am.clear_cache()
    lay = mask.compile(2100, 2300, block_size=128)
    states, sums = _dense_tile_states(mask, 2100, 2300, lay.q_offset, 128, 128)
    assert torch.equal(lay.block_states(), states)
    qb, kb, n = lay.tile_counts()
    assert torch.equal(sums[qb, kb], n)
    assert lay.dense_tiles_evaluated == 0 and lay.refined_tiles == 0
