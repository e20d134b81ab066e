"""Short calls and decoding: 1 to ``SHORT_ROWS`` query rows against any number of keys, all heads in one call.

A decode step (one query row against a KV cache) has a new shape every step,
so a layout compiled for it is used once: compiling costs 3-8 ms at 4K-64K keys
on this project's machine while the step itself is 0.1-10 ms. This path
compiles nothing. Per distinct mask it evaluates ``Mask.evaluate`` on the
``[Lq, Lk]`` cells it has (Lq x Lk booleans: 1/D of the attention's own work),
takes the union of the keys that any head attends and runs ONE fused flash
call for every head:

- query heads that share a kv head are folded into the query rows
  (q ``[B, H, Lq, D]`` viewed as ``[B, Hkv, rep * Lq, D]``), so K/V are never
  repeated for GQA and each head's rows carry their own mask (per-head lists
  cost one call, not one per head);
- keys: the contiguous range from the first to the last key used, as views
  (no copy), when at least half of it is used; otherwise the used keys are
  gathered (a copy of just the keys attended, e.g. the w + s keys of
  ``sliding(w) | sink(s)`` at 64K cached keys);
- no mask at all when every row attends every selected key (a ``causal``
  decode step is then the very call SDPA makes).

Rows with no key give zeros and lse = -inf. The key selection and masks are
cached per (masks, shape, heads) in a byte-bounded cache, so a repeated shape
costs one lookup; a growing cache costs the evaluation above per step.

    >>> import torch, attnmask as am
    >>> q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16)
    >>> out, lse = short_forward(q, k, k, [(am.causal & am.sliding(8), 99), (am.causal, 99)],
    ...                          torch.tensor([[0, 1, 0, 1]]), 0.25)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 1, 16]), torch.Size([1, 4, 1]))
"""

from __future__ import annotations

import torch

from ..masks import Mask
from ..threads import single_thread, threads_for
from .cache import ByteLRU, tensor_bytes

__all__ = ["short_forward", "SHORT_ROWS", "SHORT_MAX_CELLS", "short_plans"]

#: Calls with at most this many query rows take this path (decode steps, speculative drafts).
SHORT_ROWS = 16
#: ... when their masks' cells (distinct masks x Lq x Lk) stay under this bound (64 MB of booleans).
SHORT_MAX_CELLS = 1 << 26
#: The key range is used as views when at least this share of it is attended, else keys are gathered.
_VIEW_SHARE = 0.5

#: Plans of short calls (key selection, masks), bounded in bytes.
short_plans = ByteLRU(64 << 20)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class _ShortPlan:
    """Keys to read (``lo:hi`` views or a gathered ``index``), and the per-row mask over them or None."""

    def __init__(self, lo: int, hi: int, index: torch.Tensor | None, allowed: torch.Tensor | None,
                 empty: torch.Tensor | None):
        self.lo, self.hi, self.index = lo, hi, index
        self.allowed = allowed            # bool [B or 1, Hkv, rep * Lq, n] or None (every key attended)
        self.empty = empty                # bool, the shape of allowed without n: rows with no key, or None
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        hit = self._additive.get(dtype)
        if hit is None:
            hit = self._additive[dtype] = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(
                ~self.allowed, float("-inf"))
        return hit

    def nbytes(self) -> int:
        return tensor_bytes(self.index, self.allowed, self.empty) + 4 * tensor_bytes(self.allowed)


def fits(n_masks: int, Lq: int, Lk: int) -> bool:
    """Whether a call of Lq rows against Lk keys with ``n_masks`` distinct masks takes this path.

        >>> fits(9, 1, 65536), fits(1, 64, 4096)
        (True, False)
    """
    return 0 < Lq <= SHORT_ROWS and n_masks * Lq * Lk <= SHORT_MAX_CELLS


def _build(items: list[tuple[Mask, int]], head_index: torch.Tensor, Lq: int, Lk: int, Hkv: int) -> _ShortPlan:
    kpos = torch.arange(Lk)
    allowed = torch.stack([torch.broadcast_to(m.evaluate((off + torch.arange(Lq))[:, None], kpos[None, :]),
                                              (Lq, Lk)) for m, off in items])          # [M, Lq, Lk]
    used = allowed.any(1).any(0)
    idx = used.nonzero().flatten()
    if len(idx) == 0:
        return _ShortPlan(0, 0, None, None, None)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    index = None
    if len(idx) < _VIEW_SHARE * (hi - lo):
        index = idx
        sel = allowed.index_select(2, idx)
    else:
        sel = allowed[:, :, lo:hi]
    B, H = head_index.shape
    same_rows = B == 1 or bool((head_index == head_index[:1]).all())
    hi_ = head_index[:1] if same_rows else head_index
    per_head = sel[hi_]                                                   # [B', H, Lq, n]
    if bool(per_head.all()):
        return _ShortPlan(lo, hi, index, None, None)
    n = per_head.shape[-1]
    folded = per_head.reshape(hi_.shape[0], Hkv, (H // Hkv) * Lq, n).contiguous()
    empty = ~folded.any(-1)
    return _ShortPlan(lo, hi, index, folded, empty if bool(empty.any()) else None)


#: The last items seen, by identity: (ids and offsets, the items themselves, their token).
#: A decode loop passes the same mask objects every step; hashing their trees each step costs
#: more than the step's other Python work (the items are kept alive here, so ids stay theirs).
_last_items: list = [None]
#: Equal items share one token (an int, cheap to hash in plan keys). Tokens are never reused, so
#: clearing this table (past _MAX_TOKENS) can only make old plans unreachable, never wrong.
_tokens: dict = {}
_next_token = [0]
_MAX_TOKENS = 4096


def _items_key(items: list[tuple[Mask, int]]) -> int:
    """A token for the value of ``items``: equal lists of (mask, offset) get the same one."""
    ids = tuple((id(m), off) for m, off in items)
    hit = _last_items[0]
    if hit is not None and hit[0] == ids and all(a is b for (a, _), (b, _) in zip(hit[1], items)):
        return hit[2]
    value = tuple(items)
    token = _tokens.get(value)
    if token is None:
        if len(_tokens) >= _MAX_TOKENS:
            _tokens.clear()
        token = _tokens[value] = _next_token[0]
        _next_token[0] += 1
    _last_items[0] = (ids, list(items), token)
    return token


def short_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: list[tuple[Mask, int]],
                  head_index: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention for a short call: (out ``[B, H, Lq, D]`` in q's dtype, lse ``[B, H, Lq]``).

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (query head h reads kv head
    ``h // (H // Hkv)``); ``items[i] = (mask, q_offset)``: query row r of a head
    with ``head_index[b, h] == i`` sits at position ``q_offset + r``. lse is
    float32 (float64 for float64 inputs), -inf where a row has no key. No autograd.

        >>> import torch, attnmask as am
        >>> q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 50, 8)
        >>> out, lse = short_forward(q, k, k, [(am.none, 49)], torch.zeros(1, 1, dtype=torch.int64), 0.3)
        >>> bool((out == 0).all()), lse.item()
        (True, -inf)
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    key = (_items_key(items), Lq, Lk, B, H, Hkv, head_index.numpy().tobytes())
    plan = short_plans.get(key)
    if plan is None:
        with single_thread():        # many small ops: the pool's wake-ups cost more than they save
            plan = _build(items, head_index, Lq, Lk, Hkv)
        short_plans.put(key, plan, plan.nbytes() + 256)
    if plan.hi == plan.lo:
        return q.new_zeros(q.shape), torch.full((B, H, Lq), float("-inf"), dtype=lse_dtype)
    rep = H // Hkv
    qf = q.reshape(B, Hkv, rep * Lq, D)
    if plan.index is None:
        ks, vs = k[:, :, plan.lo:plan.hi], v[:, :, plan.lo:plan.hi]
    else:
        ks, vs = k.index_select(2, plan.index), v.index_select(2, plan.index)
    n = ks.shape[2]
    with threads_for(B * H * Lq * n):
        if plan.allowed is None:
            o, lse = _flash(qf, ks, vs, 0.0, False, scale=scale)
        else:
            o, lse = _flash(qf, ks, vs, 0.0, False, attn_mask=plan.additive(q.dtype), scale=scale)
            if plan.empty is not None:
                lse = lse.masked_fill(plan.empty, float("-inf"))   # the kernel reports 0 (and zeros) there
    return o.reshape(B, H, Lq, D), lse.to(lse_dtype).reshape(B, H, Lq)
