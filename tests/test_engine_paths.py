"""Problems shaped to reach the engine's real paths, held to the tests' own float64 attention.

Black-box: everything goes through ``am.attention`` (forward, and backward by
autograd) and is compared with ``numerics.reference`` / ``banded_reference``;
nothing here names an engine internal, so the tests keep their meaning when the
engines are rewritten. What they are shaped to reach, and what the random
problems generate, is measured in tests/README.md ("What the strategies generate").

* several query blocks whose rows collect keys from more than one run of tiles
  (partial results merged by log-sum-exp), with fully masked rows inside them;
* long maskless calls past the engine's temporary-memory bound (>= 2048 rows);
* the backward with an explicit q_offset on square shapes, with and without a
  gradient through the lse;
* the backward at long lengths, where its work is split into several kernel calls;
* a small key set under two larger calls of the same rows, and causal regions under a long window;
* a call that merges into rows no earlier call has written, and exactly causal layouts written
  otherwise than ``causal`` (the backward).

The random problems include long ones (>= ``strategies.LONG_ROWS`` query rows, small H and D);
for those the forward runs a second time with the engine's bound on a call's temporaries
lowered (``engines.costs.CHUNK_BYTES``, its one tuning knob named here), so that their long
calls are cut into row pieces as they are at real sizes, and must give the same bits.

Each named test below catches a one-line mutation of the engine that the rest of
the suite once let through (issue 11); the mutation is named in the test.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am

from distribution import record
from numerics import banded_reference, gradient_units, one_thread, output_unit, reference, scaled_error, seeded_qkv, seeded_randn
from strategies import LONG_ROWS, build, engine_problems

#: fp32 against float64, scaled to the inputs (measured: <= 3e-7 on these problems).
FP32_TOL = 1e-5


def _check_forward(q, k, v, mask, allowed, *, scale, q_offset=None, block_size=128):
    out, lse = am.attention(q, k, v, mask, scale=scale, q_offset=q_offset, enable_gqa=True, return_lse=True,
                            block_size=block_size)
    ref, ref_lse = reference(q, k, v, allowed, scale)
    assert not torch.isnan(out).any(), f"NaN in rows {torch.isnan(out).any(-1).nonzero()[:5].tolist()}"
    err = scaled_error(out, ref, output_unit(v))
    assert err < FP32_TOL, f"output error {err:.2e}"
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live)
    if live.any():
        assert scaled_error(lse[live], ref_lse[live], 1.0) < FP32_TOL
    dead = ~live
    assert torch.equal(out[dead], torch.zeros_like(out[dead])), "rows with no key must be exact zeros"
    return out


def _grads(fn, q, k, v, w_out, w_lse):
    """Gradients of sum(out * w_out) (+ sum(lse * w_lse) over rows with a key) w.r.t. q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * w_out).sum()
    if w_lse is not None:
        loss = loss + (lse.double().masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum()
    return out, torch.autograd.grad(loss, (q, k, v))


def _check_backward(q, k, v, mask, allowed, *, scale, q_offset=None, block_size=128, use_lse=False, seed=0,
                    ref_fn=None, tol=FP32_TOL):
    """am.attention's gradients against float64 autograd through the tests' reference."""
    B, H, Lq, D = q.shape
    w_out = seeded_randn((B, H, Lq, D), seed + 7, torch.float64)
    w_lse = seeded_randn((B, H, Lq), seed + 8, torch.float64) if use_lse else None

    def engine(q_, k_, v_):
        return am.attention(q_, k_, v_, mask, scale=scale, q_offset=q_offset, enable_gqa=True, return_lse=True,
                            block_size=block_size)
    ref_fn = ref_fn or (lambda q_, k_, v_: reference(q_, k_, v_, allowed, scale))
    _, got = _grads(engine, q, k, v, w_out, w_lse)
    with one_thread():                     # the backward of the reference runs here, not in ref_fn
        _, want = _grads(ref_fn, q.double(), k.double(), v.double(), w_out, w_lse)
    units = gradient_units(q, k, v, w_out, scale)
    for name, a, b, unit in zip(("dq", "dk", "dv"), got, want, units):
        assert a.dtype == q.dtype and not torch.isnan(a).any(), f"NaN in {name}"
        err = scaled_error(a, b, unit)
        assert err < tol, f"{name}: error {err:.2e} >= {tol}"


# -- (a) the forward's log-sum-exp merge meets a fully masked row ---------------------------------

@pytest.mark.parametrize("expr,L,block", [
    # mutation caught: deleting the isfinite guard on the running maximum in the forward's merge
    # (exp(-inf - -inf) = NaN for a row that no result has reached yet)
    ("causal & (sliding(8) | sink(2)) - rows(100)", 200, 16),
    ("(band(3, 3) | cols(0, 2) | cols(150, 152)) - rows(40, 60, 3)", 180, (16, 32)),
    ("(causal & document(50, 70, 60) | sink(1)) - rows(0, 180, 17)", 180, 32),
    # Since the engine gathers small key clusters (<= 64 keys: sinks, a few columns) into one call
    # with the window's keys, the three cases above merge no kernel results any more and the
    # mutation survived (run of 2026-12-01 session 3). Two clusters of more than 64 keys each
    # (a window of 100 and the keys more than 400 back) stay two calls merged by log-sum-exp.
    ("causal & (sliding(100) | ~sliding(400)) - rows(500)", 600, 16),
    ("(causal & (sliding(100) | ~sliding(400))) - rows(480, 560, 7)", 600, (16, 32)),
])
def test_fully_masked_rows_inside_merged_blocks(expr, L, block):
    mask = am.parse(expr)
    allowed = mask.to_dense(L)
    assert (~allowed.any(1)).any(), "the case must hold a row with no key"
    q, k, v = seeded_qkv(2, 4, 2, L, L, 16, seed=L)
    _check_forward(q, k, v, mask, allowed, scale=0.3, block_size=block)


# -- (b) a long maskless call is cut into row pieces ------------------------------------------------

@pytest.mark.parametrize("expr,keys,L,H,D", [
    # mutation caught: a row cut that does not advance its start (every piece recomputes rows 0..)
    # 4096 rows x 8 heads x 256 dims: 32 MiB of queries in one call on 32 shared keys.
    ("cols(0, 32)", list(range(32)), 4096, 8, 256),
    # not a multiple of the kernel's 256-row slices, two runs of keys, one far from the first
    ("cols(700, 720) | sink(3)", [0, 1, 2] + list(range(700, 720)), 5000, 4, 512),
    # more keys than a key set the engine gathers apart (256 keys): one maskless call of 4096 rows
    ("cols(0, 384)", list(range(384)), 4096, 8, 256),
])
def test_long_calls_on_shared_keys_match_float64(expr, keys, L, H, D):
    mask = am.parse(expr)
    q, k, v = seeded_qkv(1, H, H, L, L, D, seed=D)
    out = am.attention(q, k, v, mask, scale=D ** -0.5)
    # Every row attends exactly ``keys``: the float64 reference on those keys alone.
    with one_thread():
        ref, _ = reference(q, k[:, :, keys], v[:, :, keys], torch.tensor(True), D ** -0.5)
    err = scaled_error(out, ref, output_unit(v))
    assert err < FP32_TOL, f"output error {err:.2e}"
    # the keys named are the mask's (checked on a few rows; the dense mask at this size costs more
    # than the attention)
    rows = [0, 1, L // 2, L - 1]
    want = torch.zeros(len(rows), L, dtype=torch.bool)
    want[:, keys] = True
    assert torch.equal(_rows_of(mask, L, rows), want)


def _rows_of(mask: am.Mask, L: int, rows: list[int]) -> torch.Tensor:
    """Rows of mask.to_dense(L) through a one-row query window at each position."""
    return torch.cat([mask.to_dense(1, L, q_offset=r) for r in rows])


# -- (c) the backward with an explicit q_offset on a square shape ---------------------------------

@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("expr,L,q_offset", [
    # mutation caught: the backward taking a square causal layout as top-left causal whatever its
    # q_offset (its is_causal fast path without the q_offset == 0 guard)
    ("causal", 64, 10),
    ("causal", 64, -5),
    ("causal & document(20, 30, 14)", 64, 7),
    ("causal", 300, 200),
])
def test_backward_with_q_offset_on_square_shapes(expr, L, q_offset, use_lse):
    mask = am.parse(expr)
    q, k, v = seeded_qkv(1, 2, 2, L, L, 8, seed=L + q_offset)
    allowed = mask.to_dense(L, L, q_offset=q_offset)
    _check_backward(q, k, v, mask, allowed, scale=0.35, q_offset=q_offset, block_size=16, use_lse=use_lse)


# -- (d) the backward at long lengths ---------------------------------------------------------------

@pytest.mark.parametrize("L,w,block", [
    # mutation caught: a backward chunk (a group of equal row pieces run as one kernel call)
    # whose start does not advance; at this length the work is several calls
    (16384, 64, 128),
])
def test_long_backward_of_a_window_matches_float64(L, w, block):
    mask = am.causal & am.sliding(w)
    q, k, v = seeded_qkv(1, 1, 1, L, L, 8, seed=3)

    def window(qp, kp):
        return (kp <= qp) & (qp - kp < w)

    def ref_fn(q_, k_, v_):
        return banded_reference(q_, k_, v_, window, lambda r0, r1: (max(0, r0 - w + 1), r1), 0.35,
                                rows_per_step=512)
    _check_backward(q, k, v, mask, None, scale=0.35, block_size=block, ref_fn=ref_fn)


# -- (e) a small key set under two larger calls of the same rows ------------------------------------

@pytest.mark.parametrize("expr,L,block", [
    # mutation caught (mutation run of 2026-12-01): a small key set (a sink) folded into every larger
    # call that covers its rows, not into one, so two calls of the same rows count its keys twice
    ("causal & (sliding(128) | sink(4) | cols(1000, 1100))", 1536, 128),
    ("(band(64, 0) | sink(3) | cols(300, 400))", 640, 64),
    # Since the engine splits key-only parts (sink, cols: <= 256 keys) off the mask, the two cases
    # above no longer reach that fold (the mutation survived the run of d06db22). Key columns that
    # depend on the query too (cols & rows) stay in the tiles: two key clusters beside the window
    # in the same rows, the small one folded into the window's and the far columns' calls.
    ("causal & sliding(128) | (cols(0, 4) & rows(200, 1536)) | (cols(1000, 1100) & rows(1100, 1536))", 1536, 128),
])
def test_a_key_set_joins_one_of_the_calls_over_its_rows(expr, L, block):
    mask = am.parse(expr)
    allowed = mask.to_dense(L)
    q, k, v = seeded_qkv(1, 2, 2, L, L, 16, seed=L)
    _check_forward(q, k, v, mask, allowed, scale=0.25, block_size=block)
    _check_backward(q, k, v, mask, allowed, scale=0.25, block_size=block, seed=L)


# -- (f) causal regions end where the keys left of their diagonal change ---------------------------

@pytest.mark.parametrize("L,w,block", [
    # mutation caught (mutation run of 2026-12-01): a causal region (one is_causal call for a run of
    # diagonal blocks plus one call for their shared left keys) that joins blocks whose left keys
    # differ, so every block gets the first one's window edge
    (3072, 1500, 128),
])
def test_causal_regions_under_a_long_window_match_float64(L, w, block):
    mask = am.causal & am.sliding(w)
    q, k, v = seeded_qkv(1, 1, 1, L, L, 8, seed=w)
    allowed = mask.to_dense(L)
    _check_forward(q, k, v, mask, allowed, scale=0.35, block_size=block)
    _check_backward(q, k, v, mask, allowed, scale=0.35, block_size=block, seed=w)


# -- (g) a merge into rows that no call has written yet --------------------------------------------

@pytest.mark.parametrize("expr,Lq,Lk,block", [
    # mutation caught (mutation run of d06db22, analysed 2026-12-01 session 3): the plan saying every
    # row is written whole by its first call (so out / lse need no zero / -inf fill) although one of
    # its calls merges into rows that are partly unwritten; those rows then merge with uninitialised
    # memory (errors of 1e28). Found by a search: 67 of 992 random forward plans at lengths 200-3000,
    # blocks 32-256, have such a call; none of this file's or test_attention's problems had one.
    ("dilated(64, 3) | cols(145, 439)", 459, 459, 32),
    ("prefix_lm(1459)", 2372, 2372, (128, 64)),
])
def test_merges_into_rows_not_yet_written_match_float64(expr, Lq, Lk, block):
    mask = am.parse(expr)
    q, k, v = seeded_qkv(1, 2, 2, Lq, Lk, 8, seed=Lq)
    _check_forward(q, k, v, mask, mask.to_dense(Lq, Lk), scale=0.25, block_size=block)


# -- (h) layouts that are exactly causal but not written as `causal` ---------------------------------

@pytest.mark.parametrize("expr", [
    # mutation caught (mutation run of d06db22, the backward's exactly-causal plan forced off): the
    # layout is one is_causal call, but the mask is not a plain causal intersection, so the backward
    # cannot take its causal-segments path and runs that plan, whose ops list is empty
    "causal | diagonal", "causal & sliding(1000)", "~~causal",
])
def test_backward_of_exactly_causal_layouts_written_otherwise(expr):
    L = 64
    mask = am.parse(expr)
    allowed = mask.to_dense(L)
    assert torch.equal(allowed, am.causal.to_dense(L)), "the case must be exactly causal"
    q, k, v = seeded_qkv(1, 2, 2, L, L, 8, seed=3)
    _check_backward(q, k, v, mask, allowed, scale=0.35, block_size=16)


# -- random problems shaped like real use ---------------------------------------------------------

def _problem_tensors(p: dict):
    return seeded_qkv(p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], p["D"], seed=p["seed"])


def _record(test: str, p: dict, mask: am.Mask, **extra) -> None:
    record(test, mask=str(mask), Lq=p["Lq"], Lk=p["Lk"], q_offset=p["q_offset"], block=list(p["block"]),
           B=p["B"], H=p["H"], Hkv=p["Hkv"], D=p["D"], **extra)


@contextlib.contextmanager
def _temporaries_bound(nbytes: int):
    """The engine's bound on one call's temporaries lowered to ``nbytes`` (then restored)."""
    from attnmask.engines import costs
    saved = costs.CHUNK_BYTES
    costs.CHUNK_BYTES = nbytes
    try:
        yield
    finally:
        costs.CHUNK_BYTES = saved


#: At this bound a call of >= 2048 rows cuts even at B = H = 1, D = 4 (16 bytes a row).
CUT_BOUND = 16 << 10


@given(engine_problems())
def test_random_engine_problems_forward(p):
    mask = build(p["spec"])
    _record("test_random_engine_problems_forward", p, mask)
    q, k, v = _problem_tensors(p)
    allowed = mask.to_dense(p["Lq"], p["Lk"], q_offset=p["q_offset"])
    out = _check_forward(q, k, v, mask, allowed, scale=0.3, q_offset=p["q_offset"], block_size=p["block"])
    if p["Lq"] >= LONG_ROWS:
        # its long calls cut into row pieces (and batched calls split) as at real sizes: the same bits
        with _temporaries_bound(CUT_BOUND):
            cut = am.attention(q, k, v, mask, scale=0.3, q_offset=p["q_offset"], enable_gqa=True,
                               block_size=p["block"])
        assert torch.equal(cut, out), f"cut calls changed the output by {(cut - out).abs().max():.2e}"


@given(engine_problems(max_blocks=5, long_share=12), st.booleans())
def test_random_engine_problems_backward(p, use_lse):
    # A gradient into the lse runs the same fused kernel calls (a shifted delta), long draws included:
    # their work is split into several calls.
    mask = build(p["spec"])
    _record("test_random_engine_problems_backward", p, mask, use_lse=use_lse)
    q, k, v = _problem_tensors(p)
    allowed = mask.to_dense(p["Lq"], p["Lk"], q_offset=p["q_offset"])
    _check_backward(q, k, v, mask, allowed, scale=0.3, q_offset=p["q_offset"], block_size=p["block"],
                    use_lse=use_lse, seed=p["seed"])
