"""MaskPlan: one mask per (layer, head) of a model, as language text, with the figures of its fit.

A plan is a value: ``masks[layer][head]`` are :class:`Mask` objects, ``figures``
holds whatever the fit measured per head (kept mass, pairs, family), and
``meta`` the fit's settings (target share, texts, length). It saves to JSON as
canonical mask text, so a plan file is readable and editable by hand.

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
from typing import Any, Sequence

from .errors import MaskValueError
from .language import parse
from .masks import Mask

FORMAT = "attnmask.MaskPlan/1"


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """Per layer, per (query) head masks. ``masks[l][h]`` is a Mask; every layer has the same head count."""

    masks: tuple[tuple[Mask, ...], ...]
    figures: tuple[tuple[dict, ...], ...] | None = None   # per layer, per head: fit figures (JSON-able)
    meta: dict = field(default_factory=dict)               # fit settings and totals (JSON-able)

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

    def __eq__(self, other) -> bool:
        if not isinstance(other, MaskPlan):
            return NotImplemented
        return self.masks == other.masks and self.figures == other.figures and self.meta == other.meta

    def __hash__(self) -> int:
        return hash(self.masks)

    def __repr__(self) -> str:
        return f"MaskPlan({self.n_layers} layers x {self.n_heads} heads, {len(self.distinct())} distinct masks)"

    # ----- JSON ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "layers": [[str(m) for m in layer] for layer in self.masks]}
        if self.figures is not None:
            out["figures"] = [list(layer) for layer in self.figures]
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
        return cls(tuple(masks), figures=data.get("figures"), meta=data.get("meta") or {})

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
