"""The context-parallel planner: who owns which query chunks, who needs which key chunks, and when.

Everything is decided from the mask's :class:`~attnmask.BlockLayout` alone, so
every rank computes the same plan without talking to the others:

1. The sequence is cut into chunks of ``block_size`` positions (the layout's
   query/key blocks; the last chunk may be short). A rank owns whole chunks of
   q, k and v at the same positions.
2. Exact work: the attended (query, key) pairs of every (query chunk, key
   chunk) tile, read from the layout's runs (full runs by arithmetic, partial
   tiles by exact counts). Nothing is O(N^2): a 1M-token causal mask is 16K
   runs, never 33M tiles.
3. Assignment strategies over chunks: ``contiguous`` (equal tokens),
   ``zigzag`` (head-tail pairs of 2W segments), ``ptrr`` (torch's
   processing-time round robin: non-empty tiles per chunk, snake order),
   ``greedy`` (longest-processing-time min-heap over exact chunk pairs, as
   MagiAttention's static solver does), ``balanced`` (contiguous cuts: keeps
   key/value traffic local for windows and documents; at equal cumulative
   pairs nudged to cuts few keys cross, or at equal pairs plus kernel calls,
   whichever simulates faster).
4. Exchange schedules: ``allgather`` (every shard to every rank),
   ``grouped`` (each rank sends each other rank exactly the chunks it needs,
   all at once), ``ring`` (the same needed-only sends in W-1 steps by ring
   distance, each step's transfer overlapping the previous step's compute).
5. A cost model (:class:`CostModel`, in units of one attended pair's compute)
   simulates each rank's timeline, including the waits for data before each
   step and the kernel calls the runtime makes; ``strategy="auto"`` /
   ``schedule="auto"`` take the cheapest. :meth:`Plan.simulation_under`
   re-simulates with calls free or one call per step (:data:`CALL_RULES`), so
   that strategies the runtime would run with many calls compare fairly.

    >>> import attnmask as am
    >>> from attnmask import distributed as cp
    >>> p = cp.plan(am.causal, 65536, 4, block_size=128)
    >>> p.imbalance() < 1.01
    True
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import MaskValueError
from ..kinds import StructureClass
from ..masks import Mask

__all__ = ["CostModel", "Plan", "PlanError", "plan", "compare", "shift_invariant", "STRATEGIES", "SCHEDULES",
           "BASELINES", "CALL_RULES"]

STRATEGIES = ("balanced", "greedy", "zigzag", "contiguous", "ptrr")
SCHEDULES = ("grouped", "ring", "allgather")
BASELINES = ("contiguous", "zigzag", "ptrr")
#: How the simulation charges kernel calls (``CostModel.call_cost`` each): ``"runtime"``, as attnmask's
#: runtime makes them (one per query run x key run of each step: scattered chunks pay many);
#: ``"per_step"``, one per step that has work (what a runtime running a step's pieces in one kernel call
#: would pay, charged alike to every strategy); ``"free"``, none (balance, transfers and waits only).
CALL_RULES = ("runtime", "per_step", "free")

# tile_counts() expands every non-empty tile; above this many tiles partial tiles are counted another way.
_TILE_COUNT_LIMIT = 4_000_000


class PlanError(MaskValueError):
    """A plan cannot be made or used as asked (sizes, ranks, strategy names)."""


@dataclass(frozen=True)
class CostModel:
    """Relative costs the planner simulates with, in units of one attended pair's compute.

    ``token_cost``: moving one token's K and V into a rank. A pair costs
    ``4 H D`` flops and a token ``2 Hkv D s`` bytes (s bytes per element), so
    ``token_cost = (Hkv s / 2 H) * (flops per second / bytes per second)``.
    The default, 1000, is a GPU with NVLink-class links in bf16 without GQA
    (~500 TFLOP/s against ~500 GB/s); a CPU over loopback gloo is nearer 20.
    ``message_cost``: the fixed cost of one message (latency). ``call_cost``:
    the fixed cost of one kernel call; the runtime makes one per (query run,
    key run) of each step, so scattered assignments pay it many times.
    Defaults: ~20 us per message and per call on a GPU.
    :meth:`cpu_gloo` is this project's 2-core CPU over loopback gloo (H=8, D=64,
    float32: ~29 ns a pair, ~0.5 ms a call).

        >>> CostModel().token_cost, CostModel.cpu_gloo().call_cost
        (1000.0, 20000.0)
    """
    token_cost: float = 1000.0
    message_cost: float = 1e5
    call_cost: float = 5e5

    @classmethod
    def cpu_gloo(cls) -> "CostModel":
        return cls(token_cost=20.0, message_cost=2e3, call_cost=2e4)

    def __post_init__(self):
        for name in ("token_cost", "message_cost", "call_cost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PlanError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))


# -- exact work from the layout ----------------------------------------------------------------------

@dataclass
class _Work:
    """Exact pair counts of one shape, independent of the assignment."""
    chunk_len: np.ndarray           # int64 [C]   positions per chunk
    chunk_pairs: np.ndarray         # int64 [C]   pairs of each query chunk (all heads)
    chunk_tiles: np.ndarray         # int64 [C]   non-empty tiles per query chunk (all heads), for PTRR
    full_runs: list                 # per distinct mask: (qb, k0, k1, heads) full runs
    partial: tuple                  # (qb, kb, pairs) int64 arrays of every partial tile (all heads)
    need_runs: tuple                # (qb, k0, k1) of every non-empty run (all heads)
    total_pairs: int


def _layout_work(layouts, weights) -> _Work:
    """Exact counts over ``layouts`` (one per distinct mask), each counted ``weights[i]`` times (its heads)."""
    first = layouts[0]
    n, bq, bk = first.n_q_blocks, first.block_q, first.block_k
    L = first.q_len
    chunk_len = np.minimum(bq, L - np.arange(n, dtype=np.int64) * bq)
    chunk_pairs = np.zeros(n, np.int64)
    chunk_tiles = np.zeros(n, np.int64)
    full_runs, partials, need = [], [], []
    for lay, w in zip(layouts, weights):
        rows = lay.row_counts().numpy()
        block_pairs = np.add.reduceat(rows, np.arange(0, L, bq)) if L else np.zeros(0, np.int64)
        chunk_pairs += w * block_pairs
        qb = lay.run_q_blocks().numpy()
        k0, k1, st = lay.run_start.numpy(), lay.run_end.numpy(), lay.run_state.numpy()
        chunk_tiles += w * np.bincount(qb, weights=k1 - k0, minlength=n).astype(np.int64)
        need.append((qb, k0, k1))
        full = st == 2
        fq, f0, f1 = qb[full], k0[full], k1[full]
        full_runs.append((fq, f0, f1, w))
        # keys covered by a run: key blocks are chunks too, the last one short
        key_end = np.minimum(f1 * bk, lay.kv_len) - f0 * bk
        full_pairs_per_block = np.bincount(fq, weights=chunk_len[fq] * key_end, minlength=n).astype(np.int64)
        part = ~full
        pq, p0, p1 = qb[part], k0[part], k1[part]
        # expand partial runs to tiles (partial tiles are few: diagonals, window edges, document ends)
        lens = p1 - p0
        tq = np.repeat(pq, lens)
        tk = np.repeat(p0 - np.cumsum(np.r_[0, lens[:-1]]), lens) + np.arange(lens.sum())
        tc = np.zeros(len(tq), np.int64)
        per_block = np.bincount(tq, minlength=n)
        single = per_block[tq] == 1
        # a query block with one partial tile: its count is the block's pairs minus its full tiles'
        tc[single] = block_pairs[tq[single]] - full_pairs_per_block[tq[single]]
        rest = np.nonzero(~single)[0]
        if len(rest):
            tc[rest] = _partial_counts(lay, tq[rest], tk[rest])
        partials.append((tq, tk, w * tc))
    partial = tuple(np.concatenate([p[i] for p in partials]) for i in range(3))
    need_runs = tuple(np.concatenate([r[i] for r in need]) for i in range(3))
    return _Work(chunk_len, chunk_pairs, chunk_tiles, full_runs, partial, need_runs, int(chunk_pairs.sum()))


def _partial_counts(lay, tq: np.ndarray, tk: np.ndarray) -> np.ndarray:
    """Exact attended cells of the given partial tiles."""
    if lay.blocks_full + lay.blocks_partial <= _TILE_COUNT_LIMIT:
        aq, ak, ac = (t.numpy() for t in lay.tile_counts())
        key_all = aq * lay.n_kv_blocks + ak
        order = np.argsort(key_all, kind="stable")
        pos = np.searchsorted(key_all[order], tq * lay.n_kv_blocks + tk)
        return ac[order][pos].astype(np.int64)
    out = np.empty(len(tq), np.int64)
    step = 256                       # 256 tiles x 128 x 128 cells = 4M bools at a time
    for i in range(0, len(tq), step):
        m = lay.tile_masks(torch.from_numpy(tq[i:i + step]), torch.from_numpy(tk[i:i + step]))
        out[i:i + step] = m.sum(dim=(1, 2)).numpy()
    return out


# -- assignment strategies ---------------------------------------------------------------------------

def _contiguous(n: int, W: int, **_) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * W // n).astype(np.int32)


def _zigzag(n: int, W: int, **_) -> np.ndarray:
    seg = (np.arange(n, dtype=np.int64) * (2 * W) // n)
    return np.where(seg < W, seg, 2 * W - 1 - seg).astype(np.int32)


def _ptrr(n: int, W: int, work: _Work, **_) -> np.ndarray:
    # torch's _PTRRLoadBalancer rule: process time = non-empty kv blocks of the query block; sort descending
    # (stable), deal in rounds of W, reversing every other round (snake).
    order = np.argsort(-work.chunk_tiles, kind="stable")
    owner = np.empty(n, np.int32)
    rnd, pos = np.divmod(np.arange(n), W)
    owner[order] = np.where(rnd % 2 == 0, pos, W - 1 - pos)
    return owner


def _greedy(n: int, W: int, work: _Work, **_) -> np.ndarray:
    # Longest processing time first onto the least loaded rank (ties: lowest rank) -> deterministic.
    order = np.argsort(-work.chunk_pairs, kind="stable")
    heap = [(0, r) for r in range(W)]
    owner = np.empty(n, np.int32)
    pairs = work.chunk_pairs
    for c in order:
        load, r = heapq.heappop(heap)
        owner[c] = r
        heapq.heappush(heap, (load + int(pairs[c]), r))
    return owner


def _crossing_tokens(work: _Work) -> tuple[np.ndarray, np.ndarray]:
    """(rightward, leftward), int64 [C + 1] each: K/V positions that must cross a cut placed before chunk i.

    rightward[i]: keys left of the cut (k < i) that a query chunk right of it reads (k < i <= max
    reader); leftward[i]: keys right of it read from the left (min reader < i <= k). Readers per key
    chunk come from the runs (painted in order of query block, each key chunk once).
    """
    n = len(work.chunk_len)
    qb, k0, k1 = work.need_runs
    out = []
    for pick in ("max", "min"):
        cross = np.zeros(n + 2, np.int64)
        reader = _extreme_reader(qb, k0, k1, n, last=pick == "max")
        k = np.nonzero(reader >= 0)[0]
        r = reader[k]
        lo, hi = (k + 1, r + 1) if pick == "max" else (r + 1, k + 1)   # cuts i in [lo, hi)
        ok = lo < hi
        np.add.at(cross, lo[ok], work.chunk_len[k[ok]])
        np.add.at(cross, hi[ok], -work.chunk_len[k[ok]])
        out.append(np.cumsum(cross)[:n + 1])
    return out[0], out[1]


def _extreme_reader(qb, k0, k1, n: int, last: bool) -> np.ndarray:
    """int64 [C]: the last (or first) query chunk reading each key chunk, -1 if none."""
    order = np.argsort(-qb if last else qb, kind="stable")
    reader = np.full(n, -1, np.int64)
    nxt = np.arange(n + 1)          # next unpainted key chunk at or after i (path-halving union-find)

    def find(i):
        while nxt[i] != i:
            nxt[i] = nxt[nxt[i]]
            i = nxt[i]
        return i

    for j in order.tolist():
        a, b, q = int(k0[j]), int(k1[j]), int(qb[j])
        i = find(a)
        while i < b:
            reader[i] = q
            nxt[i] = i + 1
            i = find(i + 1)
    return reader


# Balanced cuts may move off the exact target by this share of the mean rank's pairs to avoid traffic.
_CUT_SLACK = 0.015


def _balanced(n: int, W: int, work: _Work, cost: "CostModel", **_) -> list[np.ndarray]:
    """Contiguous cuts, two candidates (the planner keeps the one its simulation finds faster).

    1. Cuts where the cumulative pairs cross k/W of the total; within a small slack, the cut that the
       fewest K/V positions must cross (a document boundary, a window's edge).
    2. Cuts that balance pairs plus kernel calls: a rank reading keys across one of its cuts makes one
       more call (``cost.call_cost``), so when a call costs a few percent of a rank's work a cut at a
       document boundary a little off the pair target can beat an exact one inside a document.
    Windows and documents then move keys only between neighbours, if at all.
    """
    cum = np.r_[0, np.cumsum(work.chunk_pairs)]            # cum[i]: pairs of chunks < i
    rightward, leftward = _crossing_tokens(work)
    last_reader = _extreme_reader(*work.need_runs, n, last=True)
    return [_owner_of_bounds(_slack_cuts(cum, rightward + leftward, W), n),
            _owner_of_bounds(_call_aware_cuts(cum, last_reader, leftward > 0, W, cost.call_cost), n)]


def _slack_cuts(cum: np.ndarray, cross: np.ndarray, W: int) -> list[int]:
    n = len(cum) - 1
    total = int(cum[-1])
    slack = _CUT_SLACK * total / W
    bounds = [0]
    for k in range(1, W):
        target = total * k / W
        lo = int(np.searchsorted(cum, target - slack, side="left"))
        hi = int(np.searchsorted(cum, target + slack, side="right"))
        cand = np.arange(max(lo, 1), max(hi, lo + 1))
        if not len(cand):
            cand = np.array([int(np.argmin(np.abs(cum - target)))])
        # fewest crossing positions, then nearest the target
        best = cand[np.lexsort((np.abs(cum[cand] - target), cross[cand]))[0]]
        c = max(int(best), bounds[-1] + 1)                  # non-empty
        c = min(c, n - (W - k))                             # leave a chunk for each later rank
        bounds.append(c)
    return bounds + [n]


def _call_aware_cuts(cum: np.ndarray, last_reader: np.ndarray, reads_right: np.ndarray, W: int,
                     call: float) -> list[int]:
    """Bounds minimising the largest ``pairs + call * calls`` of a rank; bisection on that largest cost,
    and at each trial value every rank takes the furthest cut that fits.

    Calls: one for its own keys, one per earlier rank holding a key chunk that a query at or after the
    rank's start reads (``last_reader[k]``: the last query chunk reading key chunk k, -1 if none; the
    readers of a key are taken to be an interval, as for causal, windows, sinks and documents), and one
    when the rank ending at i reads keys at or after i (``reads_right[i]``).
    """
    n = len(cum) - 1
    clean = np.where(~reads_right, np.arange(n + 1), -1)
    last_clean = np.maximum.accumulate(clean)               # last cut <= i that the left rank reads not across

    def cuts(limit: float) -> list[int] | None:
        bounds, reach = [0], []                             # reach[s]: last query chunk reading rank s's keys
        for r in range(W):
            a = bounds[-1]
            calls = 1 + sum(1 for x in reach if x >= a)
            if r == W - 1:
                return bounds + [n] if cum[n] - cum[a] + call * calls <= limit else None
            room = cum[a] + limit - call * calls
            top = n - (W - 1 - r)                            # leave a chunk for each later rank
            crossed = min(int(np.searchsorted(cum, room - call, side="right")) - 1, top)
            plain = int(last_clean[min(int(np.searchsorted(cum, room, side="right")) - 1, top)])
            b = max(crossed, plain)
            if b <= a:
                return None
            bounds.append(b)
            reach.append(int(last_reader[a:b].max()))
        return None

    lo, hi = cum[-1] / W, cum[-1] + (W + 1) * call
    best = cuts(hi)
    for _ in range(48):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        got = cuts(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return best


def _owner_of_bounds(bounds: list[int], n: int) -> np.ndarray:
    owner = np.empty(n, np.int32)
    for r in range(len(bounds) - 1):
        owner[bounds[r]:bounds[r + 1]] = r
    return owner


_ASSIGN = {"contiguous": _contiguous, "zigzag": _zigzag, "ptrr": _ptrr, "greedy": _greedy, "balanced": _balanced}


# -- who computes what with whose keys ---------------------------------------------------------------

def _exchange(work: _Work, owner: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [W, W]: rank r's pairs against keys owned by s; need bool [W, C]: key chunks r reads)."""
    n = len(owner)
    pairs = np.zeros((W, W), np.float64)
    # full runs: rows x keys of each source in [k0, k1), via per-source prefix sums of chunk lengths
    keys_by_src = np.zeros((W, n + 1), np.int64)
    np.add.at(keys_by_src, (owner, np.arange(1, n + 1)), work.chunk_len)
    np.cumsum(keys_by_src, axis=1, out=keys_by_src)
    for fq, f0, f1, w in work.full_runs:
        if len(fq):
            contrib = w * work.chunk_len[fq][:, None] * (keys_by_src[:, f1] - keys_by_src[:, f0]).T   # [runs, W]
            np.add.at(pairs, owner[fq], contrib.astype(np.float64))
    tq, tk, tc = work.partial
    np.add.at(pairs, (owner[tq], owner[tk]), tc.astype(np.float64))
    qb, k0, k1 = work.need_runs
    diff = np.zeros((W, n + 1), np.int32)
    np.add.at(diff, (owner[qb], k0), 1)
    np.add.at(diff, (owner[qb], k1), -1)
    need = np.cumsum(diff[:, :n], axis=1) > 0
    return pairs, need


# -- schedules and their simulation ------------------------------------------------------------------

@dataclass
class Simulation:
    """One schedule's simulated timeline (units: one attended pair's compute).

    ``finish[r]``: when rank r is done. ``waits[r]``: per step of rank r, the
    time it sat waiting for data before computing that step. ``ideal``: total
    pairs / world size (perfect balance, no waiting).
    """
    schedule: str
    finish: np.ndarray
    waits: list
    ideal: float

    @property
    def time(self) -> float:
        return float(self.finish.max()) if len(self.finish) else 0.0

    @property
    def ratio(self) -> float:
        """Simulated step time over the ideal."""
        return float(self.time / self.ideal) if self.ideal > 0 else 1.0

    @property
    def max_wait(self) -> float:
        return max((max(w) if w else 0.0) for w in self.waits)

    @property
    def total_wait(self) -> np.ndarray:
        return np.array([sum(w) for w in self.waits])


def _tokens_needed(need: np.ndarray, owner: np.ndarray, chunk_len: np.ndarray, W: int) -> np.ndarray:
    """int64 [W, W]: tokens rank r receives from rank s (needed chunks only; 0 on the diagonal)."""
    tokens = np.zeros((W, W), np.int64)
    for r in range(W):
        tokens[r] = np.bincount(owner, weights=need[r] * chunk_len, minlength=W).astype(np.int64)
    np.fill_diagonal(tokens, 0)
    return tokens


# Masks of the offset q - k alone (structure class D, or constant) mean the same after shifting q and k by
# one offset, so the runtime runs a piece on its keys alone with q_offset = (first query - first key): one
# kernel call per (query run, key run). Other masks get a step's keys in a zero buffer at their global
# positions: one call per query run and step.
_SHIFT_INVARIANT = (StructureClass.D, StructureClass.CONST)


def shift_invariant(masks) -> bool:
    """Whether every mask depends on ``q - k`` alone (then pieces run without a zero K/V buffer)."""
    return all(m.structure_class() in _SHIFT_INVARIANT for m in masks)


def _kernel_calls(need: np.ndarray, owner: np.ndarray, pairs: np.ndarray, W: int, per_key_run: bool,
                  one_remote_step: bool) -> np.ndarray:
    """float [W, W]: kernel calls the runtime makes for rank r against source s (an upper bound: pairs of
    query and key runs that attend nothing are counted; tests/test_distributed.py checks it against the
    runtime).

    ``per_key_run``: its query runs x s's key runs it reads; else one per query run per step (the
    zero-buffer path), a step being one source, or all other sources at once (``one_remote_step``:
    all-gather), spread over them.
    """
    change = np.r_[True, owner[1:] != owner[:-1]]
    q_runs = np.bincount(owner[change], minlength=W).astype(np.float64)
    has = pairs > 0
    if not per_key_run:
        calls = q_runs[:, None] * has
        if one_remote_step:
            remote = has & ~np.eye(W, dtype=bool)
            k = remote.sum(1, keepdims=True)
            spread = np.divide(q_runs[:, None] * remote, k, out=np.zeros((W, W)), where=k > 0)
            calls = np.where(np.eye(W, dtype=bool), calls, spread)
        return calls
    calls = np.zeros((W, W))
    for r in range(W):
        read = need[r]
        starts = read & (np.r_[True, ~read[:-1]] | change)
        calls[r] = q_runs[r] * np.bincount(owner[starts], minlength=W)
    return np.where(has, calls, 0.0)


def _simulate(schedule: str, pairs: np.ndarray, tokens: np.ndarray, shard: np.ndarray,
              cost: CostModel, calls: np.ndarray | None = None) -> Simulation:
    W = len(pairs)
    ideal = pairs.sum() / W                      # pure compute, perfectly balanced, no call overhead
    if calls is not None:
        pairs = pairs + cost.call_cost * calls
    local = np.diag(pairs).copy()
    remote = pairs.sum(1) - local
    tc, mc = cost.token_cost, cost.message_cost
    if W == 1:
        return Simulation(schedule, local, [[0.0]], ideal)
    if schedule == "allgather":
        # ring all-gather of whole shards: W-1 rounds, each as long as the biggest shard
        arrive = np.full(W, (W - 1) * (tc * shard.max() + mc))
        start = np.maximum(local, arrive)
        waits = [[0.0, float(max(0.0, arrive[r] - local[r]))] for r in range(W)]
        return Simulation(schedule, start + remote, waits, ideal)
    if schedule == "grouped":
        # Every send is posted at once. A sender's link carries its messages nearest ring distance
        # first, a receiver's link likewise; a message is in when both have carried it. The receiver
        # computes its own keys first, then each source's piece as it comes in (nearest first).
        dist = (np.arange(W)[:, None] - np.arange(W)[None, :]) % W          # [r, s]: ring distance s -> r
        has = tokens > 0
        send_done = np.zeros((W, W))
        recv_done = np.zeros((W, W))
        for s in range(W):
            dst = [r for r in np.argsort(dist[:, s], kind="stable") if has[r, s]]
            cum = np.cumsum([tc * tokens[r, s] + mc for r in dst])
            send_done[dst, s] = cum
        for r in range(W):
            src = [s for s in np.argsort(dist[r], kind="stable") if has[r, s]]
            cum = np.cumsum([tc * tokens[r, s] + mc for s in src])
            recv_done[r, src] = cum
        arrive = np.maximum(send_done, recv_done)
        finish = np.zeros(W)
        waits = []
        for r in range(W):
            end, w = local[r], [0.0]
            for s in np.argsort(dist[r], kind="stable")[1:]:
                if has[r, s] or pairs[r, s] > 0:
                    w.append(float(max(0.0, arrive[r, s] - end)))
                    end = max(end, arrive[r, s]) + pairs[r, s]
            finish[r] = end
            waits.append(w)
        return Simulation(schedule, finish, waits, ideal)
    if schedule == "ring":
        ranks = np.arange(W)
        end = local.copy()                 # rank r's compute so far
        step_start = np.zeros(W)           # when rank r began its current step (it posts the next transfer then)
        send_free = np.zeros(W)
        recv_free = np.zeros(W)
        waits = [[0.0] for _ in range(W)]
        for t in range(1, W):
            src = (ranks - t) % W
            tok = tokens[ranks, src]
            has = tok > 0
            begin = np.maximum(np.maximum(step_start[src], step_start), np.maximum(send_free[src], recv_free))
            done = begin + np.where(has, tc * tok + mc, 0.0)
            arrive = np.where(has, done, 0.0)
            send_free[src[has]] = done[has]
            recv_free[has] = done[has]
            start = np.maximum(end, arrive)
            for r in range(W):
                waits[r].append(float(max(0.0, arrive[r] - end[r])))
            step_start = start
            end = start + pairs[ranks, src]
        return Simulation(schedule, end, waits, ideal)
    raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or 'auto'")


# -- the plan ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class Plan:
    """Which rank owns which chunks, what it needs from whom, and the exchange schedule.

    A plan is a value every rank computes identically from (mask, length,
    world size, block size); :meth:`fingerprint` lets ranks check that they
    agree. Chunk ``c`` covers positions ``[c * block_size, min((c+1) *
    block_size, length))``; ``owner[c]`` is its rank; a rank's local tensors
    hold its chunks in increasing position order (see :func:`shard`).

    ``pairs[r, s]``: attended pairs rank r computes against keys owned by s
    (all heads). ``need[r, c]``: rank r reads key chunk c. ``tokens[r, s]``:
    positions of K/V rank r receives from s under ``schedule`` (all-gather:
    s's whole shard).

        >>> import attnmask as am
        >>> from attnmask import distributed as cp
        >>> p = cp.plan(am.causal & am.sliding(256), 2048, 4, block_size=128)
        >>> p.strategy, p.local_length(0)
        ('balanced', 640)
    """
    masks: tuple
    per_head: bool
    length: int
    world_size: int
    block_size: int
    strategy: str
    schedule: str
    cost: CostModel
    owner: np.ndarray
    pairs: np.ndarray
    need: np.ndarray
    tokens: np.ndarray
    simulation: Simulation
    chunk_len: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    # -- sizes --
    @property
    def n_chunks(self) -> int:
        return len(self.owner)

    @property
    def total_pairs(self) -> int:
        return int(round(self.pairs.sum()))

    def chunks_of(self, rank: int) -> np.ndarray:
        """Chunks rank ``rank`` owns, in position order."""
        self._check_rank(rank)
        return np.nonzero(self.owner == rank)[0]

    def local_length(self, rank: int) -> int:
        """Positions held by ``rank`` (its local sequence length)."""
        return int(self.chunk_len[self.chunks_of(rank)].sum())

    def positions(self, rank: int) -> torch.Tensor:
        """int64 ``[local_length(rank)]``: the global positions of rank's local rows, in order."""
        return torch.cat([torch.arange(a, b) for a, b in self.position_runs(rank)]) if self.length else \
            torch.zeros(0, dtype=torch.int64)

    def position_runs(self, rank: int) -> list[tuple[int, int]]:
        """Rank's positions as maximal runs ``[(start, end), ...]`` of consecutive positions."""
        return _runs_of(self.chunks_of(rank), self.block_size, self.length)

    # -- work --
    def rank_pairs(self) -> np.ndarray:
        """int64 [W]: attended pairs each rank computes."""
        return np.rint(self.pairs.sum(1)).astype(np.int64)

    def imbalance(self) -> float:
        """Busiest rank's pairs over the mean (1.0 is perfect)."""
        p = self.rank_pairs()
        return float(p.max() / p.mean()) if p.mean() > 0 else 1.0

    def received_tokens(self) -> np.ndarray:
        """int64 [W]: K/V positions each rank receives under the schedule."""
        return self.tokens.sum(1)

    def allgather_tokens(self) -> np.ndarray:
        """int64 [W]: what all-gathering the whole K/V would bring each rank (length - own shard)."""
        return np.array([self.length - self.local_length(r) for r in range(self.world_size)], np.int64)

    def simulation_under(self, calls: str = "runtime") -> Simulation:
        """The simulated step under a call rule of :data:`CALL_RULES`, with that rule's cheapest schedule.

        ``"runtime"`` is :attr:`simulation` (what the plan was chosen by). The others make strategies
        comparable: ``"free"`` separates balance and waits from call overhead, ``"per_step"`` charges
        every strategy the same rule.

            >>> import attnmask as am
            >>> from attnmask import distributed as cp
            >>> p = cp.plan(am.causal, 65536, 4, strategy="greedy")
            >>> p.simulation_under("free").ratio < p.simulation_under("per_step").ratio <= p.simulation.ratio
            True
        """
        if calls not in CALL_RULES:
            raise PlanError(f"unknown call rule {calls!r}; choose one of {', '.join(CALL_RULES)}")
        if calls == "runtime":
            return self.simulation
        key = ("simulation", calls)
        if key not in self._cache:
            needed = _tokens_needed(self.need, self.owner, self.chunk_len, self.world_size)
            shard = np.bincount(self.owner, weights=self.chunk_len, minlength=self.world_size).astype(np.int64)
            self._cache[key] = _best_schedule("auto", calls, self.owner, self.pairs, self.need, needed, shard,
                                              self.cost, shift_invariant(self.masks))[0]
        return self._cache[key]

    # -- runtime steps --
    def steps(self, rank: int) -> list[tuple[int, ...]]:
        """Rank's compute steps in order, each the source ranks whose keys it uses (step 0: its own)."""
        self._check_rank(rank)
        W = self.world_size
        if self.schedule == "allgather":
            return [(rank,), tuple(s for s in range(W) if s != rank)]
        # nearest ring distance first; sources whose keys rank never reads are skipped
        return [(rank,)] + [((rank - t) % W,) for t in range(1, W) if self.tokens[rank, (rank - t) % W] > 0]

    def needed_chunks(self, rank: int, source: int) -> np.ndarray:
        """Chunks owned by ``source`` that ``rank`` reads (in position order)."""
        self._check_rank(rank)
        self._check_rank(source)
        return np.nonzero(self.need[rank] & (self.owner == source))[0]

    # -- identity --
    def fingerprint(self) -> int:
        """A 63-bit hash of everything ranks must agree on (same on every process and run)."""
        if "fingerprint" not in self._cache:
            h = hashlib.sha256()
            h.update(repr((tuple(str(m) for m in self.masks), self.per_head, self.length, self.world_size,
                           self.block_size, self.strategy, self.schedule)).encode())
            h.update(self.owner.astype(np.int32).tobytes())
            self._cache["fingerprint"] = int.from_bytes(h.digest()[:8], "little") >> 1
        return self._cache["fingerprint"]

    def describe(self) -> str:
        """One line naming the plan (for error messages)."""
        m = "[" + ", ".join(str(x) for x in self.masks) + "]" if self.per_head else str(self.masks[0])
        if len(m) > 80:
            m = m[:77] + "..."
        return (f"plan({m!r}, length={self.length}, world_size={self.world_size}, block_size={self.block_size}, "
                f"strategy={self.strategy!r}, schedule={self.schedule!r}, fingerprint={self.fingerprint():016x})")

    def __repr__(self) -> str:
        return (f"Plan(length={self.length}, world_size={self.world_size}, block_size={self.block_size}, "
                f"strategy={self.strategy!r}, schedule={self.schedule!r}, imbalance={self.imbalance():.4f}, "
                f"step_time/ideal={self.simulation.ratio:.4f})")

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not hasattr(rank, "__index__") or not 0 <= int(rank) < self.world_size:
            raise PlanError(f"rank must be a whole number in [0, {self.world_size}), got {rank!r}")


def _runs_of(chunks: np.ndarray, block: int, length: int) -> list[tuple[int, int]]:
    runs = []
    for c in chunks.tolist():
        a, b = c * block, min((c + 1) * block, length)
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise PlanError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low:
        raise PlanError(f"{name} must be >= {low}, got {value}")
    return value


def _masks_of(mask) -> tuple[tuple, bool]:
    if isinstance(mask, Mask):
        masks, per_head = (mask,), False
    elif isinstance(mask, (list, tuple)) and mask and all(isinstance(m, Mask) for m in mask):
        masks, per_head = tuple(mask), True
    else:
        masks = None
    if masks is not None:
        from ..language import parse
        for m in dict.fromkeys(masks):
            try:
                same = parse(str(m)) == m
            except MaskValueError:
                same = False
            except ValueError:
                same = False
            if not same:
                # the runtime places queries with q_offset; a mask_mod leaf sees row indices, not positions
                raise PlanError(f"cp.plan needs masks written in the mask language; {str(m)[:60]!r} is not "
                                f"(a from_mask_mod leaf sees row indices, which the sharded runs would shift); "
                                f"write it with the language's primitives (attnmask.parse), or run "
                                f"am.attention on one process")
        return masks, per_head
    raise PlanError(f"mask must be a Mask or a non-empty list of one Mask per query head, got {mask!r:.80}")


def _prepare(mask, length, world_size, block_size):
    masks, per_head = _masks_of(mask)
    length = _check_int("length", length, 1)
    W = _check_int("world_size", world_size, 1)
    block = _check_int("block_size", block_size, 1)
    n = -(-length // block)
    if n < W:
        raise PlanError(f"length {length} with block_size {block} gives {n} chunks, fewer than world_size {W}; "
                        f"every rank needs at least one chunk: use block_size <= {max(1, length // W)}")
    distinct = list(dict.fromkeys(masks))
    layouts = [m.compile(length, block_size=block) for m in distinct]
    # heads sharing one mask count once per head
    work = _layout_work(layouts, [masks.count(m) for m in distinct])
    return masks, per_head, length, W, block, work


def _schedule_tokens(schedule: str, needed: np.ndarray, shard: np.ndarray) -> np.ndarray:
    """int64 [W, W]: K/V positions rank r receives from s under ``schedule`` (all-gather: s's whole shard)."""
    if schedule != "allgather":
        return needed
    tokens = np.tile(shard[None, :], (len(shard), 1))
    np.fill_diagonal(tokens, 0)
    return tokens


def _rule_calls(rule: str, schedule: str, need: np.ndarray, owner: np.ndarray, pairs: np.ndarray,
                shift_inv: bool) -> np.ndarray:
    """float [W, W]: kernel calls rank r makes against source s under a call rule (see :data:`CALL_RULES`)."""
    W = len(pairs)
    if rule == "runtime":
        return _kernel_calls(need, owner, pairs, W, shift_inv, schedule == "allgather")
    if rule == "free":
        return np.zeros_like(pairs)
    has = (pairs > 0).astype(np.float64)                   # "per_step": one call per step that has work
    if schedule == "allgather":                              # two steps: own keys, then all the others at once
        remote = has.copy()
        np.fill_diagonal(remote, 0.0)
        k = remote.sum(1, keepdims=True)
        remote = np.divide(remote, k, out=np.zeros_like(remote), where=k > 0)
        np.fill_diagonal(remote, np.diag(has))
        return remote
    return has


def _best_schedule(schedule: str, rule: str, owner, pairs, need, needed, shard, cost, shift_inv: bool) -> tuple:
    """(Simulation, tokens) of the cheapest schedule (or the one asked for) under a call rule."""
    best = None
    for sched in (SCHEDULES if schedule == "auto" else (schedule,)):
        tokens = _schedule_tokens(sched, needed, shard)
        sim = _simulate(sched, pairs, tokens, shard, cost, _rule_calls(rule, sched, need, owner, pairs, shift_inv))
        if best is None or sim.time < best[0].time * (1 - 1e-9):
            best = (sim, tokens)
    return best


def _make(masks, per_head, length, W, block, work, strategy, schedule, cost) -> Plan:
    owners = _ASSIGN[strategy](len(work.chunk_len), W, work=work, cost=cost)
    best = None
    for owner in (owners if isinstance(owners, list) else [owners]):   # a strategy may offer candidates
        pairs, need = _exchange(work, owner, W)
        needed = _tokens_needed(need, owner, work.chunk_len, W)
        shard = np.bincount(owner, weights=work.chunk_len, minlength=W).astype(np.int64)
        sim, tokens = _best_schedule(schedule, "runtime", owner, pairs, need, needed, shard, cost,
                                     shift_invariant(masks))
        if best is None or sim.time < best[0].time * (1 - 1e-9):
            best = (sim, tokens, owner, pairs, need)
    sim, tokens, owner, pairs, need = best
    return Plan(masks, per_head, length, W, block, strategy, sim.schedule, cost, owner, pairs, need, tokens,
                sim, work.chunk_len)


def plan(mask, length: int, world_size: int, block_size: int = 128, *, strategy: str = "auto",
         schedule: str = "auto", cost: CostModel | None = None) -> Plan:
    """Plan context-parallel attention of ``mask`` over ``length`` positions on ``world_size`` ranks.

    ``mask``: a Mask, or a list of one Mask per query head. Work is balanced
    on exact attended pairs read from the block layout at ``block_size``;
    ``strategy`` (one of :data:`STRATEGIES` or ``"auto"``) and ``schedule``
    (one of :data:`SCHEDULES` or ``"auto"``) default to the cheapest under
    ``cost``. Deterministic: every rank gets the same plan.

        >>> import attnmask as am
        >>> from attnmask import distributed as cp
        >>> p = cp.plan(am.causal, 1000, 2, block_size=64, strategy="zigzag")
        >>> [p.local_length(r) for r in range(2)], p.n_chunks
        ([488, 512], 16)
    """
    if strategy != "auto" and strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} or 'auto'")
    if schedule != "auto" and schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or 'auto'")
    cost = CostModel() if cost is None else cost
    if not isinstance(cost, CostModel):
        raise PlanError(f"cost must be a CostModel, got {type(cost).__name__}")
    prepared = _prepare(mask, length, world_size, block_size)
    if strategy != "auto":
        return _make(*prepared, strategy, schedule, cost)
    candidates = [_make(*prepared, s, schedule, cost) for s in STRATEGIES]
    # cheapest simulated time; near ties (0.1%) go to the plan with fewer position runs (fewer kernel calls)
    best_time = min(p.simulation.time for p in candidates)
    close = [p for p in candidates if p.simulation.time <= best_time * 1.001]
    return min(close, key=lambda p: sum(len(p.position_runs(r)) for r in range(p.world_size)))


def compare(mask, length: int, world_size: int, block_size: int = 128, *,
            cost: CostModel | None = None) -> dict[str, Plan]:
    """The chosen plan (key ``"plan"``) beside every strategy, each with its cheapest schedule.

        >>> import attnmask as am
        >>> from attnmask import distributed as cp
        >>> plans = cp.compare(am.causal, 65536, 4)
        >>> sorted(plans)
        ['balanced', 'contiguous', 'greedy', 'plan', 'ptrr', 'zigzag']
        >>> plans['contiguous'].imbalance() > plans['plan'].imbalance()
        True
    """
    cost = CostModel() if cost is None else cost
    prepared = _prepare(mask, length, world_size, block_size)
    out = {s: _make(*prepared, s, "auto", cost) for s in STRATEGIES}
    best_time = min(p.simulation.time for p in out.values())
    close = [p for p in out.values() if p.simulation.time <= best_time * 1.001]
    out["plan"] = min(close, key=lambda p: sum(len(p.position_runs(r)) for r in range(p.world_size)))
    return out
