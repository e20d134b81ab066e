"""The block-sparse planner's measured cost constants, and the two directions it plans for.

One home for every number the planner (``engines/blocksparse.py``) weighs its
choices with. Each was measured on the project's machine by the script named
beside it; rerun that script before changing one:

- ``benchmarks/bench_kernel_slices.py`` (``benchmarks/results/kernel_slices.md``):
  the fused CPU flash kernel's cost per score by query rows per call
  (``KERNEL_SLICE_FACTORS``), which decides row pieces and causal regions;
- ``benchmarks/bench_backward.py`` (``benchmarks/results/backward.md``): the
  backward kernel's preference for 128-row calls (``BACKWARD.fixed_rows``) and
  the key rows one backward call may return (``KEYS_PER_CALL``);
- ``benchmarks/bench_attention.py`` (``benchmarks/results/attention.md``): the
  temporaries' byte bound (``CHUNK_BYTES``) and the document rule.

A :class:`Direction` says how one planner cuts work for the forward or the
backward pass; the plan's steps (segments, tile masks, key gathering, causal
regions, batching) are the same code for both.

    >>> kernel_cost(64, 1000) > kernel_cost(1024, 1000) / 16     # small calls pay more per score
    True
    >>> FORWARD.name, BACKWARD.fixed_rows
    ('forward', 128)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Direction", "FORWARD", "BACKWARD", "KERNEL", "KERNEL_ROWS", "kernel_cost", "causal_call_cost", "pieces_cost",
           "KERNEL_SLICE_FACTORS", "SUB_ROWS", "MIN_SUB_ROWS", "FINE_PIECES_REPEATS", "SPLIT_GAIN", "REGION_GAIN", "SPLIT_FULL_BLOCKS", "ONE_CALL_BLOCKS",
           "GATHER_KEYS", "GATHER_SPAN_ROWS", "KEY_SET_KEYS", "KEY_SET_ROWS", "KEY_SET_CELLS", "KEY_SET_JOIN_RUNS", "KERNEL_JOIN_CELLS", "SIDE_BY_SIDE_PAIRS", "MIN_SEGMENT_ROWS", "CHUNK_BYTES", "KEYS_PER_CALL", "KEY_MAJOR_ROWS",
           "BACKWARD_ROW_COSTS", "MIN_BACKWARD_ROWS", "backward_cost"]

#: Relative cost per score of the forward kernel by its query slice (256, 64, 32 rows: calls of
#: >= 768, >= 192, < 192 rows). Rounded from bench_kernel_slices.py: 1.445 / 1.49-1.51 / 1.59 ns.
#: Items shorter than a 32-row slice (16, 8 rows: narrow windows' pieces) cost 1.14x / 1.2x more per
#: score than 32-row ones (benchmarks/results/kernel_slices.md, "short pieces", 2026-12-01).
KERNEL_SLICE_FACTORS = {256: 1.0, 64: 1.08, 32: 1.18, 16: 1.35, 8: 1.42}

#: A full run at least this many blocks long inside a partially masked segment is split off into
#: its own maskless call: the mask would cost more than the merge.
SPLIT_FULL_BLOCKS = 4
#: ... but a range of at most this many key blocks stays one call with its mask.
ONE_CALL_BLOCKS = 32
#: Partial blocks may run as row pieces of this many rows (or a half, a quarter, ... of it down to
#: MIN_SUB_ROWS: narrow windows), each trimmed to its keys ...
SUB_ROWS = 64
#: Shorter heights (halves of SUB_ROWS down to this; only for segments whose shape repeats in at
#: least FINE_PIECES_REPEATS blocks, which one batched call runs) are OFF: one kernel call alone
#: favours 8-16-row pieces for narrow windows (sliding(64): 4.1 vs 5.3 ns per pair), but the engine
#: at SmolLM2's shapes (H=9, Hkv=3) measured slower with them (benchmarks/results/model_shapes.md,
#: 2026-12-01 18:10: sliding(64) at L=1024 6.5 ms against 4.6 with 64-row pieces; the 16K window
#: 312 against 314 ms: no gain). Set MIN_SUB_ROWS = 8 to weigh them.
MIN_SUB_ROWS = 64
FINE_PIECES_REPEATS = 4
#: ... when the pieces' estimated kernel time is below this share of the whole block's.
SPLIT_GAIN = 0.97
#: A causal region runs as one is_causal call unless row pieces cost less than this share of it
#: (the pieces make more, smaller calls).
REGION_GAIN = 1.1
#: Items of at most this many keys (a sink, a few key columns) are gathered into the calls of their
#: query block's larger items instead of running alone and merging by LSE. The copy costs
#: 1 / rows of the call's work; a call and a merge cost about a 64-key call each.
GATHER_KEYS = 64
#: Small key sets join a larger call only when its keys plus theirs are at most this many times its
#: rows: the gathered copy of K and V is ~2 x keys / rows passes over the output, a call of their own
#: plus its merge ~3 (measured: folding a sink into 64-row calls of a 1024-key window spent 23% of
#: the forward in the copies, benchmarks/profile_bf16.py). Wider calls get one extra call instead.
GATHER_SPAN_ROWS = 4
#: Key sets (the keys that key-only parts of a mask select: a sink, key columns) of at most this
#: many keys are split off the mask and run as calls of their own against their gathered keys ...
KEY_SET_KEYS = 256
#: ... of this many rows each (256-row kernel slices; one [rows, keys] mask each, equal ones stored once),
KEY_SET_ROWS = 1024
#: ... when rows x keys stays under this many booleans (64 MB: a 256K-token query with 256 keys).
KEY_SET_CELLS = 1 << 26
#: A narrow op of the rest takes the key set's keys into its own calls when its items fall into at
#: most this many runs of equal key-set cells (each run becomes one op).
KEY_SET_JOIN_RUNS = 3
#: ... or, in plans for the fused kernel, as many runs as keep the op's joined masks (runs x rows x
#: keys booleans) under this many: a window's items that see key columns at different offsets each
#: get a mask of their own instead of a key-set item that stores and reloads their rows.
KERNEL_JOIN_CELLS = 1 << 22
#: Head problems of a per-head mask list on the ATen path run side by side on worker threads (one
#: intra-op thread each, ``threads.run_tasks``) when their attended pairs x heads sum to at least
#: this (the fused kernel's problems are one ``fused.run``). Measured under the CPU lock, SmolLM2's nine masks (H=9, Hkv=3, D=64, fp32), median ms side by side /
#: in turn: L=4096 (9.5M pairs) 44.4 / 56.3; L=1024 (1.4M pairs) 13.9 / 12.9 (Python's share of
#: small calls, serialised by the GIL, eats the gain), benchmarks/results/model_shapes.md.
SIDE_BY_SIDE_PAIRS = 1 << 22
#: ``causal & document(...)`` runs one is_causal call per document when documents average at least
#: this many rows (below, the calls' fixed costs outweigh the plan's merged calls).
MIN_SEGMENT_ROWS = 256
#: A batched call's output is a temporary before it lands in place; calls are split so that it stays
#: under this many bytes. Below glibc's 32 MB mmap ceiling the buffer is reused from the heap call
#: after call; above it every call maps fresh pages and pays their faults (32K-token windows: ~6%).
CHUNK_BYTES = 16 << 20
#: Most key rows (summed over the items of one call) whose dK/dV one backward call may return:
#: bounds the call's temporary gradients to about this x (batch x kv heads x D) floats. Measured
#: under the CPU lock (quiet, 2 threads, 2026-12-01), N=8192, sliding(1024), fp32, 128-row items:
#: backward 425 ms at 4096, 442 at 2048, 505 at 16384 (the temporaries of a 16384-key call pass
#: glibc's mmap threshold and fault their pages in every call). (Last session, on the
#: oversubscribed machine at load 5, 32768 had measured 2-3x faster than 2048.)
KEYS_PER_CALL = 4096
#: A backward op of equal items stepping down a diagonal band (a sliding window's) runs key-major
#: when a key block's rows (the items over it: ceil(span / rows) x rows) are at least this many: one
#: call per key block, all the band's query rows that see it, so dK/dV land without overlap and the
#: kernel runs 256-row query slices (768 rows and up) instead of 32-row ones. Measured under the
#: CPU lock (2 threads, 2026-12-01), N=8192, H=8, D=64, fp32, the band of sliding(1024) at 128-row
#: items: 327-347 ms key-major against 394-403 query-major (kernel and accumulation, same process).
#: The ends of the band (m - 1 key blocks each side, under fewer items) are one call each, so an op
#: runs key-major only with at least 2m items (a 3072-token sliding(1500), 12 items of m = 13: key-major
#: 18-26 ms against 15-19).
KEY_MAJOR_ROWS = 768


def kernel_cost(rows: int, keys: int) -> float:
    """Relative time of one forward flash-kernel call on ``rows`` x ``keys`` scores (per batch element).

    The CPU kernel splits queries into 32-, 64- or 256-row slices by the call's query
    length (< 192, < 768, else); each slice streams every key, so small slices pay more
    per score (``KERNEL_SLICE_FACTORS``).

        >>> kernel_cost(1024, 10), kernel_cost(100, 10)
        (10240.0, 1180.0)
    """
    per_score = KERNEL_SLICE_FACTORS[256 if rows >= 768 else 64 if rows >= 192 else 32 if rows >= 32
                                     else 16 if rows >= 16 else 8]
    return rows * keys * per_score


def causal_call_cost(n: int) -> float:
    """Relative time of one top-left ``is_causal`` kernel call on an n x n triangle.

    Each query slice computes whole 512-key slices up to its diagonal, so short
    triangles pay for up to twice their cells.

        >>> causal_call_cost(512) / kernel_cost(512, 512) > 0.5       # more than the triangle's half
        True
    """
    qs = 256 if n >= 768 else 64 if n >= 192 else 32
    kvs = min(512, n)
    cells = 0
    for m in range(0, n, qs):
        rows = min(qs, n - m)
        cells += rows * min(n, -(-(m + rows) // kvs) * kvs)
    return cells * kernel_cost(n, 1) / n


def pieces_cost(n: int, sub_rows: int | None = None) -> float:
    """Relative time of an n x n lower triangle run as ``sub_rows``-row pieces (default ``SUB_ROWS``)
    trimmed to the diagonal.

        >>> pieces_cost(256) < kernel_cost(256, 256)
        True
    """
    sub_rows = SUB_ROWS if sub_rows is None else sub_rows
    return sum(kernel_cost(min(sub_rows, n - r), min(r + sub_rows, n)) for r in range(0, n, sub_rows))


@dataclass(frozen=True)
class Direction:
    """How the one planner cuts work for a pass.

    ``fixed_rows``: partial segments are cut into row pieces of exactly this height
    (None: the forward's cost model decides, ``SUB_ROWS`` pieces when cheaper);
    ``gather``: small key sets join their block's larger calls (``GATHER_KEYS``);
    ``kernel``: the plan is for the fused kernel (``engines/fused.py``), not ATen's flash calls:
    key sets always join the items that cover their rows (see :data:`KERNEL`).

        >>> BACKWARD.fixed_rows, FORWARD.fixed_rows is None
        (128, True)
    """
    name: str
    fixed_rows: int | None
    gather: bool = True
    kernel: bool = False


#: The forward pass: row pieces by the kernel cost model, key sets gathered.
FORWARD = Direction("forward", None)
#: The backward pass: its kernel prefers taller calls, so rows are cut at fixed 128-row heights,
#: except in segments that repeat (one batched call), where a shorter height may cost less
#: (narrow windows: ``backward_cost``).
BACKWARD = Direction("backward", 128)

#: Rows of the fused kernel's items (a multiple of its 16-row groups; see KERNEL).
KERNEL_ROWS = 128
#: Plans the fused kernel runs (engines/fused.py), forward and backward: it visits only the live
#: 16-row x 16-key pieces of an item and gathered keys cost their own pieces, so what ATen's
#: calls weigh (query slices, a copy of K/V per call, a call and a merge per key set) does not
#: apply. Row pieces are KERNEL_ROWS tall (cut where a document or chunk boundary falls inside a
#: block); key sets and small items always join the items that cover their rows, so no rows are
#: stored and reloaded for a sink or a few columns.
KERNEL = Direction("kernel", KERNEL_ROWS, kernel=True)

#: The backward kernel's cost per row of an item by its height: (per key, per row), fitted to
#: N=8192, fp32, 2 threads, quiet (benchmarks/results/backward.md, 2026-12-01): sliding(1024) /
#: sliding(64) backward 425 / 85 ms at 128 rows, 436 / 73 at 64, 494 / 71 at 32.
BACKWARD_ROW_COSTS = {128: (1.0, 49.0), 64: (1.07, 71.0), 32: (1.24, 83.0)}


#: The shortest row pieces the backward weighs (the shortest height fitted above): halves of
#: ``BACKWARD.fixed_rows`` down to this, in segments that repeat.
MIN_BACKWARD_ROWS = min(BACKWARD_ROW_COSTS)


def backward_cost(rows: int, keys: int) -> float:
    """Relative time of one backward item of ``rows`` x ``keys`` (the height's per-key and per-row costs).

        >>> backward_cost(128, 191) > 4 * backward_cost(32, 95)     # sliding(64): 32-row items
        True
        >>> backward_cost(128, 1151) < 4 * backward_cost(32, 1055)  # sliding(1024): 128-row items
        True
    """
    per_key, per_row = BACKWARD_ROW_COSTS[128 if rows > 64 else 64 if rows > 32 else 32]
    return rows * (keys * per_key + per_row)
