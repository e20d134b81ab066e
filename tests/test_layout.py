"""Exactness of the block-layout compiler against the dense oracle.

Every check here compares what ``mask.compile(...)`` reports (tile states,
runs, counts, rebuilt dense matrices) with what ``mask.to_dense(...)`` says,
tile by tile, for random masks of the whole language (every primitive, every
operator, opaque ``from_mask_mod`` leaves), random non-square shapes, explicit
and default ``q_offset`` and many block sizes. Large-length checks use closed
forms instead of dense matrices, so they also prove that compiling needs no
N^2 (or (N/B)^2) structure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import attnmask as am
from attnmask.errors import DenseTooLargeError, MaskValueError

# ---------------------------------------------------------------------------
# opaque leaves: module-level functions so that equal masks hash equal
# ---------------------------------------------------------------------------


def _mod3(b, h, q, k):
    return (q + k) % 3 == 0


def _even_causal(b, h, q, k):
    return (k % 2 == 0) & (k <= q)


def _far_half(b, h, q, k):
    # depends on q and k jointly but not only on q - k: a "mixed" shape
    return 2 * k <= q


MOD3 = am.from_mask_mod(_mod3, "mod3")
EVEN_CAUSAL = am.from_mask_mod(_even_causal, "even_causal")
FAR_HALF = am.from_mask_mod(_far_half, "far_half")


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

_small = st.integers(0, 40)


def _rows_or_cols(fn):
    one = st.builds(fn, st.integers(0, 90))
    ranged = st.builds(lambda a, n, s: fn(a, a + n, s), st.integers(0, 60), st.integers(0, 80), st.integers(1, 9))
    return st.one_of(one, ranged)


LEAVES = st.one_of(
    st.sampled_from([am.full, am.none, am.causal, am.diagonal]),
    st.builds(am.band, _small, _small),
    st.builds(am.sliding, st.integers(1, 50)),
    st.builds(am.sink, st.integers(0, 60)),
    st.builds(am.prefix_lm, st.integers(0, 80)),
    st.builds(am.chunked, st.integers(1, 45)),
    st.builds(am.dilated, st.integers(1, 8), st.integers(1, 9)),
    st.builds(am.strided, st.integers(1, 9)),
    st.lists(st.integers(1, 40), min_size=1, max_size=6).map(lambda ns: am.document(*ns)),
    _rows_or_cols(am.rows),
    _rows_or_cols(am.cols),
    st.sampled_from([MOD3, EVEN_CAUSAL, FAR_HALF]),
)


def _extend(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: t[0] | t[1]),
        st.tuples(children, children).map(lambda t: t[0] & t[1]),
        st.tuples(children, children).map(lambda t: t[0] - t[1]),
        children.map(lambda m: ~m),
    )


MASKS = st.recursive(LEAVES, _extend, max_leaves=6)

BLOCKS = st.sampled_from([1, 2, 3, 5, 8, 16, 32, 64, 128, (1, 4), (3, 5), (16, 8), (7, 32), (64, 3)])


@st.composite
def shapes(draw):
    """(q_len, kv_len, q_offset or None, block_size); lengths mostly not multiples of the blocks."""
    block = draw(BLOCKS)
    bq, bk = block if isinstance(block, tuple) else (block, block)

    def length(b: int) -> int:
        if b > 1 and draw(st.integers(0, 4)) > 0:   # 80%: force a short last block
            n = draw(st.integers(0, max(0, 110 // b))) * b + draw(st.integers(1, b - 1))
        else:
            n = draw(st.integers(1, 110))
        return n

    q_len, kv_len = length(bq), length(bk)
    q_offset = draw(st.one_of(st.none(), st.integers(-40, 150)))
    return q_len, kv_len, q_offset, block


# ---------------------------------------------------------------------------
# the oracle: tile states and counts computed from the dense matrix
# ---------------------------------------------------------------------------


def dense_tiles(dense: torch.Tensor, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states int8 [nqb, nkb], counts int64 [nqb, nkb], padded bool [nqb*bq, nkb*bk]) from dense."""
    q_len, kv_len = dense.shape
    nqb, nkb = -(-q_len // bq), -(-kv_len // bk)
    padded = np.zeros((nqb * bq, nkb * bk), dtype=bool)
    padded[:q_len, :kv_len] = dense.numpy()
    valid = np.zeros_like(padded)
    valid[:q_len, :kv_len] = True
    counts = padded.reshape(nqb, bq, nkb, bk).sum(axis=(1, 3)).astype(np.int64)
    area = valid.reshape(nqb, bq, nkb, bk).sum(axis=(1, 3))
    states = np.where(counts == 0, 0, np.where(counts == area, 2, 1)).astype(np.int8)
    return states, counts, padded


def check_layout(mask: am.Mask, q_len: int, kv_len: int, q_offset, block) -> None:
    """Assert every view of the compiled layout agrees with the dense oracle."""
    dense = mask.to_dense(q_len, kv_len, q_offset=q_offset)
    lay = mask.compile(q_len, kv_len, block_size=block, q_offset=q_offset)
    bq, bk = block if isinstance(block, tuple) else (block, block)
    ctx = f"{mask} q_len={q_len} kv_len={kv_len} q_offset={q_offset} block={block}"

    # shape bookkeeping
    _, _, off = am.masks.resolve_shape(q_len, kv_len, q_offset)
    assert (lay.q_len, lay.kv_len, lay.q_offset) == (q_len, kv_len, off), ctx
    assert lay.block_size == (bq, bk) and (lay.block_q, lay.block_k) == (bq, bk), ctx
    assert lay.n_q_blocks == -(-q_len // bq) and lay.n_kv_blocks == -(-kv_len // bk), ctx
    nqb, nkb = lay.n_q_blocks, lay.n_kv_blocks

    states, counts, padded = dense_tiles(dense, bq, bk)

    # tile states and the rebuilt dense matrix
    got = lay.block_states()
    assert got.dtype == torch.int8 and tuple(got.shape) == (nqb, nkb), ctx
    bad = np.argwhere(got.numpy() != states)
    assert len(bad) == 0, f"{ctx}: tile states differ at (qb, kb) {bad[:5].tolist()}: " \
                          f"got {[int(got[i, j]) for i, j in bad[:5]]}, expected {[int(states[i, j]) for i, j in bad[:5]]}"
    rebuilt = lay.to_dense()
    assert rebuilt.dtype == torch.bool and torch.equal(rebuilt, dense), ctx

    # counts
    n_attended = int(dense.sum())
    assert lay.attended_pairs() == n_attended, ctx
    assert lay.density == pytest.approx(n_attended / (q_len * kv_len), rel=0, abs=1e-15), ctx
    c = lay.counts()
    want = {"empty": int((states == 0).sum()), "partial": int((states == 1).sum()), "full": int((states == 2).sum())}
    assert c == want, ctx
    assert (lay.blocks_empty, lay.blocks_partial, lay.blocks_full) == (want["empty"], want["partial"], want["full"])

    qb_t, kb_t, cnt_t = lay.tile_counts()
    nz = np.argwhere(states != 0)
    got_tiles = sorted(zip(qb_t.tolist(), kb_t.tolist(), cnt_t.tolist()))
    want_tiles = sorted((int(i), int(j), int(counts[i, j])) for i, j in nz)
    assert got_tiles == want_tiles, ctx

    # the CSR runs: sorted, disjoint, maximal, in bounds, and they expand to the states
    ptr, s, e, t = lay.run_ptr, lay.run_start, lay.run_end, lay.run_state
    assert ptr.dtype == s.dtype == e.dtype == torch.int64 and t.dtype == torch.int8, ctx
    assert tuple(ptr.shape) == (nqb + 1,) and int(ptr[0]) == 0 and int(ptr[-1]) == lay.n_runs == len(s) == len(e) == len(t)
    assert bool((ptr[1:] >= ptr[:-1]).all()), ctx
    assert bool(((t == 1) | (t == 2)).all()), ctx
    assert bool((s >= 0).all() and (e <= nkb).all() and (s < e).all()), ctx
    run_qb = lay.run_q_blocks()
    assert torch.equal(run_qb, torch.repeat_interleave(torch.arange(nqb), ptr[1:] - ptr[:-1])), ctx
    from_runs = np.zeros((nqb, nkb), np.int8)
    iterated = list(lay.iter_runs())
    assert iterated == [(int(q), int(a), int(b), int(x)) for q, a, b, x in zip(run_qb, s, e, t)], ctx
    names = {1: "partial", 2: "full"}
    for qb in range(nqb):
        row = lay.runs(qb)
        lo, hi = int(ptr[qb]), int(ptr[qb + 1])
        assert row == [(int(a), int(b), names[int(x)]) for a, b, x in zip(s[lo:hi], e[lo:hi], t[lo:hi])], ctx
        for (a0, b0, x0), (a1, b1, x1) in zip(row, row[1:]):
            assert b0 <= a1, f"{ctx}: runs of query block {qb} overlap or are unsorted: {row}"
            assert b0 < a1 or x0 != x1, f"{ctx}: runs of query block {qb} are not maximal: {row}"
        for a, b, x in row:
            from_runs[qb, a:b] = 1 if x == "partial" else 2
    assert np.array_equal(from_runs, states), ctx

    # tiles() by state
    for state in (None, 1, 2):
        tq, tk = lay.tiles(state)
        sel = states != 0 if state is None else states == state
        assert sorted(zip(tq.tolist(), tk.tolist())) == sorted(map(tuple, np.argwhere(sel).tolist())), ctx

    # tile_masks on every non-empty tile plus a few empty ones (which must be all False)
    tq, tk = lay.tiles()
    empty = np.argwhere(states == 0)[:7]
    tq = torch.cat([tq, torch.as_tensor(empty[:, 0], dtype=torch.int64)])
    tk = torch.cat([tk, torch.as_tensor(empty[:, 1], dtype=torch.int64)])
    tm = lay.tile_masks(tq, tk)
    assert tuple(tm.shape) == (len(tq), bq, bk) and tm.dtype == torch.bool, ctx
    want_tm = padded.reshape(nqb, bq, nkb, bk).transpose(0, 2, 1, 3)[tq.numpy(), tk.numpy()]
    assert np.array_equal(tm.numpy(), want_tm), ctx


# ---------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------


@given(MASKS, shapes())
@example(am.parse(am.SIGNATURE), (64, 64, None, 8))
@example(am.parse(am.SIGNATURE), (64, 64, None, 1))
@example(am.causal & (am.sliding(7) | am.sink(2)), (37, 53, None, (8, 5)))
@example(am.causal - (am.rows(3, 90, 7) - am.diagonal), (100, 100, -9, 16))
@example(MOD3 & am.causal, (45, 77, 5, 16))
@example(am.document(5, 9, 13) & am.dilated(3, 4), (31, 40, 3, (3, 5)))
@example(~am.document(10, 3) | am.cols(4, 70, 6), (61, 29, 50, 7))
# a one-position document right after a query block whose key block reaches two documents further:
# a mutation that counted segments up to the one after the block's last row (qe + 1, not qe - 1)
# counted that document once more in attended_pairs, row_counts and tile_counts (mutation run)
@example(am.document(4, 1, 3, 5), (13, 13, None, (4, 8)))
def test_layout_matches_dense(mask, shape):
    q_len, kv_len, q_offset, block = shape
    check_layout(mask, q_len, kv_len, q_offset, block)


@given(st.lists(LEAVES, min_size=2, max_size=4), st.sampled_from(["|", "&", "-"]), shapes())
def test_operator_chains_match_dense(leaves, op, shape):
    # flat chains (a | b | c ...) exercise the n-ary Union/Intersection paths
    mask = leaves[0]
    for leaf in leaves[1:]:
        mask = mask | leaf if op == "|" else mask & leaf if op == "&" else mask - leaf
    check_layout(mask, *shape)


@pytest.mark.parametrize("mask", [
    am.causal, am.full, am.none, am.diagonal, am.band(3, 11), am.sliding(13), am.sink(9), am.prefix_lm(40),
    am.chunked(17), am.dilated(5, 6), am.strided(4), am.document(30, 1, 22, 9), am.rows(20), am.rows(5, 80, 9),
    am.cols(7), am.cols(3, 100, 11), MOD3, EVEN_CAUSAL, FAR_HALF, ~am.chunked(10), ~FAR_HALF,
    am.parse(am.SIGNATURE),
])
@pytest.mark.parametrize("shape", [(100, 100, None, 16), (37, 100, None, (8, 16)), (100, 37, -20, 7),
                                   (50, 75, 60, 1), (1, 1, None, 128), (129, 130, -130, 128)])
def test_every_primitive_alone(mask, shape):
    check_layout(mask, *shape)


BIG = 2**31 - 1    # the largest parameter the language accepts


@pytest.mark.parametrize("mask", [
    am.sliding(BIG), am.band(BIG, BIG), am.dilated(BIG, BIG), am.dilated(3, BIG), am.strided(BIG), am.chunked(BIG),
    am.rows(0, BIG, BIG), am.rows(BIG - 5, BIG), am.cols(0, BIG, 2), am.sink(BIG), am.prefix_lm(BIG),
    am.document(BIG, 5), ~am.document(BIG) | am.strided(BIG - 1), am.causal & am.dilated(BIG, 2),
])
@pytest.mark.parametrize("shape", [(37, 53, None, 8), (20, 30, BIG, 7), (20, 30, -BIG, 16), (20, 30, BIG - 25, (4, 3))])
def test_extreme_parameters_and_offsets(mask, shape):
    # int64 arithmetic on w * d, q_offset + q_len, etc. must not overflow or lose exactness
    check_layout(mask, *shape)


# ---------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------


def test_cache_returns_identical_layout_for_equal_mask_and_shape():
    am.clear_cache()
    m1 = am.causal & (am.sliding(64) | am.sink(4))
    m2 = am.parse("causal & (sliding(64) | sink(4))")
    assert m1 == m2 and m1 is not m2
    a = m1.compile(1000, block_size=64)
    assert m2.compile(1000, 1000, block_size=(64, 64), q_offset=0) is a
    assert m1.compile(1000, block_size=32) is not a
    assert m1.compile(1000, 1001, block_size=64) is not a
    assert m1.compile(1000, block_size=64, q_offset=1) is not a
    b = (EVEN_CAUSAL & am.sliding(9)).compile(300, block_size=16)
    assert (EVEN_CAUSAL & am.sliding(9)).compile(300, block_size=16) is b
    am.clear_cache()
    c = m1.compile(1000, block_size=64)
    assert c is not a
    assert c.block_states().tolist() == a.block_states().tolist()


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", [0, -1, (0, 8), (8, 0), (1, 2, 3), (4,), 1.5, True, "8", None, (8, 2.0)])
def test_bad_block_size_raises(block):
    with pytest.raises(MaskValueError, match="block_size"):
        am.causal.compile(100, block_size=block)


@pytest.mark.parametrize("args", [(0,), (-5,), (10, 0), (10, -1), (1.5,), ("8",), (True,), (10, 2**40),
                                  (2**31,)])
def test_bad_lengths_raise(args):
    with pytest.raises(MaskValueError):
        am.causal.compile(*args, block_size=8)


@pytest.mark.parametrize("q_offset", [1.5, "3", 2**40])
def test_bad_q_offset_raises(q_offset):
    with pytest.raises(MaskValueError, match="q_offset"):
        am.causal.compile(10, q_offset=q_offset)


def test_non_mask_refused():
    from attnmask.layout import compile_layout
    with pytest.raises(MaskValueError, match="Mask"):
        compile_layout("causal", 10)


def test_dense_views_are_guarded():
    lay = am.causal.compile(1000, block_size=10)
    with pytest.raises(DenseTooLargeError, match="block_states"):
        lay.block_states(limit=100 * 100 - 1)
    assert lay.block_states(limit=100 * 100).shape == (100, 100)
    with pytest.raises(DenseTooLargeError, match="runs"):
        lay.to_dense(limit=1000 * 1000 - 1)
    assert lay.to_dense(limit=1000 * 1000).sum() == 1000 * 1001 // 2
    big = am.causal.compile(1 << 20, block_size=16)       # 65,536^2 tiles > 2**30
    with pytest.raises(DenseTooLargeError):
        big.block_states()
    with pytest.raises(DenseTooLargeError):
        big.to_dense()
    for err in (DenseTooLargeError, MaskValueError):
        assert issubclass(err, am.MaskError) and issubclass(err, ValueError)


# ---------------------------------------------------------------------------
# large lengths: O(runs) memory and closed forms, no dense matrices
# ---------------------------------------------------------------------------

N = 1 << 20


def test_causal_million_is_compact_and_exact():
    lay = am.causal.compile(N, block_size=128)
    assert lay.n_q_blocks == N // 128
    assert lay.n_runs <= 2 * lay.n_q_blocks
    assert lay.runs(5) == [(0, 5, "full"), (5, 6, "partial")]
    assert lay.counts() == {"full": lay.n_q_blocks * (lay.n_q_blocks - 1) // 2, "partial": lay.n_q_blocks,
                            "empty": lay.n_q_blocks * (lay.n_q_blocks - 1) // 2}
    assert lay.attended_pairs() == N * (N + 1) // 2


@pytest.mark.parametrize("w", [1, 4096, 5000])
def test_causal_sliding_pairs_closed_form(w):
    lay = (am.causal & am.sliding(w)).compile(N, block_size=128)
    assert lay.attended_pairs() == w * (w + 1) // 2 + (N - w) * w
    assert lay.n_runs <= 3 * lay.n_q_blocks


@pytest.mark.parametrize("c", [8192, 3000])
def test_causal_chunked_pairs_closed_form(c):
    lay = (am.causal & am.chunked(c)).compile(N, block_size=128)
    whole, rest = divmod(N, c)
    assert lay.attended_pairs() == whole * c * (c + 1) // 2 + rest * (rest + 1) // 2
    assert lay.n_runs <= 3 * lay.n_q_blocks


def test_sink_window_pairs_closed_form():
    w, n = 4096, 4
    lay = (am.causal & (am.sliding(w) | am.sink(n))).compile(N, block_size=128)
    q = np.arange(N, dtype=np.int64)
    # per row: the window plus the sink keys k <= q - w that the window does not cover
    per_row = np.minimum(q + 1, w) + np.maximum(0, np.minimum(n, q - w + 1))
    assert lay.attended_pairs() == int(per_row.sum())
    assert lay.n_runs <= 4 * lay.n_q_blocks


def test_document_cut_prefix_and_dilated_closed_forms():
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, N), 999, replace=False))
    lens = np.diff(np.concatenate(([0], cuts, [N])))
    lay = (am.causal & am.document(*lens.tolist())).compile(N, block_size=128)
    assert lay.attended_pairs() == int((lens * (lens + 1) // 2).sum())

    cut = am.causal - (am.rows(1000, N, 4096) - am.diagonal)
    lay = cut.compile(N, block_size=128)
    cut_rows = np.arange(1000, N, 4096, dtype=np.int64)
    assert lay.attended_pairs() == N * (N + 1) // 2 - int(cut_rows.sum())   # a cut row keeps only itself

    lay = am.prefix_lm(65536).compile(N, block_size=128)
    p = 65536
    assert lay.attended_pairs() == p * p + (N * (N + 1) // 2 - p * (p + 1) // 2)

    w, d = 512, 8
    lay = (am.causal & am.dilated(w, d)).compile(N, block_size=128)
    q = np.arange(N, dtype=np.int64)
    assert lay.attended_pairs() == int(np.minimum(w, q // d + 1).sum())


def test_non_square_decode_shapes_closed_form():
    # 1000 queries at the end of a 1M-key cache (default q_offset), and a negative offset
    lay = am.causal.compile(1000, N, block_size=128)
    off = N - 1000
    assert lay.q_offset == off
    assert lay.attended_pairs() == sum(off + i + 1 for i in range(1000))
    assert lay.n_runs <= 2 * lay.n_q_blocks
    lay = am.causal.compile(N, 4096, block_size=(128, 64), q_offset=-5000)
    rows = np.arange(N, dtype=np.int64) - 5000
    assert lay.attended_pairs() == int(np.clip(rows + 1, 0, 4096).sum())


def test_no_quadratic_structure_at_four_million_tokens():
    # At 4M tokens and block 128 an (N/B)^2 int8 tile map would be 1 GiB; the
    # runs of causal are 65,535 entries. tracemalloc sees the compiler's numpy
    # buffers (not torch's), which is where a tile map would live.
    import tracemalloc
    n = 1 << 22
    am.clear_cache()
    tracemalloc.start()
    try:
        lay = am.causal.compile(n, block_size=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lay.n_runs == 2 * lay.n_q_blocks - 1          # block 0 has only its diagonal tile
    assert peak < 64 * 2**20, f"compiling causal at 4M tokens peaked at {peak / 2**20:.0f} MiB of numpy memory"
    assert lay.attended_pairs() == n * (n + 1) // 2
    am.clear_cache()
