"""Run a transformers model's attention through attnmask: one mask per (layer, head).

transformers looks attention up by name in two registries: ``AttentionInterface``
(the function that computes attention) and ``AttentionMaskInterface`` (the
function that turns the 2-D padding ``attention_mask`` into what each layer
receives). Both get the name ``"attnmask"``. Without the mask half,
transformers builds no mask for a custom implementation and padding is lost.

Our mask function builds no dense mask: it returns a :class:`MaskContext`
(where the queries sit, how long the key axis is, which tokens are padding).
The attention function then evaluates the layer's plan masks at each
sequence's own positions, so a padded batch equals its sequences run one by one:

- keys held in full (no cache, transformers' DynamicCache, or a MaskCache
  that has evicted nothing): the block-sparse engine (CPU) or FlexAttention
  (GPU) through :func:`attnmask.attention`, GQA without repeating K/V; a padded
  sequence runs on its own slice of rows and keys (one call per sequence);
- keys a :class:`~attnmask.models.MaskCache` has thinned out (decoding with a
  window): the masks are evaluated at the kept keys' original positions and the
  attention over those few keys is computed directly (exact; cells bounded per call);
- ``output_attentions=True``: real weights over the full key axis, computed
  densely and refused above :data:`WEIGHTS_MAX_CELLS` (``models.capture`` is the
  memory-bounded way to look at weights).

Dropout in attention is refused (no engine implements it): train with
``config.attention_dropout = 0``. Gradients flow through every path.

    >>> from attnmask import models                                 # doctest: +SKIP
    >>> model, tok = models.load("smollm2")                          # doctest: +SKIP
    >>> models.apply(model, "causal & (sliding(512) | sink(4))")     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import DenseTooLargeError, MaskError, MaskValueError
from ..masks import Mask
from ..plan import MaskPlan, as_plan
from .capture import model_shape

__all__ = ["IMPLEMENTATION", "MaskContext", "apply", "register", "attention_modules", "plan_of",
           "WEIGHTS_MAX_CELLS"]

IMPLEMENTATION = "attnmask"
"""The name under which attnmask's attention and mask functions are registered in transformers."""

WEIGHTS_MAX_CELLS = 1 << 28
"""Largest B x H x Lq x Lk weight tensor ``output_attentions=True`` builds (1 GiB in float32)."""

_DIRECT_SLICE_CELLS = 1 << 24
"""Score cells per slice of queries in the direct (kept-keys) path: memory stays ~64 MB whatever Lq."""


@dataclass(frozen=True)
class MaskContext:
    """What each attention layer receives instead of a dense mask.

    ``q_offset``: index of the first query on the key axis (tokens already cached);
    ``kv_length``: length of the full key axis (cached + new, evicted keys included);
    ``valid``: bool ``[B, kv_length]``, False at padding, or None when nothing is padded;
    ``first``/``count``: int64 ``[B]``, each sequence's run of real tokens (None without padding).
    """

    q_offset: int
    kv_length: int
    valid: torch.Tensor | None = None
    first: torch.Tensor | None = None
    count: torch.Tensor | None = None

    def sequence_positions(self) -> torch.Tensor | None:
        """int64 ``[B, kv_length]``: each token's position in its own sequence (None without padding)."""
        if self.valid is None:
            return None
        return torch.arange(self.kv_length, device=self.valid.device)[None, :] - self.first[:, None]


# -- registration -------------------------------------------------------------------------------------

def _mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                    mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> MaskContext:
    """transformers' mask hook for ``"attnmask"``: padding and positions, no dense mask."""
    from transformers.masking_utils import causal_mask_function
    if mask_function is not None and mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise MaskValueError(f"the model asked for its own mask pattern ({name}: a sliding-window, packed-sequence "
                             f"or bidirectional mask); attnmask replaces only a plain causal mask. Put the pattern in "
                             f"the plan instead (e.g. 'causal & sliding(w)' or 'causal & document(...)')")
    if kv_offset:
        raise MaskValueError(f"the cache reports keys starting at position {kv_offset} (a sliding-window cache); "
                             f"with attnmask use attnmask.models.MaskCache, which keeps what the plan needs")
    q_offset = int(q_offset)
    if attention_mask is None:
        return MaskContext(q_offset, int(kv_length))
    valid = attention_mask.to(torch.bool)
    if valid.dim() != 2 or valid.shape[0] != batch_size:
        raise MaskValueError(f"attention_mask must be [batch, length], got shape {list(valid.shape)}")
    valid = valid[:, :kv_length]
    if valid.shape[1] != kv_length:
        raise MaskValueError(f"attention_mask covers {valid.shape[1]} tokens but the keys are {kv_length} long")
    if bool(valid.all()):
        return MaskContext(q_offset, int(kv_length))
    count = valid.sum(1)
    first = valid.to(torch.int8).argmax(1)
    pos = torch.arange(kv_length, device=valid.device)[None, :]
    run = (pos >= first[:, None]) & (pos < (first + count)[:, None])
    if not bool((run == valid).all()):
        bad = int((run != valid).any(1).nonzero()[0, 0])
        raise MaskValueError(f"attention_mask row {bad} has gaps ({valid[bad].int().tolist()!r:.120}); attnmask "
                             f"needs each row to be one run of 1s (left or right padding)")
    return MaskContext(q_offset, int(kv_length), valid, first.to(torch.int64), count.to(torch.int64))


def register() -> None:
    """Register ``"attnmask"`` with transformers' attention and mask interfaces (idempotent).

        >>> from attnmask.models.attention import register, IMPLEMENTATION   # doctest: +SKIP
        >>> register()                                                        # doctest: +SKIP
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, attnmask_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask_interface)


def attention_modules(model) -> list:
    """The model's self-attention modules in layer order (modules with a ``layer_idx`` and GQA groups)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def apply(model, plan: "MaskPlan | Mask | str | Sequence", *, backend: str = "auto", block_size: int = 128):
    """Run ``model``'s attention through attnmask with ``plan``: a MaskPlan, one mask for
    every layer and head (Mask or text), or one per-head list for every layer.

    Registers the implementation, stores each layer's masks on its attention
    module and switches ``model.config`` to ``"attnmask"``. Returns the MaskPlan.
    ``backend`` goes to :func:`attnmask.attention` (``"auto"``: blocksparse on
    CPU, flex on CUDA). Call ``model.set_attn_implementation("sdpa")`` to go back.

        >>> from attnmask import models                                      # doctest: +SKIP
        >>> plan = models.apply(model, "causal & (sliding(512) | sink(4))")   # doctest: +SKIP
        >>> plan.n_layers, plan.n_heads                                       # doctest: +SKIP
        (30, 9)
    """
    from ..engines.dispatch import BACKENDS
    if backend not in BACKENDS:
        raise MaskValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    layers, heads, _ = model_shape(model)
    plan = as_plan(plan, layers, heads)
    if getattr(plan, "dynamic", None):
        raise MaskValueError("the plan has data-dependent heads (their key columns depend on the input); resolve "
                             "them for one input first (MaskPlan.resolve), or let models.evaluate do it per text")
    mods = attention_modules(model)
    if len(mods) != layers:
        raise MaskValueError(f"found {len(mods)} attention modules with a layer_idx in {type(model).__name__}, "
                             f"but its config has {layers} layers; attnmask.models supports decoder models whose "
                             f"attention goes through transformers' AttentionInterface (Llama, Mistral, Qwen, ...)")
    register()
    for mod in mods:
        mod.attnmask_masks = plan.layer(mod.layer_idx)
        mod.attnmask_backend = backend
        mod.attnmask_block_size = block_size
    model.attnmask_plan = plan
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except (ValueError, KeyError, AttributeError):   # older transformers: set the config directly
        model.config._attn_implementation = IMPLEMENTATION
    if model.config._attn_implementation != IMPLEMENTATION:
        raise MaskError(f"{type(model).__name__} did not accept the attention implementation {IMPLEMENTATION!r} "
                        f"(it does not dispatch attention through transformers' AttentionInterface)")
    return plan


def plan_of(model) -> MaskPlan:
    """The MaskPlan :func:`apply` put on ``model``."""
    plan = getattr(model, "attnmask_plan", None)
    if plan is None:
        raise MaskValueError("this model runs no attnmask plan; call attnmask.models.apply(model, plan) first")
    return plan


# -- the attention function ---------------------------------------------------------------------------

def attnmask_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention hook for ``"attnmask"``.

    query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (after RoPE); returns
    (out ``[B, Lq, H, D]``, weights ``[B, H, Lq, kv_length]`` or None).
    """
    masks = getattr(module, "attnmask_masks", None)
    if masks is None:
        raise MaskValueError(f"layer {getattr(module, 'layer_idx', '?')} has no attnmask masks; call "
                             f"attnmask.models.apply(model, plan) instead of only setting attn_implementation")
    if dropout and dropout > 0:
        raise MaskValueError(f"attention dropout {dropout} is not supported by attnmask (no engine implements it); "
                             f"set model.config.attention_dropout = 0.0 to train, or call model.eval()")
    B, H, Lq, D = query.shape
    if len(masks) != H:
        raise MaskValueError(f"layer {module.layer_idx} has {len(masks)} masks but the query has {H} heads")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    view = getattr(key, "_attnmask_kv", None)
    if attention_mask is None:
        ctx = MaskContext(key.shape[2] - Lq if view is None else view.seen - Lq,
                          key.shape[2] if view is None else view.seen)
    elif isinstance(attention_mask, MaskContext):
        ctx = attention_mask
    else:
        raise MaskValueError(f"attnmask got a prepared {type(attention_mask).__name__} attention mask of shape "
                             f"{list(getattr(attention_mask, 'shape', []))}; pass the 2-D padding attention_mask "
                             f"[batch, length] and put any pattern in the plan")
    want_weights = bool(kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False))
    backend = getattr(module, "attnmask_backend", "auto")
    block_size = getattr(module, "attnmask_block_size", 128)

    if view is None:
        if key.shape[2] != ctx.kv_length:
            raise MaskValueError(f"layer {module.layer_idx} got {key.shape[2]} keys but the sequence has "
                                 f"{ctx.kv_length}: a cache that drops keys works with attnmask only as "
                                 f"attnmask.models.MaskCache")
        Hkv = key.shape[1]
        groups = [_Group(list(range(Hkv)), key, value, None)]
    else:
        Hkv = view.n_kv_heads
        groups = [_Group(g.heads, g.keys, g.values, None if g.contiguous else g.positions) for g in view.groups]
    if H % Hkv:
        raise MaskValueError(f"the query has {H} heads, not a multiple of the {Hkv} key heads")
    G = H // Hkv

    if want_weights:
        out, weights = _weights_path(query, groups, masks, ctx, scale, G)
    else:
        weights = None
        outs = []
        for g in groups:
            qh = _query_heads(g.heads, G)
            qg = query if len(qh) == H else query[:, qh]
            gm = [masks[h] for h in qh]
            if g.positions is None:
                o = _engine_group(qg, g.keys, g.values, gm, ctx, scale, G, backend, block_size)
            else:
                o = _direct_group(qg, g.keys, g.values, gm, g.positions, ctx, scale, G)
            outs.append((qh, o))
        out = outs[0][1] if len(outs) == 1 and len(outs[0][0]) == H else _scatter_heads(outs, query)
    if view is not None:
        view.done(ctx)   # the cache drops what no later query can attend
    return out.transpose(1, 2).contiguous(), weights


@dataclass
class _Group:
    heads: list           # kv head indices
    keys: torch.Tensor    # [B, g, K, D]
    values: torch.Tensor
    positions: torch.Tensor | None   # int64 [K] key-axis index of each key; None: 0..K-1


def _query_heads(kv_heads: list, G: int) -> list:
    return [h * G + j for h in kv_heads for j in range(G)]


def _scatter_heads(outs, query: torch.Tensor) -> torch.Tensor:
    B, H, Lq, D = query.shape
    order = [h for qh, _ in outs for h in qh]
    cat = torch.cat([o for _, o in outs], dim=1)
    if order == list(range(H)):
        return cat
    inverse = torch.empty(H, dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(H)
    return cat[:, inverse.to(cat.device)]


def _one_or_list(masks: list):
    return masks[0] if all(m == masks[0] for m in masks) else list(masks)


def _engine_group(q, k, v, masks, ctx: MaskContext, scale, G, backend, block_size) -> torch.Tensor:
    """Keys 0..Lk-1 held in full: attnmask's engine, one call (or one per padded sequence)."""
    from ..engines.dispatch import attention
    mask = _one_or_list(masks)
    Lq = q.shape[2]
    if ctx.valid is None:
        return attention(q, k, v, mask, scale=scale, q_offset=ctx.q_offset, enable_gqa=G > 1,
                         backend=backend, block_size=block_size)
    # Padding: each sequence runs on its own rows and keys, at its own positions.
    out = q.new_zeros(q.shape)
    rows = []
    for b in range(q.shape[0]):
        first, n = int(ctx.first[b]), int(ctx.count[b])
        lo, hi = max(ctx.q_offset, first), min(ctx.q_offset + Lq, first + n)
        if hi <= lo:
            continue
        ob = attention(q[b:b + 1, :, lo - ctx.q_offset:hi - ctx.q_offset], k[b:b + 1, :, first:first + n],
                       v[b:b + 1, :, first:first + n], mask, scale=scale, q_offset=lo - first,
                       enable_gqa=G > 1, backend=backend, block_size=block_size)
        rows.append((b, lo - ctx.q_offset, hi - ctx.q_offset, ob))
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        for b, lo, hi, ob in rows:
            out[b:b + 1, :, lo:hi] = ob
        return out
    # With autograd: assemble without writing into a leaf-connected tensor in place.
    pieces = []
    for b in range(q.shape[0]):
        parts, at = [], 0
        for bb, lo, hi, ob in rows:
            if bb != b:
                continue
            if lo > at:
                parts.append(q.new_zeros(1, q.shape[1], lo - at, q.shape[3]))
            parts.append(ob)
            at = hi
        if at < Lq:
            parts.append(q.new_zeros(1, q.shape[1], Lq - at, q.shape[3]))
        pieces.append(torch.cat(parts, dim=2))
    return torch.cat(pieces, dim=0)


def _positions(ctx: MaskContext, q_index: torch.Tensor, k_index: torch.Tensor):
    """Sequence positions of queries [B, Lq] and keys [B, K] and which of them are real tokens."""
    if ctx.valid is None:
        return q_index[None, :], k_index[None, :], None, None
    seq = ctx.sequence_positions()
    return seq[:, q_index], seq[:, k_index], ctx.valid[:, q_index], ctx.valid[:, k_index]


def _allowed(masks: list, qpos, kpos, qvalid, kvalid) -> torch.Tensor:
    """bool [B or 1, Hq, Lq, K]: the per-head masks evaluated at the given positions."""
    distinct = {}
    for m in masks:
        if m not in distinct:
            a = m.evaluate(qpos[:, :, None], kpos[:, None, :])
            if kvalid is not None:
                a = a & kvalid[:, None, :] & qvalid[:, :, None]
            distinct[m] = a
    return torch.stack([distinct[m] for m in masks], dim=1)


def _direct(q, k, v, allowed, scale, G, want_probs: bool = False):
    """Attention over the given keys with a bool mask, GQA without repeating K/V.

    q [B, g*G, Lq, D], k/v [B, g, K, D], allowed broadcastable to [B, g*G, Lq, K];
    float32 accumulation (float64 for float64); fully masked rows give zeros.
    """
    B, Hq, Lq, D = q.shape
    g, K = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The G query heads of kv head h are heads h*G .. h*G+G-1: as rows of one [G*Lq, D] block they share
    # their keys in a plain batched matmul (no repeated K/V, no broadcast batch dims).
    qq = q.reshape(B, g, G * Lq, D).to(acc)
    kk, vv = k.to(acc), v.to(acc)                                              # [B, g, K, D]
    allowed = allowed.expand(B, Hq, Lq, K).reshape(B, g, G * Lq, K)
    scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale                    # [B, g, G*Lq, K]
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, vv).reshape(B, Hq, Lq, D).to(q.dtype)
    return (out, p.reshape(B, Hq, Lq, K)) if want_probs else out


def _direct_group(q, k, v, masks, positions, ctx: MaskContext, scale, G) -> torch.Tensor:
    """Keys at arbitrary positions (a thinned cache): masks evaluated at the original positions."""
    B, Hq, Lq, D = q.shape
    K = k.shape[2]
    rows = max(1, _DIRECT_SLICE_CELLS // max(1, B * Hq * K))
    outs = []
    for lo in range(0, Lq, rows):
        hi = min(Lq, lo + rows)
        q_index = torch.arange(ctx.q_offset + lo, ctx.q_offset + hi, device=q.device)
        qpos, kpos, qvalid, kvalid = _positions(ctx, q_index, positions.to(q.device))
        outs.append(_direct(q[:, :, lo:hi], k, v, _allowed(masks, qpos, kpos, qvalid, kvalid), scale, G))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _weights_path(query, groups, masks, ctx: MaskContext, scale, G):
    """``output_attentions=True``: output and weights ``[B, H, Lq, kv_length]`` computed densely (bounded)."""
    B, H, Lq, D = query.shape
    cells = B * H * Lq * ctx.kv_length
    if cells > WEIGHTS_MAX_CELLS:
        raise DenseTooLargeError(f"output_attentions=True would build {B} x {H} x {Lq} x {ctx.kv_length} weights "
                                 f"({cells:,} cells, over {WEIGHTS_MAX_CELLS:,}); use attnmask.models.capture "
                                 f"(memory-bounded weights of chosen rows) or a shorter input")
    outs, weights = [], query.new_zeros(B, H, Lq, ctx.kv_length, dtype=torch.float32)
    q_index = torch.arange(ctx.q_offset, ctx.q_offset + Lq, device=query.device)
    for g in groups:
        qh = _query_heads(g.heads, G)
        positions = g.positions if g.positions is not None else torch.arange(g.keys.shape[2])
        positions = positions.to(query.device)
        qpos, kpos, qvalid, kvalid = _positions(ctx, q_index, positions)
        o, p = _direct(query[:, qh], g.keys, g.values, _allowed([masks[h] for h in qh], qpos, kpos, qvalid, kvalid),
                       scale, G, want_probs=True)
        idx = torch.tensor(qh, device=query.device)
        w = weights.index_select(1, idx)
        w[..., positions] = p.to(w.dtype)
        weights[:, idx] = w
        outs.append((qh, o))
    out = outs[0][1] if len(outs) == 1 and len(outs[0][0]) == H else _scatter_heads(outs, query)
    return out, weights.to(query.dtype)
