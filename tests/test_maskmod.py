"""FlexAttention's mask_mods in attnmask mean what they mean in FlexAttention.

The references are FlexAttention's own ``create_mask`` / ``create_block_mask``
(eager, ``_compile=False``: torch.compile is slow here) and float64 attention
on their dense mask. The predicates are this project's own, one of each kind
users bring: a 2-D neighbourhood, a document-id lookup, a prefix LM, a dilated
window, a block table, a scalar-only predicate (vmap), per-head and
per-batch predicates; at lengths that are not multiples of the block, at
rectangular shapes with and without q_offset.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.maskmod import MaskModWarning

fa = pytest.importorskip("torch.nn.attention.flex_attention")


# ---------------------------------------------------------------------------
# the project's predicates, one per kind (tables built for the kv length)
# ---------------------------------------------------------------------------

def neighbourhood_2d(n: int, width: int = 16, kernel: int = 5):
    rows_ = max(-(-n // width), kernel)

    def fn(b, h, q, k):
        cr = (q // width).clamp(kernel // 2, rows_ - 1 - kernel // 2)
        cc = (q % width).clamp(kernel // 2, width - 1 - kernel // 2)
        return ((cr - k // width).abs() <= kernel // 2) & ((cc - k % width).abs() <= kernel // 2)
    return fn


def document_lookup(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, 2, (n,), generator=g).cumsum(0) // 7        # a table exactly n long

    def fn(b, h, q, k):
        return (doc[q] == doc[k]) & (k <= q)
    return fn


def prefix(n: int):
    p = n // 3

    def fn(b, h, q, k):
        return (k <= q) | (k < p)
    return fn


def dilated(n: int):
    def fn(b, h, q, k):
        d = q - k
        return (d >= 0) & (d < 6 * 5) & (d % 5 == 0)
    return fn


def block_table(n: int, block: int = 16, seed: int = 1):
    nb = -(-n // block)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(nb, nb, generator=g) < 0.3

    def fn(b, h, q, k):
        return blocks[q // block, k // block]
    return fn


def scalar_only(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    span = torch.randint(0, 2, (n,), generator=g).cumsum(0) // 9
    starts = torch.randint(0, n, (int(span.max()) + 1,), generator=g)
    intervals = torch.stack([starts, starts + 40], dim=1)

    def fn(b, h, q, k):
        interval = intervals[span[q]]          # scalar indexing: needs vmap
        return (k >= interval[0]) & (k < interval[1])
    return fn


KINDS = {"neighbourhood_2d": neighbourhood_2d, "document": document_lookup, "prefix": prefix,
         "dilated": dilated, "block_table": block_table, "scalar_only": scalar_only}


def per_head(windows=((3, 9, 17, 40), (5, 2, 64, 1))):
    w = torch.tensor(windows)                  # [B, H]

    def fn(b, h, q, k):
        return (q - k >= 0) & (q - k < w[b, h])
    return fn


def leaf(fn, name="fn") -> am.Mask:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskModWarning)
        return am.from_mask_mod(fn, name)


def quiet(f, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskModWarning)
        return f(*a, **kw)


def states_of(bm) -> torch.Tensor:
    """int8 [B, H, nqb, nkb] of a BlockMask: 1 partial, 2 full."""
    B, H, nqb = bm.kv_num_blocks.shape
    nkb = bm.kv_indices.shape[-1]
    out = torch.zeros(B, H, nqb, nkb, dtype=torch.int8)
    for num, idx, val in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        if num is None:
            continue
        for b in range(B):
            for h in range(H):
                for i in range(nqb):
                    out[b, h, i, idx[b, h, i, :int(num[b, h, i])].long()] = val
    return out


def fp64_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Float64 reference: softmax over allowed keys, zeros on rows with none. allowed [B or 1, H or 1, Lq, Lk]."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


def scaled_error(got, ref) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------
# each kind, at lengths that are not multiples of the block
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", [200, 333])
def test_kind_matches_flexattention(kind, n):
    fn = KINDS[kind](n)
    m = leaf(fn, kind)
    want = fa.create_mask(fn, 1, 1, n, n, device="cpu")[0, 0]
    assert torch.equal(quiet(m.to_dense, n), want)
    lay = quiet(m.compile, n, block_size=64)
    assert torch.equal(lay.to_dense(), want)
    theirs = fa.create_block_mask(fn, None, None, n, n, device="cpu", BLOCK_SIZE=64, _compile=False)
    ours = lay.to_flex_block_mask(edge_tiles="flex")
    assert torch.equal(states_of(ours), states_of(theirs))
    # the exact rule differs only on short edge tiles: full there where every existing pair is attended
    exact = states_of(lay.to_flex_block_mask())
    assert torch.equal(exact > 0, states_of(theirs) > 0)
    assert torch.equal(exact[0, 0], lay.block_states())
    if kind == "scalar_only":
        assert m.route == "vmap"
    else:
        assert m.route == "broadcast"


def test_table_lookups_never_see_a_padded_index():
    seen = []
    n = 1000
    doc = torch.arange(n) // 100

    def fn(b, h, q, k):
        seen.append((int(q.min()), int(q.max()), int(k.min()), int(k.max())))
        return doc[q] == doc[k]                  # IndexError on any index >= n

    m = am.from_mask_mod(fn, "docs")
    lay = m.compile(n, block_size=128)           # 1000 is not a multiple of 128: padded edge tiles
    q = torch.randn(1, 2, n, 16)
    out = am.attention(q, q, q, m)               # the engine's partial tiles too
    assert seen and all(0 <= a and b < n and 0 <= c and d < n for a, b, c, d in seen)
    assert torch.equal(lay.to_dense(), doc[:, None] == doc[None, :])
    ref = fp64_attention(q, q, q, (doc[:, None] == doc[None, :])[None, None])
    assert scaled_error(out, ref) < 1e-5


def test_scalar_only_predicates_take_the_vmap_route_and_say_so():
    fn = scalar_only(300)
    m = am.from_mask_mod(fn, "intervals")
    assert m.route is None
    with pytest.warns(MaskModWarning, match="vmap"):
        dense = m.to_dense(300)
    assert m.route == "vmap"
    assert torch.equal(dense, fa.create_mask(fn, 1, 1, 300, 300, device="cpu")[0, 0])


def test_a_predicate_that_fails_both_ways_is_a_mask_error():
    m = am.from_mask_mod(lambda b, h, q, k: int(q) < 3, "python_int")
    with pytest.raises(am.MaskError, match="python_int"):
        quiet(m.to_dense, 8)


# ---------------------------------------------------------------------------
# rectangular shapes: the leaf reads row indices, primitives read positions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("q_len,kv_len", [(100, 300), (300, 100), (1, 257)])
@pytest.mark.parametrize("q_offset", [None, 0, 37])
def test_rectangular_shapes_and_q_offset(q_len, kv_len, q_offset):
    fn = document_lookup(max(q_len, kv_len))
    m = am.from_mask_mod(fn, "doc")
    flex = fa.create_mask(fn, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    # alone: exactly FlexAttention's mask, whatever q_offset says
    assert torch.equal(m.to_dense(q_len, kv_len, q_offset=q_offset), flex)
    lay = m.compile(q_len, kv_len, q_offset=q_offset, block_size=32)
    assert torch.equal(lay.to_dense(), flex)
    theirs = fa.create_block_mask(fn, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=32, _compile=False)
    assert torch.equal(states_of(lay.to_flex_block_mask(edge_tiles="flex")), states_of(theirs))
    # combined: causal reads positions q_offset + i, the leaf reads row i
    both = (am.causal & m).to_dense(q_len, kv_len, q_offset=q_offset)
    assert torch.equal(both, am.causal.to_dense(q_len, kv_len, q_offset=q_offset) & flex)
    lay2 = (am.causal & m).compile(q_len, kv_len, q_offset=q_offset, block_size=32)
    assert torch.equal(lay2.to_dense(), both)
    if q_offset == 0:   # then positions are rows: the same as FlexAttention with causal written in
        causal_fn = fa.and_masks(lambda b, h, q, k: k <= q, fn)
        assert torch.equal(both, fa.create_mask(causal_fn, 1, 1, q_len, kv_len, device="cpu")[0, 0])


def test_rectangular_attention_equals_fp64():
    q_len, kv_len = 96, 300
    fn = document_lookup(kv_len)
    m = am.causal & am.from_mask_mod(fn, "doc")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (q_len, kv_len, kv_len))
    for off in (None, 0):
        allowed = m.to_dense(q_len, kv_len, q_offset=off)
        out = am.attention(q, k, v, m, q_offset=off)
        assert scaled_error(out, fp64_attention(q, k, v, allowed[None, None])) < 1e-5


# ---------------------------------------------------------------------------
# per-head and per-batch predicates
# ---------------------------------------------------------------------------

def test_per_head_and_per_batch_predicates_everywhere():
    fn = per_head()
    m = am.from_mask_mod(fn, "windows")
    assert m.depends_on() == {"batch", "head"}
    assert am.from_mask_mod(document_lookup(50)).depends_on() == frozenset()
    B, H, n = 2, 4, 150
    flex = fa.create_mask(fn, B, H, n, n, device="cpu")
    for b in range(B):
        for h in range(H):
            assert torch.equal(m.to_dense(n, b=b, h=h), flex[b, h])
            assert torch.equal(m.at(b=b, h=h).to_dense(n), flex[b, h])
            assert torch.equal(m.compile(n, block_size=32, b=b, h=h).to_dense(), flex[b, h])
    with pytest.raises(am.MaskError, match=r"h=|b="):
        m.compile(n)
    with pytest.raises(am.MaskError, match=r"mask.at\("):
        m.to_dense(n)
    # BlockMask of every (b, h), equal to create_block_mask's, whichever head the layout was compiled for
    theirs = fa.create_block_mask(fn, B, H, n, n, device="cpu", BLOCK_SIZE=32, _compile=False)
    ours = m.compile(n, block_size=32, b=1, h=3).to_flex_block_mask(B, H, edge_tiles="flex")
    assert ours.shape == (B, H, n, n) == theirs.shape
    assert torch.equal(states_of(ours), states_of(theirs))
    # one mask for all heads in attention, evaluated per (b, h); GQA
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, n, 16, generator=g)
    k, v = torch.randn(B, 2, n, 16, generator=g), torch.randn(B, 2, n, 16, generator=g)
    out = am.attention(q, k, v, m, enable_gqa=True)
    ref = fp64_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), flex)
    assert scaled_error(out, ref) < 1e-5
    # rendering picks a head
    pytest.importorskip("matplotlib")
    fig = am.render([m.at(b=0, h=h) for h in range(H)], n)
    assert len(fig.axes) >= H


def test_to_flex_block_mask_honours_batch_and_heads_for_every_mask():
    lay = am.causal.compile(256, block_size=128)
    bm = lay.to_flex_block_mask(2, 4)
    theirs = fa.create_block_mask(lambda b, h, q, k: k <= q, 2, 4, 256, 256, device="cpu", _compile=False)
    assert bm.shape == theirs.shape == (2, 4, 256, 256)
    assert torch.equal(states_of(bm), states_of(theirs))
    assert lay.to_flex_block_mask().shape == (1, 1, 256, 256)
    with pytest.raises(am.MaskError, match="heads"):
        lay.to_flex_block_mask(1, 0)
    with pytest.raises(am.MaskError, match="edge_tiles"):
        lay.to_flex_block_mask(edge_tiles="padded")


# ---------------------------------------------------------------------------
# many shapes (hypothesis)
# ---------------------------------------------------------------------------

@given(st.sampled_from(sorted(KINDS)), st.integers(1, 200), st.integers(1, 200),
       st.one_of(st.none(), st.integers(-50, 300)), st.sampled_from([16, 32, 128]),
       st.sampled_from(["alone", "causal &", "| sliding(7)", "- diagonal"]))
def test_many_shapes_match_flexattention(kind, q_len, kv_len, q_offset, block, combine):
    n = max(q_len, kv_len)
    fn = KINDS[kind](n)
    m = leaf(fn, kind)
    flex = fa.create_mask(fn, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    if combine == "alone":
        expr, want = m, flex
    else:
        prim = {"causal &": am.causal, "| sliding(7)": am.sliding(7), "- diagonal": am.diagonal}[combine]
        p = prim.to_dense(q_len, kv_len, q_offset=q_offset)
        expr, want = {"causal &": (prim & m, p & flex), "| sliding(7)": (m | prim, flex | p),
                      "- diagonal": (m - prim, flex & ~p)}[combine]
    assert torch.equal(quiet(expr.to_dense, q_len, kv_len, q_offset=q_offset), want)
    lay = quiet(expr.compile, q_len, kv_len, q_offset=q_offset, block_size=block)
    assert torch.equal(lay.to_dense(), want)
    assert lay.attended_pairs() == int(want.sum())
    if combine == "alone":
        theirs = fa.create_block_mask(fn, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=block,
                                      _compile=False)
        assert torch.equal(states_of(lay.to_flex_block_mask(edge_tiles="flex")), states_of(theirs))


_DENSE_500: dict = {}


def _dense_500(which: int, fn) -> torch.Tensor:
    if which not in _DENSE_500:
        _DENSE_500[which] = fa.create_mask(fn, 1, 1, 500, 500, device="cpu")[0, 0]
    return _DENSE_500[which]


_FNS_500 = [make(500) for make in KINDS.values()]


@given(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 400), st.integers(1, 90), st.integers(0, 400),
                                             st.integers(1, 90)), min_size=1, max_size=30))
def test_bounds_are_sound(which, rects):
    from attnmask.maskmod_bounds import bounds, trace
    fn = _FNS_500[which]
    vmapped = which == 5
    t = trace(fn, vmapped=vmapped)
    r0, rn, k0, kn = (np.array(x, np.int64) for x in zip(*rects))
    r0, k0 = np.minimum(r0, 499 - rn + 1).clip(0), np.minimum(k0, 499 - kn + 1).clip(0)
    r1, k1 = np.minimum(r0 + rn, 500), np.minimum(k0 + kn, 500)
    may_t, may_f = bounds(t, 0, 0, r0, r1 - 1, k0, k1 - 1)
    dense = _dense_500(which, fn)
    for i in range(len(r0)):
        cell = dense[r0[i]:r1[i], k0[i]:k1[i]]
        assert may_t[i] or not cell.any()
        assert may_f[i] or cell.all()


# ---------------------------------------------------------------------------
# long masks: bounded, or refused with the way out
# ---------------------------------------------------------------------------

def test_a_million_token_mask_mod_compiles_from_bounds():
    def window(b, h, q, k):
        return (q - k >= 0) & (q - k < 1024)
    n = 1 << 20
    lay = am.from_mask_mod(window, "window").compile(n)
    assert lay.counts() == (am.causal & am.sliding(1024)).compile(n).counts()


def test_an_unboundable_million_token_compile_is_refused_with_the_way_out():
    def float_window(b, h, q, k):
        return (q - k).float().abs() < 1000.5          # floats: no interval rule
    with pytest.raises(am.LayoutTooLargeError, match="DENSE_CELL_BUDGET|integer tensor arithmetic"):
        am.from_mask_mod(float_window, "float_window").compile(1 << 20)


# ---------------------------------------------------------------------------
# decode and short calls (q_len <= 16): the short path evaluates the leaf in its frame
# ---------------------------------------------------------------------------

def _short_plans():
    from attnmask.engines.short import short_plans
    return short_plans


@given(st.sampled_from(sorted(KINDS)), st.integers(1, 16), st.integers(1, 300),
       st.sampled_from(["alone", "causal &", "| sliding(7)"]), st.integers(1, 2), st.sampled_from([1, 2]))
def test_short_calls_evaluate_mask_mods_as_flexattention_does(kind, q_len, kv_len, combine, B, rep):
    fn = KINDS[kind](max(q_len, kv_len))
    m = leaf(fn, kind)
    flex = fa.create_mask(fn, 1, 1, q_len, kv_len, device="cpu")[0, 0]       # rows 0..q_len-1
    if combine == "alone":
        expr, want = m, flex
    else:   # the primitive reads positions kv_len - q_len + row (decode's default q_offset)
        prim = {"causal &": am.causal, "| sliding(7)": am.sliding(7)}[combine]
        p = prim.to_dense(q_len, kv_len)
        expr, want = (prim & m, p & flex) if combine == "causal &" else (m | prim, flex | p)
    H = 2 * rep
    g = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(B, H, q_len, 8, generator=g)
    k, v = torch.randn(B, 2, kv_len, 8, generator=g), torch.randn(B, 2, kv_len, 8, generator=g)
    plans = _short_plans()
    plans.clear()
    out, lse = quiet(am.attention, q, k, v, expr, enable_gqa=True, return_lse=True)
    assert len(plans) == 1                            # the short path ran (no layout was compiled)
    ref = fp64_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), want)
    assert scaled_error(out, ref) < 1e-5
    assert torch.equal(torch.isinf(lse), ~want.any(-1).expand(B, H, q_len))   # rows with no key: lse -inf
    # the same call through a compiled layout agrees
    lay = quiet(expr.compile, q_len, kv_len, block_size=16)
    assert torch.equal(lay.to_dense(), want)


@pytest.mark.parametrize("q_len,kv_len,q_offset", [(1, 90, None), (16, 200, None), (7, 7, 0), (16, 40, 3)])
def test_short_calls_with_per_head_and_per_batch_mask_mods(q_len, kv_len, q_offset):
    fn = per_head()                                   # window per (b, h): [2, 4]
    m = am.from_mask_mod(fn, "windows")
    B, H = 2, 4
    flex = fa.create_mask(fn, B, H, q_len, kv_len, device="cpu")            # [B, H, Lq, Lk]
    causal = am.causal.to_dense(q_len, kv_len, q_offset=q_offset)
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(B, H, q_len, 16, generator=g)
    k, v = torch.randn(B, 2, kv_len, 16, generator=g), torch.randn(B, 2, kv_len, 16, generator=g)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    plans = _short_plans()
    for expr, want in ((m, flex), (am.causal | m, flex | causal)):
        plans.clear()
        out = am.attention(q, k, v, expr, q_offset=q_offset, enable_gqa=True)
        assert len(plans) == 1
        assert scaled_error(out, fp64_attention(q, kk, vv, want)) < 1e-5
    # a per-head list with one mask_mod entry, and per_batch entries
    from attnmask.engines import per_batch
    heads = [am.causal, m, am.sliding(3), m]
    want = torch.stack([causal, flex[0, 1], am.sliding(3).to_dense(q_len, kv_len, q_offset=q_offset), flex[0, 3]])
    plans.clear()
    out = am.attention(q[:1], k[:1], v[:1], heads, q_offset=q_offset, enable_gqa=True)
    assert len(plans) == 1
    assert scaled_error(out, fp64_attention(q[:1], kk[:1], vv[:1], want[None])) < 1e-5
    lay = m.compile(q_len, kv_len, q_offset=q_offset, block_size=16, b=1, h=2)     # a layout keeps its (b, h)
    out = am.attention(q, k, v, per_batch([am.causal, lay]), q_offset=q_offset, enable_gqa=True)
    want = torch.stack([causal.expand(H, -1, -1), flex[1, 2].expand(H, -1, -1)])
    assert scaled_error(out, fp64_attention(q, kk, vv, want)) < 1e-5
