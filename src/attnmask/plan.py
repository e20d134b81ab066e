"""MaskPlan: one mask per (layer, head) of a model, as language text, with the figures of its fit.

A plan is a value: ``masks[layer][head]`` are :class:`Mask` objects, ``figures``
holds whatever the fit measured per head (kept mass, pairs, family), and
``meta`` the fit's settings (target share, texts, length). It saves to JSON as
canonical mask text, so a plan file is readable and editable by hand.

A head may also carry a data-dependent part, ``dynamic[layer][head]``: a named
family whose key columns are chosen per input. The one family so far,
``{"family": "top_columns", "window": w, "sink": s, "columns": K,
"last_queries": n}``, means: the head attends its base mask
``masks[layer][head]`` (``causal & (sliding(w) | sink(s))``) plus the K keys
outside it that the input's last n queries weigh most (MInference's vertical
lines). :meth:`MaskPlan.resolve` turns it into ordinary language text for one
input: ``causal & (sliding(w) | sink(s) | cols(p1) | cols(p2, p3) ...)``.

    >>> import attnmask as am
    >>> plan = am.MaskPlan.uniform(am.causal & am.sliding(64), layers=2, heads=3)
    >>> plan.n_layers, plan.n_heads, str(plan.layer(1)[2])
    (2, 3, 'causal & sliding(64)')
    >>> am.MaskPlan.from_dict(plan.to_dict()) == plan
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .errors import MaskValueError
from .language import parse
from .masks import Mask
from .primitives import causal, cols, sink, sliding
from .primitives.ranges import SINK

FORMAT = "attnmask.MaskPlan/1"
DYNAMIC_FAMILY = "top_columns"
# A top_columns spec's numbers: the base mask's window w and sink size n (``causal & (sliding(w) | sink(n))``;
# the key of n is the sink primitive's name), the column count K and how many last queries choose them.
_DYNAMIC_KEYS = ("window", SINK.name, "columns", "last_queries")
_DYNAMIC_MINIMUM = dict(zip(_DYNAMIC_KEYS, (1, 0, 1, 1)))


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """Per layer, per (query) head masks. ``masks[l][h]`` is a Mask; every layer has the same head count."""

    masks: tuple[tuple[Mask, ...], ...]
    figures: tuple[tuple[dict, ...], ...] | None = None   # per layer, per head: fit figures (JSON-able)
    meta: dict = field(default_factory=dict)               # fit settings and totals (JSON-able)
    dynamic: tuple[tuple[dict | None, ...], ...] | None = None   # per layer, per head: data-dependent part or None

    def __post_init__(self):
        masks = tuple(tuple(layer) for layer in self.masks)
        if not masks or not masks[0]:
            raise MaskValueError("a MaskPlan needs at least one layer with at least one head")
        heads = len(masks[0])
        for i, layer in enumerate(masks):
            if len(layer) != heads:
                raise MaskValueError(f"every layer of a MaskPlan needs {heads} heads, layer {i} has {len(layer)}")
            for h, m in enumerate(layer):
                if not isinstance(m, Mask):
                    raise MaskValueError(f"MaskPlan layer {i} head {h} must be a Mask, got {type(m).__name__}")
        object.__setattr__(self, "masks", masks)
        if self.figures is not None:
            figs = tuple(tuple(dict(f) for f in layer) for layer in self.figures)
            if len(figs) != len(masks) or any(len(f) != heads for f in figs):
                raise MaskValueError("MaskPlan figures must have one entry per layer and head")
            object.__setattr__(self, "figures", figs)
        object.__setattr__(self, "meta", dict(self.meta))
        if self.dynamic is not None:
            dyn = tuple(tuple(None if d is None else _check_dynamic(d, i, h) for h, d in enumerate(layer))
                        for i, layer in enumerate(self.dynamic))
            if len(dyn) != len(masks) or any(len(d) != heads for d in dyn):
                raise MaskValueError("MaskPlan dynamic must have one entry (a dict or None) per layer and head")
            object.__setattr__(self, "dynamic", dyn if any(d for layer in dyn for d in layer) else None)

    # ----- construction ----------------------------------------------------
    @classmethod
    def uniform(cls, mask: Mask | str, layers: int, heads: int, **meta) -> "MaskPlan":
        """The same mask for every layer and head."""
        m = parse(mask) if isinstance(mask, str) else mask
        return cls(tuple(tuple(m for _ in range(heads)) for _ in range(layers)), meta=meta)

    # ----- views -----------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.masks)

    @property
    def n_heads(self) -> int:
        return len(self.masks[0])

    def layer(self, index: int) -> tuple[Mask, ...]:
        """The per-head masks of one layer."""
        if not -self.n_layers <= index < self.n_layers:
            raise MaskValueError(f"the plan has {self.n_layers} layers, got layer {index}")
        return self.masks[index]

    def distinct(self) -> set[Mask]:
        return {m for layer in self.masks for m in layer}

    def resolve(self, layer: int, last_weights: "torch.Tensor") -> tuple[Mask, ...]:
        """The per-head masks of one layer for one input, data-dependent heads resolved.

        ``last_weights [H, n, Lk]`` are the layer's attention weights of the
        input's last n queries (at least each dynamic head's ``last_queries``
        are used when present). Static heads return their mask unchanged.

            >>> import torch, attnmask as am
            >>> spec = {"family": "top_columns", "window": 4, "sink": 1, "columns": 1, "last_queries": 8}
            >>> plan = am.MaskPlan(((am.causal & (am.sliding(4) | am.sink(1)),),), dynamic=((spec,),))
            >>> w = torch.zeros(1, 8, 32); w[..., 20] = 1.0
            >>> str(plan.resolve(0, w)[0])
            'causal & (sliding(4) | sink(1) | cols(20))'
        """
        masks = self.layer(layer)
        if self.dynamic is None or not any(self.dynamic[layer]):
            return masks
        if last_weights.dim() != 3 or last_weights.shape[0] != self.n_heads:
            raise MaskValueError(f"last_weights must be [{self.n_heads}, n, Lk] for this plan, "
                                 f"got {tuple(last_weights.shape)}")
        return tuple(m if d is None else resolve_columns(d, last_weights[h])
                     for h, (m, d) in enumerate(zip(masks, self.dynamic[layer])))

    def analyze(self, length: int, *, head_dim: int = 64, kv_heads: int | None = None) -> dict:
        """Totals at one length against dense causal attention: pairs, FLOPs, KV-cache entries.

        FLOPs count the forward, 4 x pairs x head_dim per head (QK^T and PV).
        KV-cache: the keys held at the last decoding step, per key/value head the
        union of its query heads' masks (``kv_heads`` groups of consecutive
        heads, default one per head); a data-dependent head adds its K columns
        (an upper bound: a column inside the window is counted twice).

            >>> import attnmask as am
            >>> r = am.MaskPlan.uniform("causal & sliding(16)", layers=2, heads=2).analyze(64)
            >>> r["pairs"], r["dense_pairs"], r["kv_cache"], r["dense_kv_cache"]
            (3616, 8320, 64, 256)
        """
        from .analysis import kv_cache_curve
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise MaskValueError(f"length must be a whole number >= 1, got {length!r}")
        kv_heads = kv_heads or self.n_heads
        if self.n_heads % kv_heads:
            raise MaskValueError(f"kv_heads must divide the {self.n_heads} heads, got {kv_heads}")
        group = self.n_heads // kv_heads
        pairs_of: dict[Mask, int] = {}
        cache_of: dict[Mask, int] = {}
        pairs = kv = 0
        per_layer = []
        for i, layer in enumerate(self.masks):
            dyn = self.dynamic[i] if self.dynamic is not None else (None,) * self.n_heads
            layer_pairs = 0
            for m, d in zip(layer, dyn):
                if m not in pairs_of:
                    pairs_of[m] = m.compile(length).attended_pairs()
                extra = 0
                if d is not None:  # each column adds at most the rows below its window
                    window, sink_size, columns, _ = _spec_values(d)
                    extra = columns * max(0, length - window - sink_size)
                layer_pairs += min(pairs_of[m] + extra, length * (length + 1) // 2)
            for g in range(kv_heads):
                heads = range(g * group, (g + 1) * group)
                union = layer[heads[0]]
                for h in heads[1:]:
                    union = union | layer[h]
                if union not in cache_of:
                    cache_of[union] = int(kv_cache_curve(union, length)[-1])
                cols_extra = sum(int(dyn[h]["columns"]) for h in heads if dyn[h] is not None)
                kv += min(length, cache_of[union] + cols_extra)
            pairs += layer_pairs
            per_layer.append(layer_pairs)
        dense_pairs = self.n_layers * self.n_heads * length * (length + 1) // 2
        return {"length": length, "pairs": pairs, "dense_pairs": dense_pairs, "density": pairs / dense_pairs,
                "flops_forward": 4 * pairs * head_dim, "dense_flops_forward": 4 * dense_pairs * head_dim,
                "kv_cache": kv, "dense_kv_cache": self.n_layers * kv_heads * length,
                "kv_cache_ratio": kv / (self.n_layers * kv_heads * length), "pairs_per_layer": per_layer}

    def __eq__(self, other) -> bool:
        if not isinstance(other, MaskPlan):
            return NotImplemented
        return (self.masks == other.masks and self.figures == other.figures and self.meta == other.meta
                and self.dynamic == other.dynamic)

    def __hash__(self) -> int:
        return hash(self.masks)

    def __repr__(self) -> str:
        return f"MaskPlan({self.n_layers} layers x {self.n_heads} heads, {len(self.distinct())} distinct masks)"

    # ----- JSON ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "layers": [[str(m) for m in layer] for layer in self.masks]}
        if self.figures is not None:
            out["figures"] = [list(layer) for layer in self.figures]
        if self.dynamic is not None:
            out["dynamic"] = [list(layer) for layer in self.dynamic]
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "MaskPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), list):
            raise MaskValueError(f"not a MaskPlan: expected a JSON object with format {FORMAT!r} and 'layers'")
        masks = []
        for i, layer in enumerate(data["layers"]):
            if not isinstance(layer, list):
                raise MaskValueError(f"MaskPlan layer {i} must be a list of mask texts")
            masks.append(tuple(parse(text) for text in layer))
        return cls(tuple(masks), figures=data.get("figures"), meta=data.get("meta") or {},
                   dynamic=data.get("dynamic"))

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MaskPlan":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise MaskValueError(f"no plan file at {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise MaskValueError(f"{os.fspath(path)!r} is not JSON: {e}") from None
        return cls.from_dict(data)


def _check_dynamic(spec, layer: int, head: int) -> dict:
    if not isinstance(spec, dict) or spec.get("family") != DYNAMIC_FAMILY:
        raise MaskValueError(f"MaskPlan layer {layer} head {head}: a data-dependent part must be a dict with "
                             f"family {DYNAMIC_FAMILY!r}, got {spec!r}")
    for key in _DYNAMIC_KEYS:
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < _DYNAMIC_MINIMUM[key]:
            raise MaskValueError(f"MaskPlan layer {layer} head {head}: {DYNAMIC_FAMILY} needs a whole number "
                                 f"{key!r} (>= {_DYNAMIC_MINIMUM[key]}), got {value!r}")
    return dict(spec)


def dynamic_spec(window: int, sink_size: int, columns: int, last_queries: int) -> dict:
    """A ``top_columns`` head's data-dependent part (what ``dynamic[layer][head]`` holds).

        >>> dynamic_spec(4, 1, 2, 8) == {"family": "top_columns", "window": 4, "sink": 1, "columns": 2,
        ...                              "last_queries": 8}
        True
    """
    return {"family": DYNAMIC_FAMILY, **dict(zip(_DYNAMIC_KEYS, (window, sink_size, columns, last_queries)))}


def _spec_values(spec: dict) -> tuple[int, int, int, int]:
    """(window, sink size, columns, last queries) of a ``top_columns`` spec."""
    window, sink_size, columns, last_queries = (int(spec[k]) for k in _DYNAMIC_KEYS)
    return window, sink_size, columns, last_queries


def _merge_runs(positions: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in sorted(set(int(p) for p in positions)):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def with_columns(window: int, sink_size: int, positions: Iterable[int]) -> Mask:
    """``causal & (sliding(window) | sink(sink_size) | cols(p) ...)`` with runs of positions merged.

        >>> str(with_columns(16, 4, [9, 10, 11, 40]))
        'causal & (sliding(16) | sink(4) | cols(9, 12) | cols(40))'
    """
    m = sliding(window) | sink(sink_size) if sink_size else sliding(window)
    for a, b in _merge_runs(positions):
        m = m | (cols(a) if b == a + 1 else cols(a, b))
    return causal & m


def top_column_positions(spec: dict, last_weights: torch.Tensor) -> list[int]:
    """The key positions a ``top_columns`` head adds for one input (see :func:`resolve_columns`).

        >>> import torch
        >>> w = torch.zeros(4, 32); w[:, 5] = 1.0; w[:, 30] = 0.5
        >>> top_column_positions({"family": "top_columns", "window": 4, "sink": 1, "columns": 1,
        ...                       "last_queries": 4}, w)
        [5]
    """
    if spec.get("family") != DYNAMIC_FAMILY:
        raise MaskValueError(f"unknown data-dependent family {spec.get('family')!r}; known: {DYNAMIC_FAMILY!r}")
    window, s, count, n_last = _spec_values(spec)
    if last_weights.dim() != 2:
        raise MaskValueError(f"last_weights must be [n, Lk], got {tuple(last_weights.shape)}")
    lk = last_weights.shape[-1]
    wl = last_weights[-n_last:].to(torch.float64)
    wl = wl / wl.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    q = torch.arange(lk - wl.shape[0], lk)
    # a key's score: the last queries' mass on it from outside their window (inside it is kept anyway)
    score = (wl * ((q.view(-1, 1) - torch.arange(lk).view(1, -1)) >= window)).sum(0)
    score[:s] = -1.0                                                  # the sink holds those keys already
    return sorted(torch.topk(score, min(count, lk - s)).indices.tolist())


def resolve_columns(spec: dict, last_weights: torch.Tensor) -> Mask:
    """The concrete mask of a ``top_columns`` head for one input.

    ``last_weights [n, Lk]`` are the head's attention weights of the input's
    last queries (``spec["last_queries"]`` of them are used); the
    ``spec["columns"]`` keys with the most mass outside the window and the sink
    become ``cols(p)`` terms.

        >>> import torch
        >>> w = torch.zeros(4, 32); w[:, 5] = 1.0
        >>> str(resolve_columns({"family": "top_columns", "window": 4, "sink": 1, "columns": 1,
        ...                      "last_queries": 4}, w))
        'causal & (sliding(4) | sink(1) | cols(5))'
    """
    window, sink_size, _, _ = _spec_values(spec)
    return with_columns(window, sink_size, top_column_positions(spec, last_weights))


def as_plan(obj: "MaskPlan | Mask | str | Sequence", layers: int, heads: int) -> MaskPlan:
    """A MaskPlan from a plan, one mask (text or Mask) for everything, or one per-head list for every layer."""
    if isinstance(obj, MaskPlan):
        if (obj.n_layers, obj.n_heads) != (layers, heads):
            raise MaskValueError(f"the plan is {obj.n_layers} layers x {obj.n_heads} heads, "
                                 f"the model has {layers} x {heads}")
        return obj
    if isinstance(obj, (Mask, str)):
        return MaskPlan.uniform(obj, layers, heads)
    per_head = [parse(m) if isinstance(m, str) else m for m in obj]
    if len(per_head) != heads:
        raise MaskValueError(f"a per-head list needs {heads} masks, got {len(per_head)}")
    return MaskPlan(tuple(tuple(per_head) for _ in range(layers)))
