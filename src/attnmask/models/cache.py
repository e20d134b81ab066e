"""A KV cache for ``generate`` that keeps only the keys a plan's masks can still attend.

Per layer, KV heads whose query heads carry the same masks form a *group*
that shares one set of kept key positions. After each forward the layer drops
every key that no later query (position >= the next one) can attend under any
of the group's masks, judged from the mask's structure (:func:`retained`):
``causal & (sliding(w) | sink(s))`` keeps ``w + s`` keys, ``causal &
chunked(c)`` the current chunk, ``causal`` everything. The rule is a superset
of what is needed, so decoding with it is exactly decoding with the same mask
on the full cache.

Keys are cached after RoPE, so they carry their original positions; the cache
remembers each kept key's index on the full key axis and the attention function
evaluates the masks there (attention.py: ``_direct_group``). Padding tokens are
dropped too: no query attends them.

    >>> import torch, attnmask as am
    >>> from attnmask.models.cache import retained
    >>> m = am.causal & (am.sliding(4) | am.sink(2))
    >>> retained(m, torch.arange(12), torch.tensor(10)).nonzero().flatten().tolist()
    [0, 1, 7, 8, 9, 10, 11]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MaskValueError
from ..maskmod import MaskMod
from ..masks import Complement, Difference, Intersection, Mask, Primitive, Union

from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["MaskCache", "MaskCacheLayer", "retained", "cache_bytes"]


def retained(mask: Mask, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Whether some query at a position ``>= t`` may attend key position ``k`` (a superset, never less).

    ``k`` and ``t`` are broadcastable int64 tensors of positions; the result is bool.
    A primitive answers for itself (:meth:`PrimitiveKind.retained
    <attnmask.primitives.base.PrimitiveKind.retained>`: exact for windows, sinks, bands, chunks,
    documents, rows and columns); unions and intersections combine their parts' answers, a
    difference keeps its left side's; anything it cannot bound (``strided``, complements,
    FlexAttention predicates) keeps every key.
    """
    if isinstance(mask, Primitive):
        return mask.kind.retained(mask, k, t)     # each primitive states its own rule
    if isinstance(mask, Union):
        out = retained(mask.parts[0], k, t)
        for p in mask.parts[1:]:
            out = out | retained(p, k, t)
        return out
    if isinstance(mask, Intersection):
        out = retained(mask.parts[0], k, t)
        for p in mask.parts[1:]:
            out = out & retained(p, k, t)
        return out
    if isinstance(mask, Difference):
        return retained(mask.left, k, t)
    if isinstance(mask, (Complement, MaskMod)):
        return torch.ones_like(k - t, dtype=torch.bool)
    return torch.ones_like(k - t, dtype=torch.bool)


@dataclass
class _KVGroup:
    heads: list                     # kv head indices sharing one kept set
    masks: tuple                    # the distinct masks of their query heads
    keys: torch.Tensor | None = None      # [B, g, K, D]
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # int64 [K]: index of each kept key on the full key axis
    contiguous: bool = True         # positions == 0..K-1 (nothing dropped yet)


@dataclass
class _KVView:
    """What a layer hands the attention function: its groups after appending the new keys."""
    layer: "MaskCacheLayer"
    groups: list
    n_kv_heads: int
    seen: int

    def done(self, ctx) -> None:
        self.layer.evict(ctx)


class MaskCacheLayer(CacheLayerMixin):
    """One layer of :class:`MaskCache`: its kv heads in groups, each group's kept keys and their positions."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, masks: tuple, n_kv_heads: int):
        CacheLayerMixin.__init__(self)
        H = len(masks)
        if n_kv_heads < 1 or H % n_kv_heads:
            raise MaskValueError(f"{H} query heads cannot share {n_kv_heads} key heads")
        G = H // n_kv_heads
        by_masks: dict = {}
        for h in range(n_kv_heads):
            group_masks = tuple(dict.fromkeys(masks[h * G:(h + 1) * G]))
            by_masks.setdefault(group_masks, []).append(h)
        self.groups = [_KVGroup(heads, ms) for ms, heads in by_masks.items()]
        self.n_kv_heads = n_kv_heads
        self.seen = 0          # tokens seen (the full key axis length)
        self.evicted = 0       # keys dropped so far (summed over groups)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        B, _, _, D = key_states.shape
        for g in self.groups:
            g.keys = key_states.new_zeros(B, len(g.heads), 0, D)
            g.values = value_states.new_zeros(B, len(g.heads), 0, value_states.shape[-1])
            g.positions = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        L = key_states.shape[2]
        new_pos = torch.arange(self.seen, self.seen + L, device=key_states.device)
        whole = len(self.groups) == 1
        for g in self.groups:
            ks = key_states if whole else key_states[:, g.heads]
            vs = value_states if whole else value_states[:, g.heads]
            g.keys = torch.cat([g.keys, ks], dim=2)
            g.values = torch.cat([g.values, vs], dim=2)
            g.positions = torch.cat([g.positions, new_pos])
        self.seen += L
        self.keys, self.values = self.groups[0].keys, self.groups[0].values
        view = _KVView(self, list(self.groups), self.n_kv_heads, self.seen)
        # The attention function reads the groups from the returned tensor (a fresh alias of the first
        # group's keys); it is the only consumer: MaskCache.update checks that the model runs "attnmask".
        out_k = self.groups[0].keys.view_as(self.groups[0].keys)
        out_k._attnmask_kv = view
        return out_k, self.groups[0].values

    def evict(self, ctx) -> None:
        """Drop the keys no query at or after the next position can attend (``ctx``: a MaskContext)."""
        nxt = self.seen
        for g in self.groups:
            pos = g.positions
            if ctx.valid is None:
                k, t, real = pos[None, :], torch.tensor([[nxt]], device=pos.device), None
            else:
                seq = ctx.sequence_positions()
                k = seq[:, pos.to(seq.device)]
                t = ctx.count[:, None]        # next token of each sequence sits at position count
                real = ctx.valid[:, pos.to(seq.device)]
            keep = torch.zeros(k.shape, dtype=torch.bool, device=k.device)
            for m in g.masks:
                keep |= retained(m, k, t)
            if real is not None:
                keep &= real
            keep = keep.any(0).to(pos.device)
            if bool(keep.all()):
                continue
            idx = keep.nonzero().flatten()
            self.evicted += (len(pos) - len(idx)) * len(g.heads)
            g.keys = g.keys.index_select(2, idx.to(g.keys.device))
            g.values = g.values.index_select(2, idx.to(g.values.device))
            g.positions = pos[idx]
            g.contiguous = False
        self.keys, self.values = self.groups[0].keys, self.groups[0].values

    def kept(self) -> list[int]:
        """Keys held per kv head (in kv-head order)."""
        out = [0] * self.n_kv_heads
        for g in self.groups:
            for h in g.heads:
                out[h] = 0 if g.positions is None else len(g.positions)
        return out

    def nbytes(self) -> int:
        """Bytes of keys and values held (positions included)."""
        total = 0
        for g in self.groups:
            for t in (g.keys, g.values, g.positions):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for g in self.groups:
            g.keys = g.values = g.positions = None
            g.contiguous = True
        self.keys = self.values = None
        self.seen = self.evicted = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if any(not g.contiguous for g in self.groups) or tokens_to_remove > 0:
            raise MaskValueError("MaskCache cannot be cropped once it has dropped keys (assisted decoding "
                                 "needs a rollback); use transformers' DynamicCache for it")
        n = self.seen + tokens_to_remove
        for g in self.groups:
            g.keys, g.values, g.positions = g.keys[:, :, :n], g.values[:, :, :n], g.positions[:n]
        self.seen = n

    def _batch(self, fn) -> None:
        for g in self.groups:
            if g.keys is not None:
                g.keys, g.values = fn(g.keys), fn(g.values)
        if self.is_initialized:
            self.keys, self.values = self.groups[0].keys, self.groups[0].values

    def reorder_cache(self, beam_idx) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._batch(lambda t: t[indices, ...])

    def offload(self):
        pass

    def prefetch(self):
        pass

    def __repr__(self):
        return f"MaskCacheLayer(kept={self.kept()}, seen={self.seen})"



class MaskCache(Cache):
    """A transformers ``Cache`` for a model that :func:`attnmask.models.apply` set up:
    ``model.generate(ids, past_key_values=MaskCache(model))``.

    ``cache.kept()`` gives the keys held per layer and kv head, ``cache.nbytes()``
    the bytes held.

    >>> from attnmask import models                               # doctest: +SKIP
    >>> models.apply(model, "causal & (sliding(512) | sink(4))")  # doctest: +SKIP
    >>> out = model.generate(ids, past_key_values=models.MaskCache(model), max_new_tokens=20)  # doctest: +SKIP
    """

    def __init__(self, model):
        from .attention import IMPLEMENTATION, plan_of
        from .capture import model_shape
        plan = plan_of(model)
        layers, heads, kv_heads = model_shape(model)
        self._config = model.config
        self._implementation = IMPLEMENTATION
        Cache.__init__(self, layers=[MaskCacheLayer(plan.layer(i), kv_heads) for i in range(plan.n_layers)])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._config._attn_implementation != self._implementation:
            raise MaskValueError(f"MaskCache works only with the attnmask attention implementation, but the "
                                 f"model now runs {self._config._attn_implementation!r}; call "
                                 f"attnmask.models.apply(model, plan) again or use a DynamicCache")
        return Cache.update(self, key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of keys and values held over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept(self) -> list[list[int]]:
        """Keys held per layer and kv head."""
        return [layer.kept() for layer in self.layers]



def cache_bytes(cache) -> int:
    """Bytes of keys and values a transformers cache holds (a MaskCache, a DynamicCache, ...)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
