"""``attention``: validate inputs, resolve the mask per (batch, head), pick a backend, run it.

The mask argument is normalised to a grid of BlockLayouts (one per distinct
mask) plus an int64 ``[B, H]`` index, the form every backend consumes. Each
backend states, for a given call, the reasons it cannot run it; ``"auto"``
takes the first backend with no reasons, and an explicit backend that has
reasons raises them (xformers-style), never falling back silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ..errors import MaskError, MaskValueError
from ..layout import BlockLayout
from ..masks import Mask, resolve_shape
from .short import SHORT_ROWS, fits as short_fits, short_forward

__all__ = ["attention", "per_batch", "PerBatch", "BACKENDS", "DEFAULT_BLOCK_SIZE"]

BACKENDS = ("auto", "blocksparse", "dense", "flex")
DEFAULT_BLOCK_SIZE = 128

MaskLike = Union[Mask, BlockLayout]


@dataclass(frozen=True)
class PerBatch:
    """Masks that differ per batch element (e.g. packed sequences with their own documents).

    ``items[b]`` is a Mask, a BlockLayout, or a tuple with one of those per
    query head. Create it with :func:`per_batch`.
    """
    items: tuple

    def __len__(self) -> int:
        return len(self.items)


def per_batch(masks: Sequence) -> PerBatch:
    """Wrap one mask (or one per-head list of masks) per batch element for :func:`attention`.

    A plain list passed to ``attention`` means one mask per *head*; this wrapper
    is the explicit way to say one per *batch element*.

        >>> import torch, attnmask as am
        >>> q = torch.randn(2, 1, 8, 4)
        >>> pb = per_batch([am.document(5, 3) & am.causal, am.document(2, 6) & am.causal])
        >>> am.attention(q, q, q, pb).shape
        torch.Size([2, 1, 8, 4])
    """
    if isinstance(masks, (Mask, BlockLayout, PerBatch)) or not isinstance(masks, Sequence) or isinstance(masks, str):
        raise MaskValueError(f"per_batch needs a list with one mask (or one per-head list) per batch element, "
                             f"got {type(masks).__name__}")
    items = []
    for b, item in enumerate(masks):
        if isinstance(item, (Mask, BlockLayout)):
            items.append(item)
        elif isinstance(item, (list, tuple)) and item and all(isinstance(m, (Mask, BlockLayout)) for m in item):
            items.append(tuple(item))
        else:
            raise MaskValueError(f"per_batch entry {b} must be a Mask, a BlockLayout or a non-empty list of them "
                                 f"(one per head), got {item!r:.80}")
    if not items:
        raise MaskValueError("per_batch needs at least one entry, got an empty list")
    return PerBatch(tuple(items))


# -- validation -------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise MaskValueError(f"{name} must be a torch.Tensor [B, H, L, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise MaskValueError(f"{name} must be 4-D [B, H, L, D], got shape {list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                             f"convert them with .to(dtype)")
    if q.dtype not in _FLOATS:
        raise MaskValueError(f"q, k, v must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise MaskValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if k.shape != v.shape:
        raise MaskValueError(f"k and v must have the same shape [B, Hkv, Lk, D], got k {list(k.shape)} and "
                             f"v {list(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B:
        raise MaskValueError(f"q and k must have the same batch size, got q {list(q.shape)} and k {list(k.shape)}")
    if k.shape[3] != D:
        raise MaskValueError(f"q and k must have the same head dim D, got q {list(q.shape)} and k {list(k.shape)}")
    Hkv = k.shape[1]
    if Hkv != H:
        if not enable_gqa:
            raise MaskValueError(f"q has {H} heads but k/v have {Hkv} (q {list(q.shape)}, k {list(k.shape)}); "
                                 f"pass enable_gqa=True for grouped-query attention")
        if Hkv == 0 or H % Hkv:
            raise MaskValueError(f"grouped-query attention needs q's heads to be a multiple of k's, got q "
                                 f"{list(q.shape)} and k {list(k.shape)}")


def _resolve_masks(mask, B: int, H: int, Lq: int, Lk: int, q_offset: int | None,
                   block_size, compile: bool = True) -> tuple[list, torch.Tensor]:
    """(distinct layouts, int64 [B, H] index into them) for any accepted mask argument.

    With ``compile=False`` nothing is compiled: the entries are ``(Mask, q_offset)`` pairs
    (a BlockLayout gives its own), for the short-call path that evaluates masks directly.
    """
    layouts: list = []
    index: dict = {}
    by_id: dict[int, int] = {}
    default_offset = resolve_shape(Lq, Lk, q_offset, minimum=0)[2] if not compile else None

    def layout_of(item: MaskLike, where: str, b: int = 0, h: int = 0) -> int:
        hit = by_id.get((id(item), b, h))
        if hit is not None:
            return hit
        if isinstance(item, BlockLayout):
            item._check_lengths(Lq, Lk)
            if q_offset is not None and q_offset != item.q_offset:
                raise MaskValueError(f"{where}: the layout was compiled with q_offset={item.q_offset} but "
                                     f"q_offset={q_offset} was passed; recompile with mask.compile({Lq}, {Lk}, "
                                     f"q_offset={q_offset}) or drop q_offset")
            lay = item if compile else (_pinned(item.mask, item.b, item.h), item.q_offset)
        elif isinstance(item, Mask):
            # a mask_mod that reads b or h gets one layout per batch element / head (cached, shared otherwise)
            lay = item.compile(Lq, Lk, q_offset=q_offset, block_size=block_size, b=b, h=h) if compile \
                else (_pinned(item, b, h), default_offset)
        else:
            raise MaskValueError(f"{where} must be a Mask or a BlockLayout, got {type(item).__name__}")
        # By identity: hashing a mask walks its whole tree (a decode step with nine per-head
        # masks spent ~0.1 ms in hash()); equal masks given as two objects are two entries.
        # lay[0], not item: a mask_mod that reads b / h comes pinned per (b, h), one object each.
        key = id(lay) if compile else (id(lay[0]), lay[1])
        if key not in index:
            index[key] = len(layouts)
            layouts.append(lay)
        by_id[(id(item), b, h)] = index[key]
        return index[key]

    def heads_of(item, where: str, b: int) -> list[int]:
        if isinstance(item, Mask) and item.has_mask_mod() and item.depends_on():
            return [layout_of(item, where, b, h) for h in range(H)]
        if isinstance(item, (Mask, BlockLayout)):
            return [layout_of(item, where)] * H
        if isinstance(item, (list, tuple)):
            if len(item) != H:
                raise MaskValueError(f"{where} is a list of {len(item)} masks but q has {H} heads; give one mask "
                                     f"per query head (for one mask per batch element use "
                                     f"attnmask.engines.per_batch([...]))")
            return [layout_of(m, f"{where}[{h}]", b, h) for h, m in enumerate(item)]
        raise MaskValueError(f"{where} must be a Mask, a BlockLayout, a list of one Mask per head, or "
                             f"attnmask.engines.per_batch([...]), got {type(item).__name__}")

    if isinstance(mask, PerBatch):
        if len(mask) != B:
            raise MaskValueError(f"per_batch holds {len(mask)} entries but q has batch size {B}; give one per "
                                 f"batch element")
        grid = [heads_of(item, f"per_batch entry {b}", b) for b, item in enumerate(mask.items)]
    elif isinstance(mask, Mask) and "batch" in mask.depends_on():
        grid = [heads_of(mask, "mask", b) for b in range(B)]
    else:
        row = heads_of(mask, "mask", 0)
        grid = [row] * B
    return layouts, torch.tensor(grid, dtype=torch.int64).reshape(B, H)


def _pinned(mask: Mask, b: int, h: int) -> Mask:
    """``mask`` with its mask_mod leaves pinned at the (b, h) they read, for the short path's direct
    evaluation (which has no (b, h) of its own); masks that read neither are returned as they are."""
    if not mask.has_mask_mod():
        return mask
    reads = mask.depends_on()
    return mask.at(b=b if "batch" in reads else None, h=h if "head" in reads else None)


# -- backends ---------------------------------------------------------------------------------------

@dataclass
class _Call:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layouts: list
    head_layout: torch.Tensor
    scale: float
    enable_gqa: bool
    needs_grad: bool
    return_lse: bool


def _blocksparse_reasons(c: _Call) -> list[str]:
    reasons = []
    if c.q.device.type != "cpu":
        reasons.append(f"runs on CPU tensors only, got {c.q.device}")
    return reasons


def _dense_reasons(c: _Call) -> list[str]:
    from .dense import DENSE_MAX_CELLS
    B, H, Lq, _ = c.q.shape
    cells = B * H * Lq * c.k.shape[2]
    if cells > DENSE_MAX_CELLS:
        return [f"would build a {B} x {H} x {Lq} x {c.k.shape[2]} score matrix ({cells:,} cells, over "
                f"{DENSE_MAX_CELLS:,}); it is a reference for small sizes"]
    return []


def _flex_reasons(c: _Call) -> list[str]:
    reasons = []
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return ["torch.nn.attention.flex_attention is not available in this torch"]
    layouts = [lay for lay in c.layouts if isinstance(lay, BlockLayout)]    # none for empty sequences
    if any((lay.q_offset, lay.block_size) != (layouts[0].q_offset, layouts[0].block_size) for lay in layouts):
        reasons.append("needs per-head masks compiled with one q_offset and block size")
    if any(lay.block_q != lay.block_k for lay in layouts):
        reasons.append("needs square blocks (block_q == block_k)")
    if c.needs_grad and c.q.device.type == "cpu":
        reasons.append("has no backward pass on CPU in torch (gradients were requested)")
    if c.return_lse and c.q.device.type == "cpu":
        reasons.append("cannot return the lse on CPU in torch (return_lse=True was passed)")
    if c.q.dtype == torch.float16 and c.q.device.type == "cpu":
        reasons.append("does not support float16 on CPU")
    D = c.q.shape[-1]
    if D < 16 or D & (D - 1):
        reasons.append(f"needs a power-of-two head dim >= 16, got D={D}")
    return reasons


def _run_blocksparse(c: _Call):
    if c.needs_grad:
        try:
            from .autograd import blocksparse_attention_with_grad
        except ImportError as e:
            raise MaskError(f"the blocksparse backward is unavailable ({e}); call attention under "
                            f"torch.no_grad(), or use backend='dense' for small sizes") from e
        return blocksparse_attention_with_grad(c.q, c.k, c.v, c.layouts, c.head_layout, c.scale)
    from .blocksparse import blocksparse_forward
    return blocksparse_forward(c.q, c.k, c.v, c.layouts, c.head_layout, c.scale)


def _run_dense(c: _Call):
    from .dense import dense_attention
    B, H, Lq, _ = c.q.shape
    rep = H // c.k.shape[1]
    k, v = (c.k, c.v) if rep == 1 else (c.k.repeat_interleave(rep, 1), c.v.repeat_interleave(rep, 1))
    dense = [lay.to_dense() for lay in c.layouts]
    if len(dense) == 1:
        allowed = dense[0].to(c.q.device)
    else:
        allowed = torch.stack(dense).to(c.q.device)[c.head_layout.to(c.q.device)]   # [B, H, Lq, Lk]
    return dense_attention(c.q, k, v, allowed, c.scale)


def _run_flex(c: _Call):
    from .flex import flex_forward
    return flex_forward(c.q, c.k, c.v, c.layouts, c.head_layout, c.scale, c.enable_gqa, c.return_lse)


_REASONS = {"blocksparse": _blocksparse_reasons, "dense": _dense_reasons, "flex": _flex_reasons}
_RUN = {"blocksparse": _run_blocksparse, "dense": _run_dense, "flex": _run_flex}


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("flex", "dense") if device.type == "cuda" else ("blocksparse", "dense")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, scale: float | None = None,
              q_offset: int | None = None, enable_gqa: bool = False, return_lse: bool = False,
              backend: str = "auto", block_size=DEFAULT_BLOCK_SIZE):
    """Exact masked attention: softmax(q k^T * scale, masked) v.

    q ``[B, H, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` (Hkv == H, or a divisor of H
    with ``enable_gqa=True``: query head h reads kv head ``h // (H // Hkv)``).
    ``mask``: a :class:`~attnmask.Mask`, a list of one Mask per query head, a
    compiled :class:`~attnmask.BlockLayout` (lengths must match), or
    :func:`per_batch` ``([...])`` for masks that differ per batch element.
    Query row i sits at position ``q_offset + i`` (default ``Lk - Lq``).
    ``scale`` defaults to ``1 / sqrt(D)``. Rows with no allowed key give zeros
    and lse = -inf; so does ``Lk = 0``, and ``Lq = 0`` gives an empty output (as SDPA),
    both with gradients (zeros) and without compiling anything. Returns out ``[B, H, Lq, D]``
    in q's dtype, or ``(out, lse)`` with lse ``[B, H, Lq]`` (float32; float64 for float64
    inputs) when ``return_lse``.
    ``backend``: ``"auto"`` (blocksparse on CPU, flex on CUDA), ``"blocksparse"``,
    ``"dense"`` or ``"flex"``; a backend that cannot run the inputs raises a
    MaskError listing why. ``block_size`` is used when compiling a Mask.

        >>> import torch, attnmask as am
        >>> q = k = v = torch.randn(1, 8, 1000, 64)
        >>> out = am.attention(q, k, v, am.causal & am.sliding(256))
        >>> out.shape
        torch.Size([1, 8, 1000, 64])
    """
    _check_tensors(q, k, v, enable_gqa)
    if backend not in BACKENDS:
        raise MaskValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise MaskValueError(f"scale must be a number, got {scale!r}") from None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if backend in ("auto", "blocksparse") and q.device.type == "cpu" and not needs_grad and 0 < Lq <= SHORT_ROWS \
            and Lk > 0 and D > 0 and B > 0 and H > 0:
        # Short calls and decode steps: nothing is compiled (the shape changes every step).
        items, head_index = _resolve_masks(mask, B, H, Lq, Lk, q_offset, block_size, compile=False)
        if short_fits(len(items), Lq, Lk):
            out, lse = short_forward(q, k, v, items, head_index, scale)
            return (out, lse) if return_lse else out
    empty = Lq == 0 or Lk == 0
    # Empty sequences have no (query, key) cell, so nothing is compiled (a layout needs lengths
    # >= 1); the masks are still checked, uncompiled, and the backend's reasons still apply.
    layouts, head_layout = _resolve_masks(mask, B, H, Lq, Lk, q_offset, block_size, compile=not empty)
    call = _Call(q, k, v, layouts, head_layout, scale, enable_gqa, needs_grad, return_lse)

    if backend == "auto":
        tried = []
        for name in _auto_order(q.device):
            reasons = _REASONS[name](call)
            if not reasons:
                backend = name
                break
            tried.append(f"{name}: " + "; ".join(reasons))
        else:
            raise MaskValueError("no backend can run these inputs:\n  " + "\n  ".join(tried))
    else:
        reasons = _REASONS[backend](call)
        if reasons:
            others = []
            for name in _REASONS:
                if name != backend and not _REASONS[name](call):
                    others.append(name)
            hint = f"; backends that can: {', '.join(others)}" if others else ""
            raise MaskValueError(f"backend {backend!r} cannot run these inputs: " + "; ".join(reasons) + hint)
    out, lse = _no_cells(call) if empty else _RUN[backend](call)
    return (out, lse) if return_lse else out


def _no_cells(c: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with no query row or no key (Lq or Lk 0), as SDPA gives it: out [B, H, Lq, D] (zeros:
    every row has no key) and lse -inf, through ops on empty tensors, so gradients flow (dq zeros
    for Lk = 0; dk, dv zeros for Lq = 0) and backward needs no engine."""
    B, H, Lq, D = c.q.shape
    Hkv, Lk = c.k.shape[1], c.k.shape[2]
    rep = H // Hkv
    q = c.q.reshape(B, Hkv, rep * Lq, D)          # query heads of a kv group as rows: K/V never repeated
    s = torch.matmul(q, c.k.transpose(-2, -1)) * c.scale                     # [B, Hkv, rep * Lq, Lk]: empty
    out = torch.matmul(s, c.v).reshape(B, H, Lq, D)                          # a sum over no key: zeros
    from .blocksparse import lse_dtype
    lse = s.to(lse_dtype(c.q.dtype)).logsumexp(-1).reshape(B, H, Lq)        # -inf (no key), or empty
    return out, lse
