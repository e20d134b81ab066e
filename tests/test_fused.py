"""The fused CPU kernel (csrc/attend.c, ``engines._attend``), held to the tests' own float64 attention.

The block-sparse engine runs every plan through the kernel when ``fused.usable(dtype, D)``;
these tests make sure it does, and that what it returns is exact: float32 out and lse within
1e-5 of float64 attention from ``Mask.to_dense`` (``numerics.reference``), bfloat16 within the
dtype's own rounding, the same bits on every run and thread count; and the kernel's backward
(``fused.backward_call``, which the autograd runs wherever the kernel runs) the same: float32
dq, dk, dv within 1e-5 of float64 autograd, bf16 within 1.5x the error of ATen's bf16 backward
and 4x the stick (BF16_STICKS, BF16_ATEN), fixed bits.
Everything but the build guard is skipped where the kernel cannot run (no AVX-512, or
``ATTNMASK_KERNEL=0``); the build guard makes a broken build turn the suite red instead of
silently running the ATen path.

Which plausible kernel bugs each test catches: benchmarks/results/kernel_mutations.md
(tools/kernel_mutations.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import textwrap
import sys
import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.engines import attention, fused
from attnmask.engines.autograd import blocksparse_attention_with_grad
from attnmask.engines.blocksparse import blocksparse_forward
from numerics import gradient_units, one_thread, output_unit, reference, scaled_error, seeded_qkv, seeded_randn
from strategies import build, engine_problems, masks, resolved, shapes
from test_backward import _out_weights

#: float32 against float64, scaled to the inputs.
FP32_TOL = 1e-5

kernel = pytest.mark.skipif(not fused.usable(torch.float32, 16),
                            reason=f"kernel not usable: {fused.status()['reason']}")
kernel_bf16 = pytest.mark.skipif(not fused.usable(torch.bfloat16, 16),
                                 reason=f"bf16 kernel not usable: {fused.status()['reason']}")


@contextlib.contextmanager
def kernel_calls():
    """The engine's forward calls of the kernel (fused.forward_call) meanwhile, as (dtype, D); the kernel
    still runs."""
    seen, make = [], fused.forward_call

    def counted(items, q, *args, **kwargs):
        seen.append((q.dtype, q.shape[-1]))
        return make(items, q, *args, **kwargs)
    fused.forward_call = counted
    try:
        yield seen
    finally:
        fused.forward_call = make


def _forward(q, k, v, mask, *, scale, q_offset=None, block_size=64, out_dtype=None):
    """The engine's forward (no dispatch: short calls would not reach the kernel); ``mask`` or a list per head."""
    B, H, Lq, _ = q.shape
    heads = mask if isinstance(mask, list) else [mask]
    layouts = [m.compile(Lq, k.shape[2], q_offset=q_offset, block_size=block_size) for m in heads]
    head_layout = (torch.arange(H) if isinstance(mask, list) else torch.zeros(H, dtype=torch.int64)).expand(B, H)
    return blocksparse_forward(q, k, v, layouts, head_layout, scale, out_dtype=out_dtype)


def _allowed(mask, Lq, Lk, q_offset):
    if isinstance(mask, list):
        return torch.stack([m.to_dense(Lq, Lk, q_offset=q_offset) for m in mask])[None]
    return mask.to_dense(Lq, Lk, q_offset=q_offset)


def _check(out, lse, ref, ref_lse, v, tol=FP32_TOL):
    """out and lse against float64; rows with no key exact zeros and -inf."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = scaled_error(out, ref, output_unit(v))
    assert err < tol, f"output error {err:.2e}"
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live), "rows with a key must have a finite lse, the others -inf"
    assert bool((lse[~live] == float("-inf")).all())
    if live.any():
        err = scaled_error(lse[live], ref_lse[live], 1.0)
        assert err < tol, f"lse error {err:.2e}"
    dead = out[~live]
    assert torch.equal(dead, torch.zeros_like(dead)), "rows with no key must be exact zeros"


def _check_kernel(q, k, v, mask, *, scale=None, q_offset=None, block_size=64):
    """The engine's forward against float64, having run the kernel."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=scale, q_offset=q_offset, block_size=block_size)
    assert calls, "the kernel was not called"
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ref, ref_lse = reference(q, k, v, _allowed(mask, Lq, Lk, q_offset), scale)
    _check(out, lse, ref, ref_lse, v)
    return out, lse


# -- float32 against float64 ------------------------------------------------------------------------

SPREAD = [
    # (expression, Lq, Lk, q_offset, block)
    ("causal", 300, None, None, 64),                       # one top-left causal item: the 16-row lane shift
    ("causal", 97, 97, None, 16),
    ("causal & sliding(5)", 300, None, None, 32),          # narrow window
    ("causal & sliding(200)", 300, None, None, 64),        # wide window, not a multiple of 16
    ("sliding(37)", 173, None, None, 32),
    ("band(21, 9)", 150, None, None, (16, 32)),
    ("causal & (sliding(40) | sink(4))", 300, None, None, 64),   # gathered keys in front of a window
    ("causal & (sliding(24) | sink(70))", 200, None, None, 32),
    ("(causal & sliding(30)) | cols(100, 117)", 250, None, None, 32),
    ("(causal & sliding(30)) | cols(3, 200, 7)", 250, None, None, 64),  # a strided key set
    ("cols(0, 40, 3) | cols(150, 151)", 130, 190, None, 32),            # key sets only
    ("causal & document(70, 130, 100)", 300, None, None, 64),           # documents as a plan
    ("causal & document(17, 5, 60)", 113, None, None, 16),              # past the documents: no key
    ("causal & document(300, 211)", 600, None, None, 64),               # causal items per segment, rows left
    ("document(40, 90, 50)", 180, None, None, 32),                      # documents, not causal
    ("prefix_lm(50)", 211, None, None, 64),
    ("chunked(48)", 200, None, None, 32),
    ("causal & chunked(37)", 200, None, None, 64),
    ("dilated(20, 3)", 250, None, None, 32),                            # strided views of q, k, v
    ("causal & dilated(9, 4)", 161, None, None, 16),
    ("causal - (rows(36, 64, 8) - diagonal)", 120, None, None, 16),     # the signature
    ("full", 100, 257, 30, 64),
    ("full", 33, 17, None, 16),
    ("causal", 100, 257, None, 64),                                     # a bottom-right causal chunk
    ("causal & sliding(50)", 70, 200, 90, 32),
    ("none", 50, None, None, 16),
    ("causal - rows(40, 70)", 150, None, None, 32),                     # dead rows inside live groups
    ("(causal & (sliding(8) | sink(2))) - rows(20, 100, 3)", 130, None, None, 16),
    ("(causal & (sliding(100) | ~sliding(400))) - rows(480, 560, 7)", 600, None, None, (16, 32)),
]


@pytest.mark.parametrize("rows,N", [(1, 1), (16, 5), (17, 64), (64, 1087), (100, 33), (255, 3)])
def test_packed_mask_bits(rows, N):
    # The kernel's mask format: bit r of word [g, j] is mask[16 g + r, j]; rows past the mask are 0.
    mask = torch.rand(rows, N, generator=torch.Generator().manual_seed(rows * N)) < 0.5
    padded = torch.zeros(-(-rows // 16) * 16, N, dtype=torch.int64)
    padded[:rows] = mask
    want = sum(padded[r::16] << r for r in range(16))
    got = fused._pack_bits(mask)
    assert got.dtype == torch.uint16 and got.is_contiguous() and torch.equal(got.to(torch.int64), want)


@kernel
@pytest.mark.parametrize("expr,Lq,Lk,q_offset,block", SPREAD)
def test_float32_masks_match_float64(expr, Lq, Lk, q_offset, block):
    mask = am.parse(expr)
    Lk = Lq if Lk is None else Lk
    q, k, v = seeded_qkv(2, 2, 2, Lq, Lk, 32, seed=Lq + Lk)
    if expr == "none":
        out, lse = _forward(q, k, v, mask, scale=0.2, block_size=block)
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
        return
    _check_kernel(q, k, v, mask, scale=0.2, q_offset=q_offset, block_size=block)


@kernel
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("expr", ["causal", "causal & (sliding(45) | sink(3)) | cols(90, 99)"])
def test_float32_head_dims(D, expr):
    q, k, v = seeded_qkv(1, 2, 1, 131, 131, D, seed=D)
    _check_kernel(q, k, v, am.parse(expr), block_size=32)


@kernel
@pytest.mark.parametrize("L", [1, 15, 16, 17, 63, 64, 65, 129])
def test_float32_lengths_off_the_kernel_grid(L):
    # Groups of 16 rows, pieces of 16 keys (narrow ones of <= 8), softmax steps of 4 pieces: each with
    # a short last one.
    for expr in ("causal", "causal & (sliding(20) | sink(1))", "full"):
        q, k, v = seeded_qkv(1, 1, 1, L, L + 3, 16, seed=L)
        _check_kernel(q, k, v, am.parse(expr), block_size=16)


@kernel
def test_float32_batches_gqa_and_per_head_lists():
    heads = [am.causal, am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal,
             am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3), am.prefix_lm(19)]
    q, k, v = seeded_qkv(2, 6, 3, 100, 100, 32, seed=5)
    _check_kernel(q, k, v, heads, block_size=32)
    _check_kernel(q, k, v, am.causal & (am.sliding(33) | am.sink(4)), block_size=32)


@kernel
def test_float32_non_contiguous_inputs_as_models_pass_them():
    # [B, L, H, D] projections viewed as [B, H, L, D]: rows strided by H * D, heads by D.
    B, L, H, Hkv, D = 2, 150, 4, 2, 32
    q = seeded_randn((B, L, H, D), 1).transpose(1, 2)
    k = seeded_randn((B, L, Hkv, D), 2).transpose(1, 2)
    v = seeded_randn((B, L, Hkv, D), 3).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(2) == Hkv * D
    for expr in ("causal", "causal & (sliding(30) | sink(5))", "causal & document(40, 60, 50)",
                 "cols(0, 150, 9) | diagonal", "dilated(10, 2)"):
        mask = am.parse(expr)
        with kernel_calls() as calls:
            out, lse = attention(q, k, v, mask, scale=0.2, enable_gqa=True, return_lse=True, block_size=32)
        assert calls, expr
        ref, ref_lse = reference(q, k, v, mask.to_dense(L), 0.2)
        _check(out, lse, ref, ref_lse, v)


# -- the plans made for the kernel (costs.KERNEL) ---------------------------------------------------

#: Shapes at the engine's default 128-row blocks, where the kernel's plans differ from the ATen
#: path's: key sets joined into every item (a wide window's too), 128-row items, windows and
#: lengths off the 16 grid, per-head lists, q_len != kv_len, short documents as causal items.
KERNEL_PLANS = [
    # (expression, Lq, Lk, q_offset)
    ("causal & sliding(64)", 1000, None, None),
    ("causal & (sliding(64) | sink(4))", 1000, None, None),
    ("causal & (sliding(300) | sink(4))", 700, None, None),              # the ATen path: key-set calls
    ("causal & (sliding(77) | sink(5))", 509, None, None),
    ("causal & (sliding(256) | cols(7) | cols(333) | cols(600))", 900, None, None),
    ("causal & (sliding(128) | cols(0, 8))", 600, None, None),
    ("causal & (sliding(100) | sink(4))", 200, 650, None),               # queries the last 200 positions
    ("causal & (sliding(40) | sink(3))", 150, 400, 100),
    ("causal & document(30, 45, 17, 200, 61)", 400, None, None),        # short documents: causal items
    ("(causal & document(100, 150, 250)) | sink(6)", 500, None, None),   # rows cut at document starts
    ("causal - (rows(300, 600, 50) - diagonal) | sink(2)", 640, None, None),
]


def _coverage(items, masks, Lq, Lk) -> torch.Tensor:
    """How many times the item table covers each (row, key): int [Lq, Lk] (the plan must give the mask)."""
    count = torch.zeros((Lq, Lk), dtype=torch.int64)
    extras = items.extras.tolist()
    for r0, rows, k0, span, mi, flags, x0, xn, E in items.table.tolist():
        keys = [j for a, b in extras[x0:x0 + xn] for j in range(a, b)] + list(range(k0, k0 + span))
        assert len(keys) == E + span
        if mi >= 0:
            cells = masks[mi].long()
        elif flags & 1:
            cells = torch.ones((rows, span), dtype=torch.int64).tril_()
        else:
            cells = torch.ones((rows, E + span), dtype=torch.int64)
        count[r0:r0 + rows].index_add_(1, torch.tensor(keys, dtype=torch.int64), cells)
    return count


@kernel
@pytest.mark.parametrize("expr,Lq,Lk,q_offset", KERNEL_PLANS)
def test_kernel_plans_cover_every_pair_once_and_match_float64(expr, Lq, Lk, q_offset):
    from attnmask.engines.blocksparse import kernel_items, plan_for
    from attnmask.engines.costs import KERNEL
    mask = am.parse(expr)
    Lk = Lq if Lk is None else Lk
    lay = mask.compile(Lq, Lk, q_offset=q_offset)
    items, covered = kernel_items(lay)
    plan = plan_for(lay, KERNEL)
    dense = mask.to_dense(Lq, Lk, q_offset=q_offset)
    assert torch.equal(_coverage(items, plan.masks if items is plan.kernel_items else [], Lq, Lk), dense.long())
    assert covered == bool(dense.any(1).all()) or not covered
    if items is plan.kernel_items:
        t = items.table
        # no rows stored and reloaded for a key set: every key-set cell joined an item of the rest
        assert not bool((t[:, 3] == 0).any()), "a key-set item of its own"
        assert bool((t[:, 5] & 2 == 2).all()) or "rows(" in expr, "an item continues rows an earlier one wrote"
    q, k, v = seeded_qkv(1, 6, 2, Lq, Lk, 32, seed=Lq + Lk)
    _check_kernel(q, k, v, mask, scale=0.2, q_offset=q_offset, block_size=128)
    _check_backward(q, k, v, mask, scale=0.2, q_offset=q_offset, block=128, seed=Lq)


@kernel
def test_kernel_plans_at_models_shapes_per_head():
    # SmolLM2's nine per-head masks (H=9, Hkv=3), the benchmark's, at a length off the 16 grid.
    texts = ["causal & (sliding(32) | sink(4))", "causal & (sliding(64) | sink(4))",
             "causal & (sliding(128) | sink(4))", "causal & (sliding(256) | sink(4))", "causal & sliding(64)",
             "causal & (sliding(16) | sink(1))", "causal & (sliding(512) | sink(4))", "causal",
             "causal & (sliding(128) | cols(0, 8))"]
    heads = [am.parse(t) for t in texts]
    q, k, v = seeded_qkv(1, 9, 3, 601, 601, 64, seed=9)
    _check_kernel(q, k, v, heads, scale=0.125, block_size=128)
    _check_backward(q, k, v, heads, scale=0.125, block=128, seed=9)


@kernel
def test_kernel_plans_are_their_own_direction_and_the_aten_plans_unchanged(monkeypatch):
    # The kernel runs plan_for(layout, KERNEL); the ATen path (ATTNMASK_KERNEL=0) still plans FORWARD:
    # 64-row pieces, and a wide window's sink as key-set calls of its own merged by LSE.
    from attnmask.engines import blocksparse
    from attnmask.engines.costs import FORWARD, KERNEL
    lay = am.parse("causal & (sliding(300) | sink(4))").compile(700)
    aten, mine = blocksparse.plan_for(lay, FORWARD), blocksparse.plan_for(lay, KERNEL)
    assert aten is not mine and blocksparse.plan_for(lay, KERNEL) is mine
    assert any(op.span == 0 for op in aten.ops) and not any(op.span == 0 for op in mine.ops)
    assert max(op.rows for op in aten.ops if op.span) == 64 and max(op.rows for op in mine.ops) == 128
    q, k, v = seeded_qkv(1, 2, 2, 700, 700, 32, seed=3)
    made = []
    real = blocksparse.plan_for
    monkeypatch.setattr(blocksparse, "plan_for", lambda layout, direction=FORWARD: made.append(direction)
                        or real(layout, direction))
    _forward(q, k, v, am.parse("causal & (sliding(300) | sink(4))"), scale=0.2, block_size=128)
    assert made == [KERNEL]
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    made.clear()
    _forward(q, k, v, am.parse("causal & (sliding(300) | sink(4))"), scale=0.2, block_size=128)
    assert made == [FORWARD]


@kernel
def test_item_scores_count_the_pieces_the_kernel_visits():
    # Items.scores picks thread counts: a causal item counts its triangle's pieces, not its
    # rectangle; a window its live pieces (sliding(64): 5 of them per 16 rows, 4 keys of a sink 1 more).
    from attnmask.engines.blocksparse import kernel_items
    L = 1024
    causal, _ = kernel_items(am.causal.compile(L))
    groups = L // 16
    assert causal.scores == 256 * groups * (groups + 1) // 2
    window, _ = kernel_items((am.causal & am.sliding(64)).compile(L))
    sink, _ = kernel_items((am.causal & (am.sliding(64) | am.sink(4))).compile(L))
    assert window.scores == 256 * (5 * groups - 10)          # the first 4 groups see fewer pieces
    assert sink.scores == window.scores + 256 * (groups - 4)  # groups whose window no longer holds the sink


# -- bfloat16: within the dtype's own rounding ------------------------------------------------------

@kernel_bf16
@pytest.mark.parametrize("expr,L,block", [
    ("causal", 300, 64),
    ("causal & (sliding(100) | sink(4))", 300, 64),
    ("causal & document(70, 200, 30)", 300, 64),
    ("dilated(20, 3) | diagonal", 300, 32),
    ("(causal & document(100, 200, 300)) | sink(8) | cols(400, 420)", 600, 16),
])
def test_bfloat16_within_the_dtypes_rounding(expr, L, block):
    # The stick: the float64 result rounded to bf16 (the best any kernel can return); and ATen's
    # bf16 SDPA on the dense mask, the kernel the engine runs without ours.
    mask = am.parse(expr)
    q, k, v = seeded_qkv(1, 4, 4, L, L, 64, seed=11, dtype=torch.bfloat16)
    allowed = mask.to_dense(L)
    ref, ref_lse = reference(q, k, v, allowed, 0.125)
    unit = output_unit(v)
    stick = scaled_error(ref.to(torch.bfloat16), ref, unit)
    with one_thread():
        aten = scaled_error(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.125), ref, unit)
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.125, block_size=block)
    assert calls and calls[0][0] == torch.bfloat16
    assert out.dtype == torch.bfloat16
    err = scaled_error(out, ref, unit)
    assert err <= 2 * stick and err <= 1.5 * aten, (err, stick, aten)
    # The scores are exact bf16 products summed in float32: the lse is float32-exact.
    assert scaled_error(lse, ref_lse, 1.0) < FP32_TOL
    # The float32 output the autograd forward keeps: closer than the stick itself (measured 0.36-0.60x),
    # and unbiased: the probabilities are rounded to nearest for P @ V, not truncated. The gain of
    # out32 on the reference measured |gain - 1| <= 4.3e-5; truncating them gave 1.05e-3 to 1.86e-3
    # (and 0.70-1.10x the stick: max errors barely see a bias).
    out32, _ = _forward(q, k, v, mask, scale=0.125, block_size=block, out_dtype=torch.float32)
    assert scaled_error(out32, ref, unit) <= stick
    gain = float((out32.double() * ref).sum() / (ref * ref).sum())
    assert abs(gain - 1) < 2e-4, f"output biased by {gain - 1:+.2e}"


@kernel_bf16
@pytest.mark.parametrize("heads", ["one", "per-head"])
def test_bfloat16_output_is_the_float32_output_rounded(heads):
    # The kernel rounds a bf16 output itself (from a float32 scratch per batch-head): bit for bit
    # torch's rounding of the float32 output, through per-head views (strided heads), a dilated
    # window (rows strided by d), GQA, rows no item writes (exact zeros), and denormal outputs (which
    # VCVTNEPS2BF16 would flush to zero: flat scores, and values of random sign just above the least
    # normal number, whose averages fall below it).
    # Mutation caught: rounding by truncation; the scratch not zeroed for uncovered rows.
    masks = [am.causal & (am.sliding(40) | am.sink(3)) - am.rows(30, 50), am.dilated(16, 3),
             am.causal & am.document(60, 77, 63), am.cols(5, 9) | am.diagonal]
    mask = masks if heads == "per-head" else masks[0]
    q, k, v = seeded_qkv(2, 4, 2, 200, 200, 32, seed=21, dtype=torch.bfloat16)
    tiny = (torch.sign(v.float()) * (1.2e-38 + v.float().abs().clamp(max=1) * 1.2e-38)).bfloat16()
    for qq, vv in ((q, v), (torch.zeros_like(q), tiny)):
        with kernel_calls() as calls:
            out, lse = _forward(qq, k, vv, mask, scale=0.2, block_size=32)
        assert calls and out.dtype == torch.bfloat16
        out32, lse32 = _forward(qq, k, vv, mask, scale=0.2, block_size=32, out_dtype=torch.float32)
        assert torch.equal(out.view(torch.int16), out32.to(torch.bfloat16).view(torch.int16))
        assert torch.equal(lse, lse32)
        assert (out32[:, :, 30:50] == 0).all() if heads == "one" else (out32[:, 0, 30:50] == 0).all()
    small = out32.abs()
    assert bool(((small > 0) & (small < 1.1754944e-38)).any()), "the denormal case has denormal outputs"


@kernel_bf16
@pytest.mark.parametrize("D", [16, 32, 128, 256])
@pytest.mark.parametrize("L", [17, 65, 129])
def test_bfloat16_head_dims_and_lengths(D, L):
    # Odd key counts (the last bf16 pair of keys has one), short pieces and tiles, gathered keys,
    # GQA and rows strided as models pass them. Measured: <= 1.7x the stick.
    mask = am.causal & (am.sliding(20) | am.sink(3)) | am.cols(50, 53)
    B, H, Hkv, Lk = 1, 2, 1, L + 5
    q = seeded_randn((B, L, H, D), D + L, torch.bfloat16).transpose(1, 2)
    k = seeded_randn((B, Lk, Hkv, D), D + L + 1, torch.bfloat16).transpose(1, 2)
    v = seeded_randn((B, Lk, Hkv, D), D + L + 2, torch.bfloat16).transpose(1, 2)
    allowed = mask.to_dense(L, Lk)
    ref, ref_lse = reference(q, k, v, allowed, D ** -0.5)
    unit = output_unit(v)
    stick = scaled_error(ref.to(torch.bfloat16), ref, unit)
    with kernel_calls() as calls:
        out, lse = attention(q, k, v, mask, scale=D ** -0.5, enable_gqa=True, return_lse=True, block_size=32)
    assert calls
    err = scaled_error(out, ref, unit)
    assert err <= 2 * stick, (err, stick)
    assert scaled_error(lse, ref_lse, 1.0) < FP32_TOL


# -- random problems ------------------------------------------------------------------------------

@kernel
@given(engine_problems(long_share=0), st.sampled_from([16, 32]))
def test_random_engine_problems_match_float64(problem, D):
    # Several query blocks, windows with sinks and key columns, documents, row cuts, GQA, B = 2.
    p = problem
    mask = build(p["spec"])
    q, k, v = seeded_qkv(p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], D, p["seed"])
    allowed = mask.to_dense(p["Lq"], p["Lk"], q_offset=p["q_offset"])
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.3, q_offset=p["q_offset"], block_size=p["block"])
    assert calls or not allowed.any()
    ref, ref_lse = reference(q, k, v, allowed, 0.3)
    _check(out, lse, ref, ref_lse, v)


#: Any expression of the language at small shapes (any offset, negative too), a block size, a seed:
#: the cases of both directions' random-language properties.
_LANGUAGE_CASES = (masks(max_leaves=5), shapes(max_len=70, max_offset=40), st.sampled_from([16, (16, 32), 32]),
                   st.integers(0, 2**16))


@kernel
@given(*_LANGUAGE_CASES)
def test_random_language_masks_match_float64(mask, shape, block, seed):
    # Any expression of the language, square or not, any offset (negative too).
    Lq, Lk, q_offset = resolved(shape)
    q, k, v = seeded_qkv(1, 2, 1, Lq, Lk, 16, seed)
    allowed = mask.to_dense(Lq, Lk, q_offset=q_offset)
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.5, q_offset=shape[2], block_size=block)
    assert calls or not allowed.any()
    ref, ref_lse = reference(q, k, v, allowed, 0.5)
    _check(out, lse, ref, ref_lse, v)


# -- determinism ----------------------------------------------------------------------------------

class _Splits:
    """Stands in for the extension module, recording each job's batch-head range [z0, z1): forward
    jobs in ``ranges``, backward jobs in ``backward_ranges``."""

    def __init__(self, module):
        self.module, self.ranges, self.backward_ranges = module, [], []
        self.COLUMNS, self.supports = module.COLUMNS, module.supports

    def jobs(self, table, starts, n_chains, counter, team):
        n_jobs = (ctypes.c_int64 * (n_chains + 1)).from_address(starts)[n_chains]
        rows = list((ctypes.c_int64 * (n_jobs * self.module.JOB_COLUMNS)).from_address(table))
        for j in range(n_jobs):
            kind, _, _, z0, z1 = rows[j * self.module.JOB_COLUMNS:(j + 1) * self.module.JOB_COLUMNS]
            (self.backward_ranges if kind == 1 else self.ranges).append((z0, z1))
        return self.module.jobs(table, starts, n_chains, counter, team)


def _a_partition(ranges, n: int) -> bool:
    """Whether sorted ranges [(a, b)] cut [0, n) into consecutive pieces."""
    return [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == n


def _at_thread_counts(run, splits, field: str, counts=(1, 2, 1, 2)):
    """run() at each torch thread count in turn (the count restored after): its results, and the
    sorted z ranges the kernel calls recorded in ``splits.<field>`` during each run."""
    before = torch.get_num_threads()
    results, ranges = [], []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            setattr(splits, field, [])
            results.append(run())
            ranges.append(sorted(getattr(splits, field)))
    finally:
        torch.set_num_threads(before)
    return results, ranges


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_on_every_run_and_thread_count(dtype, monkeypatch):
    if not fused.usable(dtype, 64):
        pytest.skip(fused.status()["reason"])
    mask = am.causal & (am.sliding(150) | am.sink(4)) | am.cols(300, 310)
    q, k, v = seeded_qkv(2, 4, 2, 512, 512, 64, seed=3, dtype=dtype)
    splits = _Splits(fused._attend)
    monkeypatch.setattr(fused, "_attend", splits)
    results, ranges = _at_thread_counts(lambda: _forward(q, k, v, mask, scale=0.125), splits, "ranges")
    assert ranges[0] == [(0, 8)] and len(ranges[1]) > 1 and _a_partition(ranges[1], 8), \
        f"1 thread runs the 8 batch-heads, 2 split them: {ranges}"
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def _torch_ships_libgomp() -> bool:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and os.path.isdir(lib) \
        and any(n.startswith("libgomp") for n in os.listdir(lib))


@kernel
@pytest.mark.skipif(not _torch_ships_libgomp(), reason="torch here is not the OpenMP build with its own libgomp")
def test_the_kernel_runs_on_torchs_openmp_team(monkeypatch):
    # torch's own wheels: the jobs go to torch's OpenMP team (csrc/attend.c, "jobs"), the caller's
    # whole team as torch's own ops use it, not to threads of ours that would compete with the
    # team's spinning threads. Mutation caught: the table drained inline, not on the team.
    assert fused._OPENMP
    monkeypatch.setattr(fused, "PARALLEL_SCORES", 1)
    q, k, v = seeded_qkv(1, 4, 4, 64, 64, 16, seed=2)
    items = fused.causal_items(((0, 64),))
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:3])
    before = torch.get_num_threads()
    try:
        for threads in (2, 3, 1):
            torch.set_num_threads(threads)
            assert fused.run([[fused.forward_call(items, q, k, v, 0.25, out, lse)]]) == threads
    finally:
        torch.set_num_threads(before)
    counter = torch.zeros(1, dtype=torch.int64)
    assert fused._attend.jobs(0, 0, 0, counter.data_ptr(), True) == 0        # no chains: nothing to run


@kernel
def test_a_forked_child_runs_the_kernel(tmp_path):
    # A child made by os.fork() has torch's OpenMP runtime but not its team's threads (libgomp would
    # wait on them for ever): its kernel calls go to worker threads of its own. The parent first runs
    # parallel regions (a torch op, the kernel), as a training script before a forking DataLoader.
    # (torch's own parallel ops hang in such a child too: libgomp's limit, not ours to mend.)
    script = tmp_path / "fork.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, torch, attnmask as am
        from attnmask.engines import fused
        torch.set_num_threads(2)
        q = k = v = torch.randn(1, 4, 512, 32)
        want = am.attention(q, k, v, am.causal & am.sliding(100))
        (torch.randn(512, 512) @ torch.randn(512, 512)).sum()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            got = am.attention(q, k, v, am.causal & am.sliding(100))
            ok = not fused._OPENMP and (got.numpy() == want.numpy()).all()   # (torch.equal is a parallel op)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the child exited {r.returncode} (-14 or 14: it hung): {r.stderr[-2000:]}"


@kernel
def test_jobs_refuse_threads_without_a_runtime_and_bad_chains():
    try:
        assert not fused._attend.use_openmp("/nonexistent/libgomp.so.1")
        with pytest.raises(ValueError, match="a team needs the OpenMP runtime"):
            fused._attend.jobs(0, 0, 0, 0, True)
    finally:
        assert fused._openmp_runtime() == fused._OPENMP      # the module's choice restored
    starts, counter = torch.tensor([1, 1]), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="chains must start at job 0"):
        fused._attend.jobs(0, starts.data_ptr(), 1, counter.data_ptr(), False)
    starts = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match="chain starts must not decrease"):
        fused._attend.jobs(0, starts.data_ptr(), 2, counter.data_ptr(), False)
    starts = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="chains of jobs need a job table"):
        fused._attend.jobs(0, starts.data_ptr(), 1, counter.data_ptr(), False)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=kernel_bf16)])
def test_worker_threads_give_the_openmp_teams_bits(dtype, monkeypatch):
    # Without torch's OpenMP runtime the jobs run on worker threads sharing one counter: the same
    # bits, forward (a per-head list: many chains) and backward, as the team's (or one thread's).
    heads = [am.causal & (am.sliding(60) | am.sink(4)), am.causal, am.causal & am.document(200, 312),
             am.causal & am.sliding(16) | am.cols(30, 34)]
    q, k, v = seeded_qkv(2, 4, 2, 512, 512, 32, seed=11, dtype=dtype)   # past the one-thread clamp (threads.SMALL_WORK)
    w_out, w_lse = seeded_randn(q.shape, 12, torch.float64), seeded_randn(q.shape[:3], 13, torch.float64)
    monkeypatch.setattr(fused, "PARALLEL_SCORES", 1)              # every call on both threads
    import attnmask.engines.fused as fm
    tasks, run_tasks = [], fm.run_tasks
    monkeypatch.setattr(fm, "run_tasks", lambda ts, costs: tasks.append(len(ts)) or run_tasks(ts, costs))
    before = torch.get_num_threads()
    results = []
    try:
        for threads, team in ((1, fused._OPENMP), (2, fused._OPENMP), (2, False)):
            torch.set_num_threads(threads)
            monkeypatch.setattr(fused, "_OPENMP", team)
            tasks.clear()
            fwd = _forward(q, k, v, heads, scale=0.2)
            results.append((fwd, _kernel_grads(q, k, v, heads, w_out, w_lse, scale=0.2)[0]))
            assert bool(tasks) == (threads == 2 and not team), f"worker threads used: {tasks}"
    finally:
        torch.set_num_threads(before)
    for (fwd, grads) in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(fwd, results[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


@kernel
def test_per_head_list_gives_each_heads_bits_alone():
    # A batch-head's bits depend only on its own plan and inputs: not on the heads beside it, on a
    # run of heads sharing a kv head (k, v broadcast with stride 0), or on the batch-heads' split.
    # Mutation caught: the kernel refused for stride-0 k / v (the run of heads fell back to ATen).
    w7, docs = am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal
    heads = [am.causal, am.causal, w7, w7, docs, am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3),
             am.causal & (am.sliding(40) | am.sink(3))]
    q, k, v = seeded_qkv(2, 8, 2, 100, 100, 32, seed=8)
    with kernel_calls() as calls:
        out, lse = attention(q, k, v, heads, scale=0.2, enable_gqa=True, return_lse=True, block_size=32)
    assert calls
    for h, m in enumerate(heads):
        j = h // 4
        o1, l1 = _forward(q[:, h:h + 1], k[:, j:j + 1], v[:, j:j + 1], m, scale=0.2, block_size=32)
        assert torch.equal(out[:, h:h + 1], o1) and torch.equal(lse[:, h:h + 1], l1), f"head {h}: {m}"


# -- the kernel is what runs ------------------------------------------------------------------------

@kernel
def test_the_engine_runs_the_kernel_unless_disabled(monkeypatch):
    q, k, v = seeded_qkv(1, 2, 2, 100, 100, 32, seed=1)
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))", "dilated(8, 2)"):
        with kernel_calls() as calls:
            _forward(q, k, v, am.parse(expr), scale=0.2)
        assert calls, expr
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    assert not fused.usable(torch.float32, 32)
    s = fused.status()
    assert not s["enabled"] and not s["float32"] and "ATTNMASK_KERNEL=0" in s["reason"]
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))"):
        mask = am.parse(expr)
        with kernel_calls() as calls:
            out, lse = _forward(q, k, v, mask, scale=0.2)
        assert not calls, expr
        ref, ref_lse = reference(q, k, v, mask.to_dense(100), 0.2)
        _check(out, lse, ref, ref_lse, v)


@kernel
@pytest.mark.parametrize("heads", ["one", "per-head"])
def test_float16_runs_the_float32_kernel_on_upcast_copies(heads, monkeypatch):
    # No CPU path computes in fp16 here: the forward runs the float32 kernel on exact upcast copies
    # and rounds its output once, so the error is the fp16 rounding of the float32-exact result
    # (ATen's fp16 flash path, the route before, took 5x the float32 kernel's time at 8K).
    masks = [am.causal & (am.sliding(30) | am.sink(2)) - am.rows(10, 20), am.causal & am.document(50, 70)]
    mask = masks if heads == "per-head" else masks[0]
    q, k, v = seeded_qkv(1, 2, 2, 120, 120, 32, seed=31, dtype=torch.float16)
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.2, block_size=32)
    assert calls and all(c == (torch.float32, 32) for c in calls), calls
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    ref, ref_lse = reference(q, k, v, _allowed(mask, 120, 120, None), 0.2)
    unit = output_unit(v)
    assert scaled_error(out, ref, unit) <= scaled_error(ref.to(torch.float16), ref, unit) + FP32_TOL
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live) and scaled_error(lse[live], ref_lse[live], 1.0) < FP32_TOL
    assert (out[..., 10:20, :] == 0).all() if heads == "one" else (out[:, 0, 10:20] == 0).all()
    out32, _ = _forward(q, k, v, mask, scale=0.2, block_size=32, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and torch.equal(out32.to(torch.float16), out)
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    with kernel_calls() as calls:
        _forward(q, k, v, mask, scale=0.2, block_size=32)
    assert not calls


@kernel
def test_float16_gradients_run_the_float32_kernel():
    # fp16 with gradients: the float32 kernel forward and backward on upcast copies; the gradients
    # are the float32-exact ones rounded to fp16 (within the stick, the float64 gradients rounded).
    mask = am.causal & (am.sliding(30) | am.sink(2))
    q, k, v = seeded_qkv(1, 4, 2, 96, 96, 32, seed=41, dtype=torch.float16)
    w_out, w_lse = seeded_randn(q.shape, 42, torch.float64), seeded_randn(q.shape[:3], 43, torch.float64)
    with kernel_calls() as fwd:
        got, bwd = _kernel_grads(q, k, v, mask, w_out, w_lse, scale=0.2)
    assert fwd and all(c[0] == torch.float32 for c in fwd) and bwd and all(c[4] == torch.float32 for c in bwd)
    want = _reference_grads(q, k, v, mask.to_dense(96), w_out, w_lse, 0.2)
    for name, a, r, unit in zip(("dq", "dk", "dv"), got, want, gradient_units(q, k, v, w_out, 0.2, dlse=w_lse)):
        assert a.dtype == torch.float16, name
        assert scaled_error(a, r, unit) <= scaled_error(r.to(torch.float16), r, unit) + FP32_TOL, name


@kernel
def test_head_dims_and_dtypes_the_kernel_does_not_take():
    for dtype, D in ((torch.float32, 8), (torch.float32, 24), (torch.float32, 272), (torch.float16, 24),
                     (torch.float64, 32)):
        assert not fused.usable(dtype, D)
        q, k, v = seeded_qkv(1, 1, 1, 40, 40, D, seed=D, dtype=dtype)
        with kernel_calls() as calls:
            _forward(q, k, v, am.causal & am.sliding(9), scale=0.3, block_size=16)
        assert not calls, (dtype, D)


def test_status_says_why_not(monkeypatch):
    monkeypatch.delenv("ATTNMASK_KERNEL", raising=False)
    monkeypatch.setattr(fused, "_attend", None)
    monkeypatch.setattr(fused, "_IMPORT_ERROR", "No module named 'attnmask.engines._attend'")
    s = fused.status()
    assert not s["built"] and not s["float32"] and not s["bfloat16"]
    assert "not built" in s["reason"] and "pip install -e ." in s["reason"]
    assert not fused.usable(torch.float32, 64)

    class NoAvx512:
        COLUMNS = 9

        @staticmethod
        def supports(bf16):
            return False
    monkeypatch.setattr(fused, "_attend", NoAvx512)
    s = fused.status()
    assert s["built"] and not s["float32"] and "no AVX-512" in s["reason"]

    class NoBf16(NoAvx512):
        @staticmethod
        def supports(bf16):
            return not bf16
    monkeypatch.setattr(fused, "_attend", NoBf16)
    s = fused.status()
    assert s["float32"] and not s["bfloat16"] and "AVX512-BF16" in s["reason"]
    assert fused.usable(torch.float32, 64) and not fused.usable(torch.bfloat16, 64)


@kernel
def test_the_extension_refuses_bad_head_dims():
    q, k, v = seeded_qkv(1, 1, 1, 32, 32, 24, seed=0)
    out, lse = torch.zeros(q.shape), torch.full(q.shape[:3], float("-inf"))
    items = fused.causal_items(((0, 32),))
    with pytest.raises(ValueError, match="head dim must be a multiple of 16 up to 256, got 24"):
        fused.run_items(items, q, k, v, 0.2, out, lse)
    assert torch.equal(out, torch.zeros(q.shape)), "nothing may be written before the refusal"
    # The extension checks every job before it runs any (the table is the C side's only input).
    for D in (0, 8, 40, 272):
        with pytest.raises(ValueError, match=f"head dim must be a multiple of 16 up to 256, got {D}"):
            _raw_jobs(Y=1, D=D)
    with pytest.raises(ValueError, match="Y must be >= 1"):
        _raw_jobs(Y=0, D=16)
    with pytest.raises(ValueError, match="job kind must be 0"):
        _raw_jobs(Y=1, D=16, kind=2)
    with pytest.raises(ValueError, match="whole x ranges"):
        _raw_jobs(Y=2, D=16, kind=1, z=(0, 1))


def _raw_jobs(Y, D, kind=0, z=(0, 0)):
    """One job of ``kind`` with zero pointers through the extension's own entry point."""
    n = fused._attend.FORWARD_PARAMS if kind != 1 else fused._attend.BACKWARD_PARAMS
    params = torch.zeros(n, dtype=torch.int64)
    params[20 if kind != 1 else 36], params[21 if kind != 1 else 37] = Y, D
    table = torch.tensor([[kind, params.data_ptr(), 0, *z]], dtype=torch.int64)
    starts, counter = torch.tensor([0, 1]), torch.zeros(1, dtype=torch.int64)
    fused._attend.jobs(table.data_ptr(), starts.data_ptr(), 1, counter.data_ptr(), False)


# -- the backward through the public attention (kernel forward and backward) -----------------------

@kernel
@pytest.mark.parametrize("expr,L,block", [
    ("causal", 150, 64),
    ("causal & (sliding(40) | sink(3)) | cols(100, 105)", 200, 32),
    ("(causal & document(60, 70, 50)) - rows(20, 40)", 180, 32),
])
def test_float32_gradients_match_float64(expr, L, block):
    mask = am.parse(expr)
    B, H, Hkv, D = 1, 4, 2, 32
    q, k, v = seeded_qkv(B, H, Hkv, L, L, D, seed=L)
    w_out, w_lse = seeded_randn((B, H, L, D), 7, torch.float64), seeded_randn((B, H, L), 8, torch.float64)
    allowed = mask.to_dense(L)
    scale = D ** -0.5

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out, lse = fn(*leaves)
        loss = (out.double() * w_out).sum() + (lse.double().masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum()
        return torch.autograd.grad(loss, leaves)
    with kernel_calls() as calls:
        got = grads(lambda *t: attention(*t, mask, scale=scale, enable_gqa=True, return_lse=True,
                                         block_size=block), q, k, v)
    assert calls, "the forward must run the kernel"
    with one_thread():
        want = grads(lambda *t: reference(*t, allowed, scale), q.double(), k.double(), v.double())
    for name, a, r, unit in zip(("dq", "dk", "dv"), got, want, gradient_units(q, k, v, w_out, scale, dlse=w_lse)):
        assert a.dtype == torch.float32 and not torch.isnan(a).any(), name
        err = scaled_error(a, r, unit)
        assert err < FP32_TOL, f"{name}: error {err:.2e}"


# -- the kernel's own backward (float32 and bfloat16) -------------------------------------------
#
# The autograd runs the kernel's backward (fused.backward_call) wherever the kernel runs the forward:
# float32, and bfloat16 inputs as they are (fp16 is upcast to float32). Each test first confirms it ran.
#
# bf16: the kernel follows FlashAttention's bf16 recipe (P and dS rounded to bf16 for the three
# gradient products, fp32 sums), so it is held as the bf16 forward is: against the same-dtype dense
# reference, ATen's bf16 SDPA backward on the dense mask (at most 1.5x its error; measured <= 1.3x
# over BACKWARD_SPREAD), and against the stick, the float64 gradients of the bf16 inputs rounded to
# bf16 (at most 4x; measured 1.0-3.4x, where ATen's bf16 backward is 1.0-4.6x on the same problems).
# The ATen path (ATTNMASK_KERNEL=0, which upcasts to float32) keeps its 3x-stick standard in
# tests/test_backward.py.
BF16_STICKS, BF16_ATEN = 4.0, 1.5

@contextlib.contextmanager
def backward_calls():
    """The autograd's kernel backward calls (fused.backward_call) meanwhile, as (items, q's shape, the
    call, dk's address, q's dtype); they still run."""
    seen, make = [], fused.backward_call

    def counted(items, q, k, v, out, dout, lse, dlse, dq, dk, *args):
        call = make(items, q, k, v, out, dout, lse, dlse, dq, dk, *args)
        seen.append((items, tuple(q.shape), call, dk.data_ptr(), q.dtype))
        return call
    fused.backward_call = counted
    try:
        yield seen
    finally:
        fused.backward_call = make


def _layouts(mask, H, Lq, Lk, q_offset, block):
    heads = mask if isinstance(mask, list) else [mask]
    layouts = [m.compile(Lq, Lk, q_offset=q_offset, block_size=block) for m in heads]
    return layouts, (torch.arange(H) if isinstance(mask, list) else torch.zeros(H, dtype=torch.int64))


def _loss(out, lse, w_out, w_lse):
    loss = (lse.double().masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum()
    return loss if w_out is None else loss + (out.double() * w_out).sum()


def _kernel_grads(q, k, v, mask, w_out, w_lse, *, scale, q_offset=None, block=32):
    """dq, dk, dv of the block-sparse autograd (no dispatch) and its kernel backward calls."""
    B, H, Lq, _ = q.shape
    layouts, hl = _layouts(mask, H, Lq, k.shape[2], q_offset, block)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with backward_calls() as calls:
        out, lse = blocksparse_attention_with_grad(*leaves, layouts, hl.expand(B, H), scale)
        got = torch.autograd.grad(_loss(out, lse, w_out, w_lse), leaves, allow_unused=True, materialize_grads=True)
    return got, calls


def _reference_grads(q, k, v, allowed, w_out, w_lse, scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with one_thread():
        out, lse = reference(*leaves, allowed, scale)
        return torch.autograd.grad(_loss(out, lse, w_out, w_lse), leaves, allow_unused=True, materialize_grads=True)


def _check_backward(q, k, v, mask, *, scale=None, q_offset=None, block=32, w_out="dense", w_lse=None, seed=0,
                    tol=FP32_TOL):
    """The kernel backward ran (on q's dtype), and its dq, dk, dv are within ``tol`` of float64 autograd
    (scaled; bf16: see BF16_STICKS); rows with no key get dq exactly 0, keys no row sees dk = dv exactly
    0. ``w_out`` (a kind of _out_weights, a tensor or None) and ``w_lse`` (drawn from ``seed`` when
    None; bf16: 0 unless given, to compare with ATen's SDPA, which has no lse gradient) weigh the loss."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    g = torch.Generator().manual_seed(seed)
    if isinstance(w_out, str):
        w_out = _out_weights(w_out, q.shape, g)
    bf16 = q.dtype == torch.bfloat16
    if w_lse is None:
        w_lse = torch.randn((B, H, Lq), generator=g, dtype=torch.float64)
        if bf16:
            w_lse = torch.zeros_like(w_lse)
    got, calls = _kernel_grads(q, k, v, mask, w_out, w_lse, scale=scale, q_offset=q_offset, block=block)
    assert calls, "the kernel backward was not called"
    assert all(c[4] == q.dtype for c in calls), f"the kernel backward ran on {calls[0][4]}, not {q.dtype}"
    allowed = _allowed(mask, Lq, Lk, q_offset).expand(B, H, Lq, Lk)
    want = _reference_grads(q, k, v, allowed, w_out, w_lse, scale)
    zero = torch.zeros(q.shape, dtype=torch.float64)
    units = gradient_units(q, k, v, zero if w_out is None else w_out, scale, dlse=w_lse)
    aten = _aten_bf16_grads(q, k, v, allowed, w_out, scale) if bf16 and not w_lse.any() else (None,) * 3
    for name, a, r, unit, b in zip(("dq", "dk", "dv"), got, want, units, aten):
        assert a.dtype == q.dtype and a.shape == r.shape and torch.isfinite(a).all(), name
        if name == "dv" and w_out is None:
            continue                   # no dout: dv must be exactly 0 (below)
        err = scaled_error(a, r, unit)
        if bf16:
            stick = scaled_error(r.to(torch.bfloat16), r, unit)
            assert err <= BF16_STICKS * stick, f"{name}: error {err:.2e} > {BF16_STICKS} x stick {stick:.2e}"
            if b is not None:
                err_aten = scaled_error(b, r, unit)
                assert err <= BF16_ATEN * err_aten, f"{name}: error {err:.2e} > {BF16_ATEN} x ATen's bf16 {err_aten:.2e}"
        else:
            assert err < tol, f"{name}: error {err:.2e}"
    dq, dk, dv = got
    empty = ~allowed.any(-1)
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty])), "rows with no key must get dq = 0"
    rep = H // k.shape[1]
    unseen = ~allowed.reshape(B, k.shape[1], rep * Lq, Lk).any(2)                     # [B, Hkv, Lk]
    assert torch.equal(dk[unseen], torch.zeros_like(dk[unseen])) and torch.equal(dv[unseen], torch.zeros_like(dv[unseen]))
    if w_out is None:
        assert torch.equal(dv, torch.zeros_like(dv)), "dv without a dout must be exactly 0"
    return got, calls


def _aten_bf16_grads(q, k, v, allowed, w_out, scale):
    """dq, dk, dv of ATen's bf16 SDPA on the dense mask for the loss sum(out * w_out) (rows with no key
    give NaN there: they are left out of the loss)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rep = q.shape[1] // k.shape[1]
    with one_thread():
        out = F.scaled_dot_product_attention(leaves[0], *(t.repeat_interleave(rep, 1) for t in leaves[1:]),
                                             attn_mask=allowed, scale=scale)
        if w_out is None:
            return [torch.zeros_like(t) for t in leaves]
        rows = allowed.any(-1, keepdim=True)
        grads = torch.autograd.grad((out.double().nan_to_num(0.0) * w_out * rows).sum(), leaves)
    return [g.nan_to_num(0.0) for g in grads]


BACKWARD_SPREAD = [
    # (expression, Lq, Lk, q_offset, block): the forward's spread, each item path of the backward
    ("causal", 150, None, None, 64),                                     # one causal item
    ("causal & sliding(5)", 200, None, None, 32),                        # narrow window
    ("causal & sliding(200)", 300, None, None, 64),                      # wide window, off the 16 grid
    ("sliding(37)", 173, None, None, 32),                                # two-sided, odd
    ("band(21, 9)", 150, None, None, (16, 32)),
    ("causal & (sliding(40) | sink(4))", 200, None, None, 64),           # gathered keys in front
    ("causal & (sliding(24) | sink(70))", 200, None, None, 32),          # gathered keys past one piece
    ("(causal & sliding(30)) | cols(100, 117)", 250, None, None, 32),
    ("(causal & sliding(30)) | cols(3, 200, 7)", 250, None, None, 64),   # a strided key set
    ("cols(0, 40, 3) | cols(150, 151)", 130, 190, None, 32),             # key sets only
    ("causal & document(70, 130, 100)", 300, None, None, 64),            # causal items per segment
    ("causal & document(17, 5, 60)", 113, None, None, 16),               # past the documents: no key
    ("document(40, 90, 50)", 180, None, None, 32),                       # documents as a plan
    ("(causal & document(60, 70, 50)) | sink(2)", 180, None, None, 32),  # documents as a plan, causal
    ("prefix_lm(50)", 211, None, None, 64),
    ("chunked(48)", 200, None, None, 32),
    ("causal & chunked(37)", 200, None, None, 64),
    ("dilated(20, 3)", 250, None, None, 32),                             # strided views, lse strided too
    ("causal & dilated(9, 4)", 161, None, None, 16),
    ("causal - (rows(36, 64, 8) - diagonal)", 120, None, None, 16),      # the signature
    ("full", 100, 257, 30, 64),
    ("full", 33, 17, None, 16),
    ("causal", 100, 257, None, 64),                                      # a bottom-right causal chunk
    ("causal & sliding(50)", 70, 200, 90, 32),
    ("causal - rows(40, 70)", 150, None, None, 32),                      # dead rows inside live groups
    ("(causal & (sliding(8) | sink(2))) - rows(20, 100, 3)", 130, None, None, 16),
]


@kernel
@pytest.mark.parametrize("expr,Lq,Lk,q_offset,block", BACKWARD_SPREAD)
def test_backward_masks_match_float64(expr, Lq, Lk, q_offset, block):
    Lk = Lq if Lk is None else Lk
    q, k, v = seeded_qkv(2, 2, 2, Lq, Lk, 32, seed=Lq + Lk)
    _check_backward(q, k, v, am.parse(expr), scale=0.2, q_offset=q_offset, block=block, seed=Lq)


@kernel_bf16
@pytest.mark.parametrize("expr,Lq,Lk,q_offset,block", BACKWARD_SPREAD)
def test_backward_bfloat16_masks_within_the_stick(expr, Lq, Lk, q_offset, block):
    # The bf16 backward (P and dS rounded to bf16 for the gradient products) over every item path.
    Lk = Lq if Lk is None else Lk
    q, k, v = seeded_qkv(2, 2, 2, Lq, Lk, 32, seed=Lq + Lk, dtype=torch.bfloat16)
    _check_backward(q, k, v, am.parse(expr), scale=0.2, q_offset=q_offset, block=block, seed=Lq)


@kernel_bf16
@pytest.mark.parametrize("D", [16, 64, 256])
def test_backward_bfloat16_head_dims_gqa_and_per_head_lists(D):
    q, k, v = seeded_qkv(2, 6, 2, 131, 131, D, seed=D, dtype=torch.bfloat16)
    _check_backward(q, k, v, am.causal & (am.sliding(45) | am.sink(3)) | am.cols(90, 99), block=32, seed=D)
    heads = [am.causal, am.causal & am.sliding(7), am.document(30, 40, 61) & am.causal,
             am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3), am.prefix_lm(19)]
    _check_backward(q, k, v, heads, block=32, seed=D + 1)


def _item_kinds(calls):
    """Per call: 'causal' when every item is a maskless top-left causal one, else 'plan'."""
    kinds = []
    for items, *_ in calls:
        t = items.table
        kinds.append("causal" if bool(((t[:, 4] == -1) & (t[:, 5] & 1 == 1)).all()) else "plan")
    return kinds


@kernel
def test_backward_runs_both_item_paths_and_none_has_no_gradient():
    q, k, v = seeded_qkv(1, 2, 2, 180, 180, 16, seed=4)
    _, calls = _check_backward(q, k, v, am.causal & am.document(60, 70, 50))
    assert _item_kinds(calls) == ["causal"] and calls[0][0].table.shape[0] == 3, "one causal item per document"
    _, calls = _check_backward(q, k, v, am.document(60, 70, 50))
    assert _item_kinds(calls) == ["plan"]
    _, calls = _check_backward(q, k, v, am.causal & am.dilated(9, 3))
    assert len(calls) == 3, "dilated: one window problem per residue class (strided views)"
    got, _ = _kernel_grads(q, k, v, am.none, seeded_randn(q.shape, 1, torch.float64), seeded_randn(q.shape[:3], 2, torch.float64),
                           scale=0.25)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)


@kernel
@pytest.mark.parametrize("D", [16, 48, 64, 128, 256])
def test_backward_head_dims(D):
    q, k, v = seeded_qkv(1, 2, 1, 131, 131, D, seed=D)
    for expr in ("causal", "causal & (sliding(45) | sink(3)) | cols(90, 99)"):
        _check_backward(q, k, v, am.parse(expr), block=32, seed=D)


@kernel
@pytest.mark.parametrize("L", [1, 15, 17, 63, 65, 129])
def test_backward_lengths_off_the_kernel_grid(L):
    for expr in ("causal", "causal & (sliding(20) | sink(1))", "full"):
        q, k, v = seeded_qkv(1, 1, 1, L, L + 3, 16, seed=L)
        _check_backward(q, k, v, am.parse(expr), block=16, seed=L)


@kernel
def test_backward_batches_gqa_and_per_head_lists():
    # dk / dv of a key head summed over the query heads sharing it (views with stride-0 keys, or runs
    # of per-head layouts), B > 1.
    q, k, v = seeded_qkv(2, 6, 2, 100, 100, 32, seed=5)
    _check_backward(q, k, v, am.causal & (am.sliding(33) | am.sink(4)), block=32)
    _check_backward(q, k, v, am.document(30, 40, 30), block=16)
    heads = [am.causal, am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal,
             am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3), am.prefix_lm(19)]
    _check_backward(q, k, v, heads, block=32)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=kernel_bf16)])
def test_backward_non_contiguous_inputs_as_models_pass_them(dtype):
    # [B, L, H, D] tensors transposed: keys read in place at a row stride of Hkv * D.
    B, L, H, Hkv, D = 2, 150, 4, 2, 32
    for expr in ("causal & (sliding(30) | sink(5))", "causal & document(40, 60, 50)", "dilated(10, 2)"):
        mask = am.parse(expr)
        leaves = [seeded_randn((B, L, h, D), i, dtype).requires_grad_() for i, h in ((1, H), (2, Hkv), (3, Hkv))]
        w = seeded_randn((B, H, L, D), 4, torch.float64)
        with backward_calls() as calls:
            out = attention(*(t.transpose(1, 2) for t in leaves), mask, scale=0.2, enable_gqa=True,
                            backend="blocksparse", block_size=32)
            got = torch.autograd.grad((out.double() * w).sum(), leaves)
        assert calls and all(c[4] == dtype for c in calls), expr
        want = _reference_grads(*(t.transpose(1, 2) for t in leaves), mask.to_dense(L), w, torch.zeros(B, H, L), 0.2)
        units = gradient_units(*(t.transpose(1, 2) for t in leaves), w, 0.2)
        for name, a, r, unit in zip(("dq", "dk", "dv"), got, want, units):
            r = r.transpose(1, 2)
            err = scaled_error(a, r, unit)
            tol = BF16_STICKS * scaled_error(r.to(dtype), r, unit) if dtype == torch.bfloat16 else FP32_TOL
            assert err <= tol, f"{expr} {name}: error {err:.2e} > {tol:.2e}"


@kernel
@pytest.mark.parametrize("dout_kind", ["dense", "lse-only", "zero-rows", "tiny-rows"])
def test_backward_lse_gradient(dout_kind):
    # A loss on lse goes to the kernel as dlse, which forms delta = rowsum(dO * O) - dlse itself: one
    # pass for every dout (rows whose dout is 0 or subnormal too), exact against float64; the dlse it
    # is given is exactly the loss's (0 on rows with no key, whose lse is constant).
    B, H, Lq = 2, 4, 70
    q, k, v = seeded_qkv(B, H, 2, Lq, 100, 32, seed=6)
    mask = am.causal & (am.sliding(30) | am.sink(2)) - am.rows(40, 46)
    g = torch.Generator().manual_seed(7)
    w_out = _out_weights(dout_kind, q.shape, g)
    w_lse = torch.randn((B, H, Lq), generator=g, dtype=torch.float64)
    given, make = [], fused.backward_call

    def recorded(items, q_, k_, v_, out, dout, lse, dlse, *args):
        given.append(dlse.reshape(B, H, Lq).clone())
        return make(items, q_, k_, v_, out, dout, lse, dlse, *args)
    fused.backward_call = recorded
    try:
        _, calls = _check_backward(q, k, v, mask, q_offset=30, block=16, w_out=w_out, w_lse=w_lse)
    finally:
        fused.backward_call = make
    assert len(calls) == len(given) == 1, len(calls)
    zero = torch.ones(B, H, Lq, dtype=torch.bool) if w_out is None else (w_out == 0).all(-1)
    assert zero.any() == (dout_kind in ("lse-only", "zero-rows"))
    empty = ~_allowed(mask, Lq, 100, 30).any(-1).expand(B, H, Lq)
    assert torch.equal(given[0], torch.where(empty, 0.0, w_lse.float()))


@kernel
def test_backward_bfloat16_within_the_dtypes_stick():
    # bf16 inputs run the kernel's bf16 backward, with an lse gradient too (which ATen's SDPA cannot
    # take): within BF16_STICKS x the stick (measured 1.3, 1.7 and 2.0x for dq, dk, dv).
    expr = "(causal & document(100, 200, 300)) | sink(8) | cols(400, 420)"
    mask, L, D = am.parse(expr), 600, 32
    q, k, v = seeded_qkv(1, 2, 2, L, L, D, seed=5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    got, calls = _kernel_grads(q, k, v, mask, w_out, w_lse, scale=D ** -0.5, block=16)
    assert calls and all(c[4] == torch.bfloat16 for c in calls)
    want = _reference_grads(q, k, v, mask.to_dense(L), w_out, w_lse, D ** -0.5)
    for name, a, r, unit in zip(("dq", "dk", "dv"), got, want, gradient_units(q, k, v, w_out, D ** -0.5, dlse=w_lse)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        stick, err = scaled_error(r.to(torch.bfloat16), r, unit), scaled_error(a, r, unit)
        assert err <= BF16_STICKS * stick, f"{name}: error {err:.2e} > {BF16_STICKS} x stick {stick:.2e}"


@kernel
@given(engine_problems(long_share=0), st.sampled_from(["dense", "zero-rows"]))
def test_backward_random_engine_problems_match_float64(problem, dout_kind):
    # Windows with sinks and key columns, documents, row cuts, GQA, B = 2, offsets; a loss on lse too.
    p = problem
    q, k, v = seeded_qkv(p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], 16, p["seed"])
    mask = build(p["spec"])
    if not mask.to_dense(p["Lq"], p["Lk"], q_offset=p["q_offset"]).any():
        return                           # nothing to attend: no kernel call to check
    _check_backward(q, k, v, mask, scale=0.3, q_offset=p["q_offset"], block=p["block"], w_out=dout_kind,
                    seed=p["seed"])


@kernel
@given(*_LANGUAGE_CASES)
def test_backward_random_language_masks_match_float64(mask, shape, block, seed):
    # Any expression of the language, square or not, any offset (negative too); 2 query heads on a key head.
    Lq, Lk, q_offset = resolved(shape)
    q, k, v = seeded_qkv(1, 2, 1, Lq, Lk, 16, seed)
    if not mask.to_dense(Lq, Lk, q_offset=q_offset).any():
        return
    _check_backward(q, k, v, mask, scale=0.5, q_offset=shape[2], block=block, seed=seed)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=kernel_bf16)])
def test_backward_same_bits_on_every_run_and_thread_count(monkeypatch, dtype):
    # 3 key heads shared by 2 query heads each: z ranges must not split a key head's query heads,
    # whose dk / dv are summed by one thread in a fixed order.
    mask = am.causal & (am.sliding(150) | am.sink(4)) | am.cols(300, 310)
    q, k, v = seeded_qkv(1, 6, 3, 512, 512, 32, seed=3, dtype=dtype)
    w_out, w_lse = seeded_randn(q.shape, 4, torch.float64), seeded_randn(q.shape[:3], 5, torch.float64)
    splits = _Splits(fused._attend)
    monkeypatch.setattr(fused, "_attend", splits)
    results, ranges = _at_thread_counts(lambda: _kernel_grads(q, k, v, mask, w_out, w_lse, scale=0.125)[0],
                                        splits, "backward_ranges")
    assert ranges[0] == [(0, 6)] and len(ranges[1]) > 1 and _a_partition(ranges[1], 6), \
        f"1 thread runs the 6 batch-heads, 2 split them: {ranges}"
    assert all(a % 2 == 0 and b % 2 == 0 for a, b in ranges[1]), f"a key head's query heads split: {ranges[1]}"
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@kernel
def test_backward_per_head_runs_same_bits_and_key_heads_whole_per_thread(monkeypatch):
    # Per-head layouts: the runs of heads of one key head (three here, each adding into its dk / dv)
    # are one chain of fused.run (one thread, in order); the chains of different key heads run side
    # by side. The same bits at 1 and 2 threads.
    chains, run = [], fused.run
    monkeypatch.setattr(fused, "run", lambda cs: chains.append([list(chain) for chain in cs]) or run(cs))
    w1, w2 = am.causal & (am.sliding(150) | am.sink(4)), am.causal & am.document(200, 312)
    heads = [w1, w2, w2, w1, w1, w2]
    q, k, v = seeded_qkv(1, 6, 2, 512, 512, 32, seed=4)
    w_out, w_lse = seeded_randn(q.shape, 5, torch.float64), seeded_randn(q.shape[:3], 6, torch.float64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            chains.clear()
            got, calls = _kernel_grads(q, k, v, heads, w_out, w_lse, scale=0.125)
            results.append(got)
            dk_of = {id(c[2]): c[3] for c in calls}         # (the calls stay alive in `chains`)
            backward = [ch for ch in chains if any(c.kind == 1 for chain in ch for c in chain)]
            assert len(backward) == 1, f"one run of the backward's calls: {chains}"
            keys = [{dk_of[id(c)] for c in chain} for chain in backward[0]]
            assert sorted(map(len, backward[0])) == [3, 3] and all(len(d) == 1 for d in keys) \
                and keys[0] != keys[1], f"a chain per key head, holding its three heads' runs: {keys}"
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@kernel
def test_backward_per_head_one_key_head_chains_per_batch_element(monkeypatch):
    # MQA (one key head) with per-head masks over a batch of 3: the calls of each batch element are
    # a chain of their own (their dk / dv rows are disjoint), so the key head is not one thread's
    # alone; every call of a chain writes one element's dk. The same bits at 1 and 2 threads.
    chains, run = [], fused.run
    monkeypatch.setattr(fused, "run", lambda cs: chains.append([list(chain) for chain in cs]) or run(cs))
    heads = [am.causal & (am.sliding(50) | am.sink(2)), am.causal, am.causal & am.document(100, 156), am.causal]
    q, k, v = seeded_qkv(3, 4, 1, 256, 256, 32, seed=9)
    w_out, w_lse = seeded_randn(q.shape, 10, torch.float64), seeded_randn(q.shape[:3], 11, torch.float64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            chains.clear()
            got, calls = _kernel_grads(q, k, v, heads, w_out, w_lse, scale=0.2)
            results.append(got)
            dk_of = {id(c[2]): c[3] for c in calls}
            backward = [ch for ch in chains if any(c.kind == 1 for chain in ch for c in chain)]
            assert len(backward) == 1 and len(backward[0]) == 3, f"a chain per batch element: {backward}"
            keys = [{dk_of[id(c)] for c in chain} for chain in backward[0]]
            assert all(len(d) == 1 for d in keys) and len(set.union(*keys)) == 3, keys
            assert sorted(map(len, backward[0])) == [4, 4, 4], "each element's four per-head runs, in one chain"
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@kernel
def test_backward_runs_the_kernel_unless_disabled(monkeypatch):
    q, k, v = seeded_qkv(1, 2, 2, 100, 100, 32, seed=1)
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))", "dilated(8, 2)"):
        _check_backward(q, k, v, am.parse(expr))
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    assert not fused.usable_backward(torch.float32, 32)
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))", "dilated(8, 2)"):
        mask = am.parse(expr)
        w_out, w_lse = seeded_randn(q.shape, 2, torch.float64), seeded_randn(q.shape[:3], 3, torch.float64)
        got, calls = _kernel_grads(q, k, v, mask, w_out, w_lse, scale=0.2)
        assert not calls, expr
        want = _reference_grads(q, k, v, mask.to_dense(100), w_out, w_lse, 0.2)
        for a, r, unit in zip(got, want, gradient_units(q, k, v, w_out, 0.2, dlse=w_lse)):
            assert scaled_error(a, r, unit) < FP32_TOL, expr


# -- the build ------------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_the_install_built_the_kernel():
    """The README's install (``pip install -e .``, CI's .ci/run) builds the kernel: a broken build is red here."""
    s = fused.status()
    assert s["built"], s["reason"]
    flags = _cpu_flags()
    if s["enabled"] and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert s["float32"] and fused.usable(torch.float32, 64), s["reason"]
        if "avx512_bf16" in flags:
            assert s["bfloat16"] and fused.usable(torch.bfloat16, 64), s["reason"]
