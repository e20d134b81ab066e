"""Same-segment primitives (class SEG): ``chunked(c)`` and ``document(n1, n2, ...)``.

Each gives the compiler its segments (:class:`attnmask.primitives.base.Segments`): from
their boundaries the compiler knows, per query block, the key range it sees and where that
range is full.

    >>> from attnmask.primitives.segments import chunked, document
    >>> document(2, 1).to_dense(4).int().tolist()      # position 3 is padding
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    >>> str(chunked(64))
    'chunked(64)'
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MaskValueError
from ..kinds import StructureClass
from ..masks import Mask
from .base import PrimitiveKind, Segments, register

_I64 = np.int64

#: Longest packed length whose document-id table (int32, 4 bytes a position) is built.
DOC_TABLE_LIMIT = 1 << 24


def _on_device(node, device, key: str, build) -> torch.Tensor:
    """A CPU table built by ``build`` (cached on the node under ``key``), on ``device``, copied there once."""
    table = node.cached(key, build)
    if device is None or torch.device(device).type == "cpu":
        return table
    return node.cached(f"{key}@{_device_key(device)}", lambda: table.to(device))


def _device_key(device) -> str:
    d = torch.device(device)
    index = d.index
    if index is None and d.type == "cuda":
        index = torch.cuda.current_device()     # "cuda" and "cuda:0" are one table
    return f"{d.type}:{index or 0}"


@register
class CHUNKED(PrimitiveKind):
    name = "chunked"
    params = ("c",)
    signature = "chunked(c)"
    structure = StructureClass.SEG
    min_args = max_args = 1
    minimum = 1

    def evaluate(self, node, q, k):
        c = node.args[0]
        return torch.div(q, c, rounding_mode="floor") == torch.div(k, c, rounding_mode="floor")

    def retained(self, node, k, t):
        c = node.args[0]
        return k >= torch.div(t, c, rounding_mode="floor") * c      # the current chunk and later

    def segments(self, args):
        c = args[0]
        return Segments(of=lambda x: x // c, start=lambda s: s * c, end=lambda s: (s + 1) * c, real=None,
                        square_sum=lambda a, b: np.maximum(b - a, 0) * c * c)


@register
class DOCUMENT(PrimitiveKind):
    name = "document"
    params = ("n1",)
    signature = "document(n1, n2, ...)"
    structure = StructureClass.SEG
    min_args, max_args = 1, None

    def normalize(self, args):
        self.check_count(args)
        vals = tuple(self.whole(f"n{i + 1}", a) for i, a in enumerate(args))
        for i, v in enumerate(vals):
            if v < 1:
                raise MaskValueError(f"document(n1, n2, ...) needs every ni >= 1, got n{i + 1}={v}")
        return vals

    def evaluate(self, node, q, k):
        total = sum(node.args)   # a Python int: no tensor-to-int (a graph break under torch.compile)
        inside = (q >= 0) & (q < total) & (k >= 0) & (k < total)
        if total <= DOC_TABLE_LIMIT:
            # A lookup table of document ids: plain indexing, which FlexAttention's
            # kernels can inline (searchsorted fails to lower in inductor).
            ids = self.ids(node, q.device)
            qs = ids[q.clamp(0, total - 1)]
            ks = ids[k.clamp(0, total - 1)]
        else:
            ends = self.ends(node, q.device)
            qs = torch.searchsorted(ends, q.clamp(0, total - 1).contiguous(), right=True)
            ks = torch.searchsorted(ends, k.clamp(0, total - 1).contiguous(), right=True)
        return inside & (qs == ks)

    # Tables are cached on the mask node, per device: a mask_mod indexes them with the
    # query's device, so FlexAttention on a GPU reads a GPU table (a CPU one fails to lower).
    def ids(self, node, device=None) -> torch.Tensor:
        """int32 document id of every packed position, on ``device`` (cached)."""
        return _on_device(node, device, "ids", lambda: torch.repeat_interleave(
            torch.arange(len(node.args), dtype=torch.int32), torch.tensor(node.args, dtype=torch.int64)))

    def ends(self, node, device=None) -> torch.Tensor:
        """int64 exclusive end position of each document, on ``device`` (cached)."""
        return _on_device(node, device, "ends", lambda: torch.tensor(node.args, dtype=torch.int64).cumsum(0))

    def retained(self, node, k, t):
        # keys from the start of t's document on; nothing once t is past the packed length
        a = node.args
        ends = self.ends(node, t.device)
        starts = ends - torch.tensor(a, dtype=torch.int64, device=t.device)
        seg = torch.searchsorted(ends, t.clamp(min=0).reshape(-1).contiguous(), right=True).reshape(t.shape)
        inside = seg < len(a)
        start = starts[seg.clamp(max=len(a) - 1)]
        return inside & (k >= start)

    def prepare(self, node, device):
        if sum(node.args) <= DOC_TABLE_LIMIT:
            self.ids(node, device)
        else:
            self.ends(node, device)

    def segments(self, args):
        lens = np.asarray(args, dtype=_I64)
        ends = np.cumsum(lens)
        starts = ends - lens
        sq = np.concatenate(([0], np.cumsum(lens * lens)))
        n = len(lens)
        return Segments(of=lambda x: np.searchsorted(ends, x, side="right"), start=lambda s: starts[s],
                        end=lambda s: ends[s], real=(0, int(ends[-1])),
                        square_sum=lambda a, b: np.where(b > a, sq[np.clip(b, 0, n)] - sq[np.clip(a, 0, n)], 0))

    def causal_segments(self, args, length):
        out, start = [], 0
        for n in args:
            if start >= length:
                break
            out.append((start, min(start + n, length)))
            start += n
        return out

    def display_extent(self, args):
        return sum(args)                    # the packed length itself


def chunked(c: int) -> Mask:
    """Same chunk of ``c`` positions: ``q // c == k // c``.

        >>> chunked(2).to_dense(3).int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    return CHUNKED.make(c)


def document(*lengths: int) -> Mask:
    """Packed documents of the given lengths; positions past their sum are padding.

        >>> document([2, 2]) == document(2, 2)
        True
    """
    if len(lengths) == 1 and isinstance(lengths[0], (list, tuple)):
        lengths = tuple(lengths[0])
    return DOCUMENT.make(*lengths)


__all__ = ["chunked", "document", "DOC_TABLE_LIMIT"]
