"""Context-parallel attention over a torch.distributed process group, following a :class:`Plan`.

Each rank holds the q, k, v rows of the chunks the plan gives it (:func:`shard`).
:func:`attention` then, on every rank:

1. checks that all ranks hold the same plan and compatible tensors (one small
   all-gather of a fingerprint and the shapes; a mismatch raises on every rank,
   naming the ranks and what differs);
2. posts the K/V exchange of the plan's schedule (``grouped``: every needed
   chunk sent at once; ``ring``: one step ahead; ``allgather``: whole shards);
3. computes its own keys first, then each source's piece as it arrives, with
   ``attnmask.attention(..., return_lse=True)``, and merges the pieces exactly
   by their log-sum-exp;
4. in the backward (on CPU), runs each piece's FlashAttention backward with
   the *merged* output and log-sum-exp of its rows, so no gradient flows
   through the merge and the engine's fused kernel runs, as on one process;
   keeps dQ local and sends each source the dK/dV of the chunks it read from
   it; owners add them to their own. (On other devices autograd
   differentiates the pieces and the merge instead.)

How a piece is run through the public ``attention`` (which places keys at
positions 0..Lk): queries go in contiguous runs. For masks that only see
``q - k`` (causal, sliding, band, dilated, strided, diagonal) each run of
consecutive key chunks is its own call with ``q_offset`` = first query - first
key. Other masks (sinks, documents, rows, cols, ...) get the piece's keys at
their global positions in a zero buffer ``[B, Hkv, kmax, D]`` and the mask
restricted with ``cols(...)`` to the piece's chunks, so the block-sparse
engine never reads the zeros; that buffer is O(kmax) while its step runs
(built again in the backward, not kept in between; DESIGN.md).

The engine is whatever ``attnmask.attention`` picks for the device (blocksparse
on CPU, FlexAttention on CUDA); the collectives are torch.distributed's own.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..errors import MaskValueError
from .planner import Plan, PlanError, _runs_of, shift_invariant

__all__ = ["shard", "unshard", "gather", "attention", "PlanMismatchError", "CommunicationError"]


class PlanMismatchError(PlanError):
    """Ranks of one process group called :func:`attention` with different plans or incompatible tensors."""


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer failed (a peer died, timed out or disconnected)."""


# -- layout of local tensors -------------------------------------------------------------------------

def _positions(plan: Plan, rank: int, device) -> torch.Tensor:
    key = ("positions", rank)
    if key not in plan._cache:
        plan._cache[key] = plan.positions(rank)
    return plan._cache[key].to(device)


def shard(t: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """Rank's rows of ``t`` along the sequence dim -2 (``[..., L, D]`` -> ``[..., local_length, D]``).

        >>> import torch, attnmask as am
        >>> from attnmask import distributed as cp
        >>> p = cp.plan(am.causal, 8, 2, block_size=2, strategy="zigzag")
        >>> cp.shard(torch.arange(8.0)[:, None], p, 1).flatten().tolist()
        [2.0, 3.0, 4.0, 5.0]
    """
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        raise PlanError(f"shard needs a tensor [..., L, D] with the sequence on dim -2, got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else list(t.shape)}")
    if t.shape[-2] != plan.length:
        raise PlanError(f"shard: the tensor has {t.shape[-2]} positions on dim -2 but the plan is for "
                        f"length {plan.length}; make the plan with cp.plan(mask, {t.shape[-2]}, ...)")
    return t.index_select(-2, _positions(plan, rank, t.device))


def unshard(shards: Sequence[torch.Tensor], plan: Plan) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (inverse of :func:`shard`).

        >>> import torch, attnmask as am
        >>> from attnmask import distributed as cp
        >>> p = cp.plan(am.causal, 8, 2, block_size=2, strategy="zigzag")
        >>> x = torch.randn(1, 2, 8, 3)
        >>> torch.equal(cp.unshard([cp.shard(x, p, r) for r in range(2)], p), x)
        True
    """
    if len(shards) != plan.world_size:
        raise PlanError(f"unshard needs one shard per rank ({plan.world_size}), got {len(shards)}")
    first = shards[0]
    out = first.new_empty(first.shape[:-2] + (plan.length, first.shape[-1]))
    for r, s in enumerate(shards):
        if s.shape[-2] != plan.local_length(r):
            raise PlanError(f"unshard: rank {r}'s shard has {s.shape[-2]} positions, the plan gives it "
                            f"{plan.local_length(r)}")
        out.index_copy_(-2 if out.dim() > 1 else 0, _positions(plan, r, s.device), s)
    return out


def gather(out_local: torch.Tensor, plan: Plan, group=None) -> torch.Tensor:
    """The full tensor ``[..., L, D]`` on every rank of ``group``: all-gathers the shards and unshards them.

    Differentiable: the backward sums every rank's gradient of the full tensor (one all-reduce of
    ``[..., L, D]``) and keeps this rank's rows, i.e. the gradient of the sum of all ranks' losses,
    as ``torch.distributed.nn``'s collectives do; so every rank must run the backward too. Shards are
    padded to the longest so that the all-gather has equal sizes.
    """
    rank, W = _rank_world(plan, group)
    if out_local.shape[-2] != plan.local_length(rank):
        raise PlanError(f"gather: rank {rank}'s tensor has {out_local.shape[-2]} positions on dim -2, the plan "
                        f"gives it {plan.local_length(rank)}; pass what cp.attention returned on this rank")
    return _Gather.apply(out_local, plan, group, rank, W)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, group, rank, W):
        ctx.plan, ctx.group, ctx.rank = plan, group, rank
        longest = max(plan.local_length(r) for r in range(W))
        pad = longest - x.shape[-2]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[:-2] + (pad, x.shape[-1]))], dim=-2)
        bufs = [torch.empty_like(x) for _ in range(W)]
        _comm(lambda: dist.all_gather(bufs, x.contiguous(), group=group), rank, "gather's all-gather")
        return unshard([b[..., :plan.local_length(r), :] for r, b in enumerate(bufs)], plan)

    @staticmethod
    def backward(ctx, grad_full):
        g = grad_full.contiguous().clone()
        _comm(lambda: dist.all_reduce(g, group=ctx.group), ctx.rank, "gather's backward (all-reduce)")
        return shard(g, ctx.plan, ctx.rank), None, None, None, None


# -- checks across ranks -----------------------------------------------------------------------------

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _rank_world(plan: Plan, group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError("cp needs an initialised process group: call torch.distributed.init_process_group("
                        "'gloo' or 'nccl', ...) first (or use am.attention on one process)")
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    if W != plan.world_size:
        raise PlanError(f"the process group has {W} ranks but the plan was made for world_size="
                        f"{plan.world_size}; make it with cp.plan(mask, length, {W})")
    return rank, W


def _comm(fn, rank: int, what: str):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:      # gloo/NCCL report peers' deaths as these
        raise CommunicationError(f"cp.attention on rank {rank}: {what} failed ({type(e).__name__}: {e}); "
                                 f"another rank probably raised or died, see its error") from e


def _check_group(plan: Plan, q, k, v, rank: int, W: int, group, enable_gqa: bool) -> None:
    """Every rank learns every rank's plan fingerprint and shapes, and all raise the same error."""
    meta = [plan.fingerprint(), q.shape[0], q.shape[1], k.shape[1], q.shape[3], q.shape[2], k.shape[2],
            v.shape[2], _DTYPES.get(q.dtype, 0), int(enable_gqa),
            int(torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))]
    mine = torch.tensor(meta, dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(W)]
    _comm(lambda: dist.all_gather(everyone, mine, group=group), rank, "the plan check (all-gather)")
    rows = [t.tolist() for t in everyone]
    fps = [r[0] for r in rows]
    if len(set(fps)) > 1:
        described = [None] * W
        _comm(lambda: dist.all_gather_object(described, plan.describe(), group=group), rank,
              "the plan check (names)")
        groups: dict = {}
        for r, f in enumerate(fps):
            groups.setdefault(f, []).append(r)
        lines = "; ".join(f"rank(s) {','.join(map(str, rs))}: {described[rs[0]]}" for rs in groups.values())
        raise PlanMismatchError(f"cp.attention: ranks hold different plans ({lines}); every rank must call "
                                f"cp.plan with the same mask, length, world_size, block_size and options")
    names = ["batch", "query heads", "kv heads", "head dim"]
    for i, name in enumerate(names, start=1):
        vals = [r[i] for r in rows]
        if len(set(vals)) > 1:
            raise PlanMismatchError(f"cp.attention: ranks disagree on the {name}: "
                                    + ", ".join(f"rank {r} has {x}" for r, x in enumerate(vals)))
    if len({r[10] for r in rows}) > 1:
        raise PlanMismatchError("cp.attention: some ranks need gradients and others do not (" + ", ".join(
            f"rank {r}: {'grad' if x[10] else 'no grad'}" for r, x in enumerate(rows)) + "); the backward "
            "exchanges dK/dV with every rank, so all must call it the same way")
    if len({r[8] for r in rows}) > 1 or len({r[9] for r in rows}) > 1:
        raise PlanMismatchError("cp.attention: ranks disagree on the dtype or enable_gqa: " + ", ".join(
            f"rank {r} has dtype code {x[8]}, enable_gqa={bool(x[9])}" for r, x in enumerate(rows)))
    for r, row in enumerate(rows):
        want = plan.local_length(r)
        for name, got in (("q", row[5]), ("k", row[6]), ("v", row[7])):
            if got != want:
                raise PlanMismatchError(f"cp.attention: rank {r} passed {name} with {got} positions on dim -2, "
                                        f"but the plan gives it {want}; shard with cp.shard(t, plan, {r})")
    if plan.per_head and q.shape[1] != len(plan.masks):
        raise MaskValueError(f"the plan has {len(plan.masks)} per-head masks but q has {q.shape[1]} heads")


# -- per-rank geometry (cached on the plan) ----------------------------------------------------------

class _RankGeometry:
    """Local rows, query runs, and the send/receive lists of one rank under a plan."""

    def __init__(self, plan: Plan, rank: int):
        C, L = plan.block_size, plan.length
        self.C, self.L = C, L
        self.rank = rank
        self.chunks = plan.chunks_of(rank)
        lens = plan.chunk_len[self.chunks]
        self.local_start = dict(zip(self.chunks.tolist(), np.r_[0, np.cumsum(lens)[:-1]].tolist()))
        # query runs: (global start, global end, local start)
        self.q_runs = [(a, b, self._local_row(a)) for a, b in plan.position_runs(rank)]
        W = plan.world_size
        # chunks rank reads from each source, and chunks each destination reads from rank
        self.recv = {s: plan.needed_chunks(rank, s) for s in range(W) if s != rank and plan.tokens[rank, s] > 0}
        self.send = {d: plan.needed_chunks(d, rank) for d in range(W) if d != rank and plan.tokens[d, rank] > 0}
        self.own_needed = plan.needed_chunks(rank, rank)
        self.steps = plan.steps(rank)

    def _local_row(self, pos: int) -> int:
        c = pos // self.C
        return int(self.local_start[c] + pos - c * self.C)

    def local_rows(self, chunks: np.ndarray, plan: Plan) -> torch.Tensor:
        """int64 local row indices of own ``chunks`` (in order)."""
        parts = [torch.arange(self.local_start[c], self.local_start[c] + int(plan.chunk_len[c])) for c in chunks.tolist()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _geometry(plan: Plan, rank: int) -> _RankGeometry:
    key = ("geometry", rank)
    if key not in plan._cache:
        plan._cache[key] = _RankGeometry(plan, rank)
    return plan._cache[key]


def _trimmed(plan: Plan, compile_rows, qa: int, qb: int):
    """(layouts per head or one layout, r0, r1) for the rows ``qa + [r0, r1)`` of the query run [qa, qb)
    that attend anything in the piece (whole blocks), or None when none does.

    ``compile_rows(a, b)`` compiles every mask for query positions [a, b). A piece's keys usually reach only
    some of a run's rows (the document crossing a cut, the window's first rows), so the kernel call, the
    merge and the backward run on those rows alone.
    """
    lays = compile_rows(qa, qb)
    nonempty = np.zeros(lays[0].n_q_blocks, bool)
    for lay in lays:
        nonempty |= np.diff(lay.run_ptr.numpy()) > 0
    if not nonempty.any():
        return None
    blocks = np.nonzero(nonempty)[0]
    r0, r1 = int(blocks[0]) * plan.block_size, min(int(blocks[-1] + 1) * plan.block_size, qb - qa)
    if (r0, r1) != (0, qb - qa):
        lays = compile_rows(qa + r0, qa + r1)
    return (lays if plan.per_head else lays[0]), r0, r1


def _step_layouts(plan: Plan, rank: int, step: int, chunks: np.ndarray):
    """(kmax, per query run: _trimmed(...) over the step's zero buffer [0, kmax), or None)."""
    key = ("layouts", rank, step)
    if key in plan._cache:
        return plan._cache[key]
    from ..primitives import cols
    geo = _geometry(plan, rank)
    runs = _runs_of(chunks, plan.block_size, plan.length)
    kmax = runs[-1][1] if runs else 0
    keys = functools.reduce(operator.or_, [cols(a, b) for a, b in runs]) if runs else None

    def compile_rows(a, b):
        return [(m & keys).compile(b - a, kmax, q_offset=a, block_size=plan.block_size) for m in plan.masks]
    out = [None if keys is None else _trimmed(plan, compile_rows, qa, qb) for qa, qb, _ in geo.q_runs]
    plan._cache[key] = (kmax, out)
    return plan._cache[key]


# -- the exact merge ---------------------------------------------------------------------------------

def _merge(acc, piece):
    """Merge two partial attentions (out [B, H, n, D], lse [B, H, n]) of the same rows exactly."""
    if acc is None:
        return piece
    (o1, l1), (o2, l2) = acc, piece
    top = torch.maximum(l1, l2).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)   # rows with no keys at all: -inf, -inf
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    total = w1 + w2
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (o1 * (w1 / safe)[..., None].to(o1.dtype) + o2 * (w2 / safe)[..., None].to(o2.dtype))
    lse = torch.where(total > 0, top + torch.log(safe), torch.full_like(top, -float("inf")))
    return out, lse


def _merge_rows(acc, r0: int, r1: int, n: int, piece):
    """Merge ``piece`` (rows [r0, r1) of a run of n rows) into ``acc`` (the run's (out, lse), or None)."""
    if acc is None and (r0, r1) == (0, n):
        return piece
    o, l = piece
    if acc is None:
        acc = (o.new_zeros(o.shape[:2] + (n, o.shape[3])), l.new_full(l.shape[:2] + (n,), -float("inf")))
    out, lse = acc
    mo, ml = _merge((out[:, :, r0:r1], lse[:, :, r0:r1]), piece)
    if torch.is_grad_enabled():             # the autograd path: no in-place writes into the graph
        return (torch.cat([out[:, :, :r0], mo, out[:, :, r1:]], 2), torch.cat([lse[:, :, :r0], ml, lse[:, :, r1:]], 2))
    out[:, :, r0:r1], lse[:, :, r0:r1] = mo, ml
    return out, lse


def _shift_invariant(plan: Plan) -> bool:
    if "shift_invariant" not in plan._cache:
        plan._cache["shift_invariant"] = shift_invariant(plan.masks)
    return plan._cache["shift_invariant"]


# A segment is (global start, global end, source, row start, row end): rows [lo, hi) of the K/V tensor
# [2, B, Hkv, n, D] of ``source`` (this rank's own, or what it received from that rank) hold the keys at
# positions [ga, gb).

def _segments(chunks: np.ndarray, offset_of, source: int, plan: Plan) -> list:
    """Segments of ``chunks`` held by ``source``, one per run of chunks consecutive in both position and rows."""
    out = []
    C = plan.block_size
    for c in chunks.tolist():
        ga, gb, lo = c * C, min((c + 1) * C, plan.length), int(offset_of(c))
        if out and out[-1][1] == ga and out[-1][4] == lo:
            out[-1] = (out[-1][0], gb, source, out[-1][3], lo + gb - ga)
        else:
            out.append((ga, gb, source, lo, lo + gb - ga))
    return out


def _kv_buffer(segments, kmax: int, kv: dict) -> torch.Tensor:
    """[2, B, Hkv, kmax, D]: each segment's rows at its global positions, zeros elsewhere (one step's keys)."""
    like = next(iter(kv.values()))
    buf = like.new_empty((2,) + tuple(like.shape[1:3]) + (kmax, like.shape[-1]))
    end = 0
    for ga, gb, src, lo, hi in sorted(segments):
        buf[:, :, :, end:ga].zero_()        # only the gaps are zeroed (segments are disjoint)
        buf[:, :, :, ga:gb] = kv[src][:, :, :, lo:hi]
        end = gb
    buf[:, :, :, end:].zero_()
    return buf


def _offsets(chunks: np.ndarray, plan: Plan):
    """Row offset of each chunk in a buffer holding ``chunks`` back to back."""
    starts = dict(zip(chunks.tolist(), np.r_[0, np.cumsum(plan.chunk_len[chunks])[:-1]].tolist()))
    return starts.__getitem__


def _shifted_layouts(plan: Plan, rank: int, qa: int, qb: int, ka: int, kb: int):
    """_trimmed(...) of the query run [qa, qb) against the keys [ka, kb) placed at 0 (shift-invariant masks)."""
    key = ("shifted", rank, qa, qb, ka, kb)
    if key not in plan._cache:
        def compile_rows(a, b):
            return [m.compile(b - a, kb - ka, q_offset=a - ka, block_size=plan.block_size) for m in plan.masks]
        plan._cache[key] = _trimmed(plan, compile_rows, qa, qb)
    return plan._cache[key]


def _calls(plan: Plan, geo: _RankGeometry, step: int, chunks: np.ndarray, segments: list):
    """(kmax, [(query run, segment index or -1 for the step's zero buffer, layouts, r0, r1)]): one step's
    kernel calls, each on rows [r0, r1) of its query run."""
    if not segments:
        return 0, []
    if _shift_invariant(plan):
        calls = []
        for i, (qa, qb, _) in enumerate(geo.q_runs):
            for j, (ga, gb, _, _, _) in enumerate(segments):
                got = _shifted_layouts(plan, geo.rank, qa, qb, ga, gb)
                if got is not None:
                    calls.append((i, j) + got)
        return 0, calls
    kmax, per_run = _step_layouts(plan, geo.rank, step, chunks)
    return kmax, [(i, -1) + got for i, got in enumerate(per_run) if got is not None]


def _call_kv(segments, kmax: int, kv: dict, j: int, buf: list):
    """(k, v) of one call: a received segment's view (j >= 0), or the step's zero buffer over positions
    0..kmax (j < 0), built on first use and kept in ``buf[0]`` for the step's other calls."""
    if j < 0:
        if buf[0] is None:
            buf[0] = _kv_buffer(segments, kmax, kv)
        return buf[0][0], buf[0][1]
    _, _, src, a, b = segments[j]
    return kv[src][0, :, :, a:b], kv[src][1, :, :, a:b]


def _step_forward(plan: Plan, geo: _RankGeometry, q, kv: dict, step: tuple, scale, enable_gqa, acc, backend):
    """Attention of every local query run against one step's keys, merged into ``acc``."""
    from ..engines import attention as am_attention
    index, chunks, segments = step
    kmax, calls = _calls(plan, geo, index, chunks, segments)
    buf = [None]
    for i, j, lays, r0, r1 in calls:
        k, v = _call_kv(segments, kmax, kv, j, buf)
        qa, qb, lo = geo.q_runs[i]
        o, l = am_attention(q[:, :, lo + r0:lo + r1], k, v, lays, scale=scale, enable_gqa=enable_gqa,
                            return_lse=True, backend=backend)
        if o.dtype in (torch.float16, torch.bfloat16):
            o = o.float()                                   # merge in float32
        acc[i] = _merge_rows(acc[i], r0, r1, qb - qa, (o, l if l.dtype == torch.float64 else l.float()))
    return acc


def _step_backward(plan: Plan, geo: _RankGeometry, q, kv: dict, step: tuple, scale: float, merged, dout,
                   dq, dkv: dict) -> None:
    """Add one step's dQ (into ``dq``) and dK/dV (into ``dkv[source]``), piece by piece.

    Each piece's share of the gradient is FlashAttention's backward over its keys with the *merged*
    output and log-sum-exp of its rows (softmax over the whole row restricted to the piece), so no
    gradient flows through the merge: the engine's fused kernel runs, as on one process.
    """
    from ..engines.autograd import blocksparse_backward
    index, chunks, segments = step
    kmax, calls = _calls(plan, geo, index, chunks, segments)
    buf, dbuf = [None], None
    B, H = q.shape[:2]
    for i, j, lays, r0, r1 in calls:
        k, v = _call_kv(segments, kmax, kv, j, buf)
        lo = geo.q_runs[i][2]
        rows = slice(lo + r0, lo + r1)
        if plan.per_head:
            layouts, heads = list(lays), torch.arange(H).expand(B, H)
        else:
            layouts, heads = [lays], torch.zeros(B, H, dtype=torch.int64)
        out, lse = (t[:, :, r0:r1] for t in merged[i])
        gq, gk, gv = blocksparse_backward(q[:, :, rows], k, v, out, lse, dout[:, :, rows], layouts, heads, scale)
        dq[:, :, rows] += gq
        if j < 0:
            if dbuf is None:
                dbuf = [gk, gv]                 # the first call's gradients (new tensors) hold the sum
            else:
                dbuf[0] += gk
                dbuf[1] += gv
        else:
            _, _, src, a, b = segments[j]
            dkv[src][0, :, :, a:b] += gk
            dkv[src][1, :, :, a:b] += gv
    if dbuf is not None:
        for ga, gb, src, lo, hi in segments:
            dkv[src][0, :, :, lo:hi] += dbuf[0][:, :, ga:gb]
            dkv[src][1, :, :, lo:hi] += dbuf[1][:, :, ga:gb]


def _forward(plan: Plan, geo: _RankGeometry, q, kv_local, group, scale, enable_gqa, grad: bool, backend: str):
    """The forward on one rank: (out [B, H, n, D], merged [(out, lse) per query run], received
    {source: kv [2, B, Hkv, m, D]}, steps [(index, chunks, segments)])."""
    rank, W = geo.rank, plan.world_size
    acc = [None] * len(geo.q_runs)
    received: dict[int, torch.Tensor] = {}
    kv = {rank: kv_local}
    steps = []

    def compute(step):
        steps.append(step)
        _step_forward(plan, geo, q, kv, step, scale, enable_gqa, acc, backend)

    own = (0, geo.own_needed, _segments(geo.own_needed, geo.local_start.__getitem__, rank, plan))
    if plan.schedule == "allgather":
        longest = max(plan.local_length(r) for r in range(W))
        pad = longest - kv_local.shape[3]
        mine = kv_local.detach()
        if pad:
            mine = torch.cat([mine, mine.new_zeros(mine.shape[:3] + (pad, mine.shape[4]))], dim=3)
        bufs = [torch.empty_like(mine) for _ in range(W)]
        work = _comm(lambda: dist.all_gather(bufs, mine.contiguous(), group=group, async_op=True), rank,
                     "the K/V all-gather")
        compute(own)
        _comm(lambda: work.wait(), rank, "the K/V all-gather")
        segments, chunks = [], []
        for s in geo.recv:
            other = _geometry(plan, s)
            rows = other.local_rows(geo.recv[s], plan).to(q.device)
            leaf = bufs[s].index_select(3, rows)
            if grad:
                leaf.requires_grad_(True)
            received[s] = kv[s] = leaf
            segments += _segments(geo.recv[s], _offsets(geo.recv[s], plan), s, plan)
            chunks.append(geo.recv[s])
        if chunks:
            compute((1, np.sort(np.concatenate(chunks)), segments))
    else:
        sources = [s for (s,) in geo.steps[1:]]
        recv_bufs = {s: kv_local.new_empty(kv_local.shape[:3] + (int(plan.tokens[rank, s]), kv_local.shape[4]))
                     for s in sources}
        detached = kv_local.detach()

        def ops_for(pairs_send, pairs_recv):
            ops = []
            for d in pairs_send:
                rows = geo.local_rows(geo.send[d], plan).to(q.device)
                ops.append(dist.P2POp(dist.isend, detached.index_select(3, rows).contiguous(), d, group))
            for s in pairs_recv:
                ops.append(dist.P2POp(dist.irecv, recv_bufs[s], s, group))
            return ops

        def post(ops):
            if not ops:
                return []
            works = _comm(lambda: dist.batch_isend_irecv(ops), rank, "posting the K/V sends")
            return works if len(works) == len(ops) else [works[-1]] * len(ops)   # NCCL coalesces into one

        waits: dict[int, object] = {}
        if plan.schedule == "grouped":
            sends = list(geo.send)
            works = post(ops_for(sends, sources))
            waits = {s: works[len(sends) + i] for i, s in enumerate(sources)}
            pending_sends = works[:len(sends)]
        else:   # ring: step t sends to rank + t and receives from rank - t, posted one step ahead
            pending_sends = []

            def post_step(t):
                d, s = (rank + t) % W, (rank - t) % W
                sd = [d] if d in geo.send else []
                rs = [s] if s in recv_bufs else []
                works = post(ops_for(sd, rs))
                pending_sends.extend(works[:len(sd)])
                for i, src in enumerate(rs):
                    waits[src] = works[len(sd) + i]
            post_step(1)
        compute(own)
        for t in range(1, W):
            if plan.schedule == "ring" and t + 1 < W:
                post_step(t + 1)
            s = (rank - t) % W
            if s not in recv_bufs:
                continue
            _comm(lambda: waits[s].wait(), rank, f"receiving K/V chunks from rank {s}")
            leaf = recv_bufs[s]
            if grad:
                leaf.requires_grad_(True)
            received[s] = kv[s] = leaf
            compute((t, geo.recv[s], _segments(geo.recv[s], _offsets(geo.recv[s], plan), s, plan)))
        for w in pending_sends:
            _comm(lambda: w.wait(), rank, "sending K/V chunks")

    B, H, _, D = q.shape
    outs = []
    for (qa, qb, _), a in zip(geo.q_runs, acc):
        outs.append(q.new_zeros((B, H, qb - qa, D)) if a is None else a[0].to(q.dtype))
    return torch.cat(outs, dim=2), acc, received, steps


#: Devices whose backward runs piece by piece on the block-sparse engine with the merged out and lse
#: (the fused kernel, as on one process). Elsewhere (FlexAttention on CUDA) autograd differentiates the
#: pieces and the merge, which also sends gradients through each piece's lse.
_PIECEWISE_BACKWARD_DEVICES = ("cpu",)


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, geo, group, scale, enable_gqa):
        grad = any(ctx.needs_input_grad[:3])
        piecewise = q.device.type in _PIECEWISE_BACKWARD_DEVICES
        # the piecewise backward needs the engine that made the forward's lse: the block-sparse one
        backend = "blocksparse" if piecewise else "auto"
        ctx.plan, ctx.geo, ctx.group, ctx.piecewise = plan, geo, group, piecewise
        if piecewise or not grad:
            with torch.no_grad():
                kv_local = torch.stack([k, v])                 # [2, B, Hkv, n, D]
                out, merged, received, steps = _forward(plan, geo, q, kv_local, group, scale, enable_gqa,
                                                        False, backend)
            if grad:
                ctx.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
                ctx.state = (q, kv_local, merged, received, steps)
            return out
        with torch.enable_grad():
            q_leaf = q.detach().requires_grad_(True)
            k_leaf = k.detach().requires_grad_(True)
            v_leaf = v.detach().requires_grad_(True)
            kv_local = torch.stack([k_leaf, v_leaf])
            out, _, received, _ = _forward(plan, geo, q_leaf, kv_local, group, scale, enable_gqa, True, backend)
        ctx.graph = (out, q_leaf, k_leaf, v_leaf, received)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        plan, geo, group = ctx.plan, ctx.geo, ctx.group
        if ctx.piecewise:
            return _piecewise_backward(ctx, grad_out)
        out, q_leaf, k_leaf, v_leaf, received = ctx.graph
        del ctx.graph
        sources = sorted(received)
        inputs = [q_leaf, k_leaf, v_leaf] + [received[s] for s in sources]
        with torch.enable_grad():
            got = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        dq, dk, dv = (torch.zeros_like(t) if g is None else g for t, g in zip(inputs[:3], got[:3]))
        dkv_local = torch.stack([dk, dv])
        incoming, works = _post_dkv_receives(plan, geo, group, dkv_local)
        for s, g in zip(sources, got[3:]):
            works += _post_dkv_send(torch.zeros_like(received[s]) if g is None else g, s, geo, group)
        _finish_dkv(plan, geo, works, incoming, dkv_local)
        return dq, dkv_local[0], dkv_local[1], None, None, None, None, None


def _piecewise_backward(ctx, grad_out):
    """The CPU backward: each step's pieces with the merged out and lse; dK/dV sent as each step ends."""
    plan, geo, group = ctx.plan, ctx.geo, ctx.group
    q, kv_local, merged, received, steps = ctx.state
    del ctx.state
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32   # the engine's compute dtype
    qc, doc = q.to(cd), grad_out.to(cd)
    kv = {geo.rank: kv_local.to(cd)}
    kv.update({s: t.to(cd) for s, t in received.items()})
    dq = torch.zeros_like(qc)
    dkv = {s: torch.zeros_like(t) for s, t in kv.items()}
    # Readers' dK/dV receives first; then the received keys' steps, each source's dK/dV sent as soon as
    # its step is done (the return overlaps the rest of the compute); own keys last.
    incoming, works = _post_dkv_receives(plan, geo, group, dkv[geo.rank])
    unsent = set(received)
    for step in steps[1:] + steps[:1]:
        _step_backward(plan, geo, qc, kv, step, ctx.scale, merged, doc, dq, dkv)
        for s in sorted(unsent & {seg[2] for seg in step[2]}):
            works += _post_dkv_send(dkv[s], s, geo, group)
            unsent.discard(s)
    for s in sorted(unsent):                   # read nothing from s after all (an all-gather of no chunk)
        works += _post_dkv_send(dkv[s], s, geo, group)
    dkv_local = dkv[geo.rank]
    _finish_dkv(plan, geo, works, incoming, dkv_local)
    return (dq.to(q.dtype), dkv_local[0].to(kv_local.dtype), dkv_local[1].to(kv_local.dtype),
            None, None, None, None, None)


# dK/dV go back to the owners of the keys: rank sends each source the gradient of what it read from it
# ([2, B, Hkv, m, D], rows in the order received) and adds its readers' contributions to its own rows.

def _post_dkv_receives(plan: Plan, geo: _RankGeometry, group, like: torch.Tensor):
    incoming = {}
    ops = []
    for d, chunks in geo.send.items():
        n = int(plan.chunk_len[chunks].sum())
        incoming[d] = like.new_empty(like.shape[:3] + (n, like.shape[4]))
        ops.append(dist.P2POp(dist.irecv, incoming[d], d, group))
    works = _comm(lambda: dist.batch_isend_irecv(ops), geo.rank, "posting the dK/dV receives") if ops else []
    return incoming, list(works)


def _post_dkv_send(g: torch.Tensor, source: int, geo: _RankGeometry, group) -> list:
    op = dist.P2POp(dist.isend, g.contiguous(), source, group)
    return list(_comm(lambda: dist.batch_isend_irecv([op]), geo.rank, f"sending dK/dV to rank {source}"))


def _finish_dkv(plan: Plan, geo: _RankGeometry, works: list, incoming: dict, dkv_local: torch.Tensor) -> None:
    for w in works:
        _comm(lambda: w.wait(), geo.rank, "returning dK/dV to their owners")
    for d, g in incoming.items():
        dkv_local.index_add_(3, geo.local_rows(geo.send[d], plan).to(dkv_local.device), g)


def attention(q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, plan: Plan, group=None,
              enable_gqa: bool = False, scale: float | None = None) -> torch.Tensor:
    """Masked attention of this rank's queries over the whole sequence held across ``group``.

    ``q_local`` ``[B, H, n, D]``, ``k_local``/``v_local`` ``[B, Hkv, n, D]``:
    this rank's rows as :func:`shard` lays them out (n = ``plan.local_length(rank)``).
    Returns this rank's output rows ``[B, H, n, D]``, exactly what
    ``attnmask.attention`` gives on the full tensors. Differentiable: dQ stays
    local, dK/dV of the chunks other ranks read come back to this rank and are
    added. Every rank of ``group`` must call it with the same plan (checked).

    A runnable example needs a process group; see tests/test_distributed.py
    and the README. With a group of one::

        >>> import os, torch, torch.distributed as dist, attnmask as am
        >>> from attnmask import distributed as cp
        >>> os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        >>> store = dist.HashStore()
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> p = cp.plan(am.causal, 256, 1, block_size=64)
        >>> q = torch.randn(1, 2, 256, 16)
        >>> torch.allclose(cp.attention(q, q, q, p), am.attention(q, q, q, am.causal), atol=1e-6)
        True
        >>> dist.destroy_process_group()
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be a cp.plan(...) result, got {type(plan).__name__}")
    for name, t in (("q_local", q_local), ("k_local", k_local), ("v_local", v_local)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise MaskValueError(f"{name} must be a 4-D tensor [B, H, n, D], got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    rank, W = _rank_world(plan, group)
    _check_group(plan, q_local, k_local, v_local, rank, W, group, enable_gqa)
    geo = _geometry(plan, rank)
    return _ContextParallelAttention.apply(q_local, k_local, v_local, plan, geo, group, scale, enable_gqa)
