"""window2d(w, h, kw, kh): exact against PRODUCT.md and FlexAttention-style predicates, compiled without cells.

References, both independent of ``WINDOW2D.evaluate``:
* ``strategies.naive_window2d``: PRODUCT.md's table row with Python ints, one (q, k) pair at a time;
* a NATTEN-style FlexAttention mask_mod written here (clamped kernel centre) and wrapped with
  ``am.from_mask_mod``, so the compiler's cell-by-cell route for opaque leaves checks the
  closed-form route for the primitive.
Layouts (tile states, attended pairs, row counts, per-tile counts) are compared with the dense
oracle over random canvases, kernels, lengths past the canvas, non-square shapes and q_offset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from strategies import naive_window2d, window2d_args


def oracle(args, q_len, kv_len, q_offset) -> torch.Tensor:
    return torch.tensor([[naive_window2d(args, q_offset + i, j) for j in range(kv_len)] for i in range(q_len)],
                        dtype=torch.bool)


def natten_mask_mod(w, h, kw, kh, q_offset=0):
    """A FlexAttention mask_mod for 2-D neighbourhood attention, as NATTEN defines it.

    A wrapped mask_mod reads FlexAttention's row index (attnmask.maskmod), the primitive reads
    positions: at a q_offset the predicate places row i at position ``q_offset + i`` itself.
    """
    def mask_mod(b, hd, q_idx, kv_idx):
        q_idx = q_idx + q_offset
        qr, qc = q_idx // w, q_idx % w
        kr, kc = kv_idx // w, kv_idx % w
        cr = torch.clamp(qr, kh // 2, h - 1 - kh // 2)
        cc = torch.clamp(qc, kw // 2, w - 1 - kw // 2)
        on = (q_idx >= 0) & (q_idx < w * h) & (kv_idx >= 0) & (kv_idx < w * h)
        return on & ((cr - kr).abs() <= kh // 2) & ((cc - kc).abs() <= kw // 2)
    return mask_mod


@st.composite
def cases(draw):
    args = draw(window2d_args(max_side=9))
    n = args[0] * args[1]
    q_len = draw(st.integers(1, n + 12))            # past the canvas too
    kv_len = draw(st.one_of(st.none(), st.integers(1, n + 12)))
    q_offset = draw(st.one_of(st.none(), st.integers(-6, n + 6)))
    block = draw(st.one_of(st.sampled_from([1, 2, 3, 4, 5, 8, 16]), st.tuples(st.integers(1, 9), st.integers(1, 9))))
    return args, q_len, kv_len, q_offset, block


@given(cases())
def test_dense_and_layout_are_exact(case):
    args, q_len, kv_len, q_offset, block = case
    m = am.window2d(*args)
    kv = q_len if kv_len is None else kv_len
    off = kv - q_len if q_offset is None else q_offset
    want = oracle(args, q_len, kv, off)
    assert torch.equal(m.to_dense(q_len, kv_len, q_offset=q_offset), want)
    lay = m.compile(q_len, kv_len, q_offset=q_offset, block_size=block)
    assert torch.equal(lay.to_dense(), want)
    assert lay.dense_tiles_evaluated == 0                       # closed forms only, never cells
    assert lay.attended_pairs() == int(want.sum())
    assert torch.equal(lay.row_counts(), want.sum(1))
    bq, bk = (block, block) if isinstance(block, int) else block
    states = lay.block_states()
    qb, kb, cnt = lay.tile_counts()
    for i in range(states.shape[0]):
        for j in range(states.shape[1]):
            tile = want[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            expect = 0 if not tile.any() else (2 if tile.all() else 1)
            assert int(states[i, j]) == expect, (i, j)
    for i, j, c in zip(qb.tolist(), kb.tolist(), cnt.tolist()):
        assert c == int(want[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].sum())


@given(cases(), st.sampled_from(["causal", "document(5, 9, 7)", "sliding(6) | sink(2)", "~rows(3, 20, 2)"]))
def test_in_expressions_and_against_a_flex_style_mask_mod(case, other):
    args, q_len, kv_len, q_offset, block = case
    prim = am.window2d(*args)
    kv = q_len if kv_len is None else kv_len
    off = kv - q_len if q_offset is None else q_offset
    flex = am.from_mask_mod(natten_mask_mod(*args, q_offset=off), "natten2d")
    o = am.parse(other)
    for expr_prim, expr_flex in ((prim, flex), (prim & o, flex & o), (o - prim, o - flex), (~prim, ~flex),
                                 (~prim | o, ~flex | o)):
        lay = expr_prim.compile(q_len, kv_len, q_offset=q_offset, block_size=block)
        ref = expr_flex.compile(q_len, kv_len, q_offset=q_offset, block_size=block)
        assert torch.equal(lay.to_dense(), ref.to_dense())
        assert torch.equal(lay.block_states(), ref.block_states())
        assert lay.attended_pairs() == ref.attended_pairs()
        assert torch.equal(lay.row_counts(), ref.row_counts())


def test_every_query_on_the_canvas_sees_exactly_kh_times_kw_keys():
    m = am.window2d(13, 7, 5, 3)
    d = m.to_dense(13 * 7 + 9)
    assert d.sum(1)[:91].eq(15).all() and not d[91:].any() and not d[:, 91:].any()


def test_text_parse_and_validation():
    m = am.parse("window2d(32, 16, 7, 3)")
    assert m == am.window2d(32, 16, 7, 3) and str(m) == "window2d(32, 16, 7, 3)" and am.parse(str(m)) == m
    for bad, msg in (("window2d(8, 8, 4, 3)", "needs an odd kw"), ("window2d(8, 8, 3, 2)", "needs an odd kh"),
                     ("window2d(4, 8, 5, 3)", "needs kw <= w, got kw=5, w=4"), ("window2d(8, 2, 3, 3)", "kh <= h"),
                     ("window2d(0, 8, 1, 1)", "needs w >= 1, got w=0"), ("window2d(8, 8, 3)", "takes 4 parameters")):
        with pytest.raises(am.MaskValueError, match=msg):
            am.parse(bad)


def test_attention_with_window2d_matches_float64_dense():
    g = torch.Generator().manual_seed(1)
    n = 24 * 20
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    m = am.causal & am.window2d(24, 20, 5, 5)
    dense = m.to_dense(n)
    s = (q @ k.transpose(-1, -2)) / 4.0
    ref = torch.softmax(s.masked_fill(~dense, float("-inf")), -1).nan_to_num(0.0) @ v
    out = am.attention(q, k, v, m, backend="blocksparse")
    assert (out - ref).abs().max().item() < 1e-10


def test_a_megapixel_canvas_compiles_renders_and_analyzes_without_cells(tmp_path):
    m = am.window2d(1024, 1024, 7, 7)
    n = 1 << 20
    lay = m.compile(n)
    assert lay.dense_tiles_evaluated == 0
    assert lay.attended_pairs() == n * 49                     # every query sees 7 x 7 keys
    rc = lay.row_counts()
    assert int(rc.min()) == int(rc.max()) == 49
    report = am.analyze(m, n)
    assert report.attended_pairs == n * 49
    fig = am.render(m, n, path=tmp_path / "canvas.png")
    assert (tmp_path / "canvas.png").stat().st_size > 1000
    picture = np.asarray(fig.axes[0].images[0].get_array())
    assert picture.shape[0] >= 64 and 0 < float(picture.max()) <= 1
