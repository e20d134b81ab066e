"""The fused CPU kernel (``csrc/attend.c``, built by the install as ``engines._attend``): plans as one call.

A block-sparse plan (:mod:`attnmask.engines.blocksparse`) is a list of items: query rows
``[r0, r0 + rows)`` against gathered keys and ``[k0, k0 + span)``, with a bool mask, the
top-left causal mask, or none. The pure-PyTorch path makes one ATen flash call per op and
merges overlapping results by log-sum-exp; the kernel runs the whole item table in one call
per thread, continuing each row's online softmax from what earlier items stored, with
16 query rows in the lanes of one AVX-512 register, every all-masked 16 x 16 piece skipped,
and AVX512-BF16 dot products for bf16 inputs (fp32 accumulation, probabilities rounded to
bf16 for P @ V, as ATen's bf16 kernel does).

Every call goes through :func:`run` (a list of chains of :class:`Call`; a per-head list's
problems, or a backward's key heads, are one run), and the C side runs the job table on torch's
own OpenMP team (csrc/attend.c, "jobs", says why).

When it is used (``usable``): the extension was built, the CPU has AVX-512 (and AVX512-BF16
for bf16 inputs), the dtype is float32 or bfloat16, the head dim a multiple of 16 up to 256,
and ``ATTNMASK_KERNEL`` is not ``0``. Otherwise the engine runs the ATen path, and
:func:`status` says why (``attnmask --version`` prints it): nothing falls back silently.

    >>> import torch
    >>> status()["built"] in (True, False)
    True
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch

from ..threads import run_tasks

__all__ = ["status", "usable", "usable_backward", "forward_call", "backward_call", "run", "run_items", "run_backward",
           "plan_items", "causal_items", "Call"]

try:                                     # built by `pip install -e .` (setup.py); optional
    from . import _attend
    _IMPORT_ERROR = None
except ImportError as exc:               # noqa: F841 (reported by status())
    _attend = None
    _IMPORT_ERROR = str(exc)

_DTYPES = {torch.float32: False, torch.bfloat16: True}
_FIRST, _CAUSAL = 2, 1
_LOG2E = 1.4426950408889634
#: Below this many scores per thread a call stays on one thread. Handing jobs to torch's warm
#: OpenMP team costs a few us: measured (fused.run_items, causal, D=64, fp32, median of 400) 2 heads
#: x 64 rows (5K scores) 29 us on one thread, 26 on two; 8 x 64 (20K) 66 / 53; 8 x 128 (74K) 169 / 100.
PARALLEL_SCORES = 1 << 12


def _supports(bf16: bool) -> bool:
    return _attend is not None and _attend.supports(bf16)


def status() -> dict:
    """Whether the kernel is built and usable here, per dtype, with the reason when not, and whose
    threads run it (``threads``: torch's OpenMP team, or worker threads of ours; see :func:`run`).

        >>> sorted(status())
        ['bfloat16', 'built', 'enabled', 'float32', 'reason', 'threads']
    """
    enabled = os.environ.get("ATTNMASK_KERNEL", "1") != "0"
    if _attend is None:
        reason = f"not built ({_IMPORT_ERROR}); reinstall with a C compiler: pip install -e ."
    elif not enabled:
        reason = "disabled by ATTNMASK_KERNEL=0"
    elif not _supports(False):
        reason = "this CPU has no AVX-512 (the engine uses ATen's flash kernel)"
    elif not _supports(True):
        reason = "this CPU has no AVX512-BF16: bfloat16 uses ATen's flash kernel"
    else:
        reason = ""
    return {"built": _attend is not None, "enabled": enabled,
            "float32": enabled and _supports(False), "bfloat16": enabled and _supports(True), "reason": reason,
            "threads": "torch's OpenMP team" if _OPENMP else "worker threads (torch's OpenMP runtime not found)"}


def usable(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs attention of ``dtype`` with this head dim here (see the module docstring)."""
    if dtype not in _DTYPES or head_dim % 16 or not 0 < head_dim <= 256:
        return False
    if os.environ.get("ATTNMASK_KERNEL", "1") == "0":
        return False
    return _supports(_DTYPES[dtype])


class Items:
    """An item table ready for the kernel: int64 [n, COLUMNS] rows, the gathered ranges and packed masks.

    ``scores`` is the work, for threading: the scores of the 16-row x 16-key pieces the kernel
    visits (those with a mask bit for the group's rows; the causal triangle's pieces 0..g)."""

    def __init__(self, rows: list[list[int]], extras: list[tuple[int, int]], masks: list[torch.Tensor]):
        self.table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _attend.COLUMNS if _attend else 9)
        self.extras = torch.tensor(extras or [(0, 0)], dtype=torch.int64)
        self.bits = [_pack_bits(m) for m in masks]
        self.addresses = torch.tensor([b.data_ptr() for b in self.bits] or [0], dtype=torch.int64)
        live: dict[tuple[int, int], int] = {}
        pieces = 0
        for r in rows:
            n, span, mask, flags, E = r[1], r[3], r[4], r[5], r[8]
            G, np_ = -(-n // 16), -(-E // 16) + -(-span // 16)
            if mask >= 0:
                if (mask, E) not in live:
                    live[(mask, E)] = _live_pieces(self.bits[mask], E)
                pieces += live[(mask, E)]
            elif flags & _CAUSAL:            # group g visits pieces 0..g: a triangle, then full rows
                m = min(G, np_)
                pieces += m * (m + 1) // 2 + (G - m) * np_
            else:
                pieces += G * np_
        self.scores = 256 * pieces


def _live_pieces(bits: torch.Tensor, E: int) -> int:
    """(group, piece) pairs with a mask bit, of packed bits [G, E + span]: the kernel's pieces are the
    gathered keys' [0, E) in 16s, then the span's from E in 16s."""
    b = bits.numpy() != 0
    count = 0
    for part in (b[:, :E], b[:, E:]):
        G, N = part.shape
        if N:
            padded = np.zeros((G, -(-N // 16) * 16), dtype=bool)
            padded[:, :N] = part
            count += int(padded.reshape(G, -1, 16).any(-1).sum())
    return count


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, N] -> uint16 bits [ceil(rows / 16), N]: bit r of [g, j] is mask[16 g + r, j].

    numpy's packbits (one pass over bytes): torch's int32 shift-and-sum took 30-40 ms a
    64 x 1087 mask on the project's machine, 0.1-0.4 s for a window plan's 17 masks on its
    first call.
    """
    rows, N = mask.shape
    G = -(-rows // 16)
    m = mask.numpy()
    if rows < G * 16:
        m = np.concatenate([m, np.zeros((G * 16 - rows, N), dtype=bool)])
    # rows 16 g + 8 h + r -> bit r of byte h of [g, j]; bytes (h = 0, 1) side by side are one
    # little-endian uint16 (x86, where the kernel runs).
    halves = np.packbits(m.reshape(G, 2, 8, N), axis=2, bitorder="little").reshape(G, 2, N)
    return torch.from_numpy(np.ascontiguousarray(halves.transpose(0, 2, 1)).view(np.uint16).reshape(G, N))


_lock = threading.Lock()


def plan_items(plan) -> Items:
    """The plan's item table, built once and kept on the plan (``Plan.nbytes`` counts an upper bound of it)."""
    items = plan.kernel_items
    if items is None:
        with _lock:
            if plan.kernel_items is None:
                rows, extras = [], []
                index: dict[tuple, int] = {}
                for op in plan.ops:
                    x0 = index.get(op.extra)
                    if x0 is None:
                        x0 = index[op.extra] = len(extras)
                        extras.extend(op.extra)
                    E = sum(b - a for a, b in op.extra)
                    flags = (_CAUSAL if op.causal else 0) | (_FIRST if op.first else 0)
                    mask = -1 if op.mask is None else op.mask
                    for g in range(op.G):
                        rows.append([op.r0 + g * op.dr, op.rows, op.k0 + g * op.dk, op.span, mask, flags,
                                     x0, len(op.extra), E])
                plan.kernel_items = Items(rows, extras, plan.masks)
            items = plan.kernel_items
    return items


@functools.lru_cache(maxsize=256)
def causal_items(segments: tuple[tuple[int, int], ...]) -> Items:
    """One top-left causal item per segment ``[a, b)`` of rows and keys (``causal``, documents)."""
    return Items([[a, b - a, a, b - a, -1, _CAUSAL | _FIRST, 0, 0, 0] for a, b in segments], [], [])


class Call:
    """One kernel call, packed for the C side: an item table over ``units`` batch-head ranges.

    ``kind`` 0 is the forward, 1 the backward. A unit is the batch-heads one thread must run in
    order: one z for the forward, the Y heads of one x for the backward (they add into one key
    head's dK / dV). ``cost`` is the scores of one unit. ``keep`` holds what the pointers in
    ``params`` (int64, numpy: a few us cheaper to make than a tensor) point into; ``dtype`` and
    ``head_dim`` say what it runs (for tests and profiles).
    """

    __slots__ = ("kind", "params", "n_items", "units", "unit", "cost", "keep", "dtype", "head_dim")

    def __init__(self, kind, params, items: Items, units: int, unit: int, keep, dtype, head_dim):
        self.kind, self.params, self.n_items = kind, params, items.table.shape[0]
        self.units, self.unit, self.cost = units, unit, items.scores * unit
        self.keep, self.dtype, self.head_dim = (items, keep), dtype, head_dim


def forward_call(items: Items, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 out: torch.Tensor, lse: torch.Tensor, *, zero_rows: bool = False) -> Call:
    """The call of ``items`` on q [X, Y, Lq, D], k/v [X, Y, Lk, D] (any strides, D contiguous; stride 0
    allowed on X and Y), to write out [X, Y, Lq, D] and lse [X, Y, Lq] float32 in place (:func:`run`).

    ``out`` is float32, or bfloat16 for bf16 inputs: then the items run on a float32 scratch of
    one batch-head's rows and the kernel rounds it into ``out`` (no [X, Y, Lq, D] float32 tensor,
    no copy after). Rows no item writes are left as they are, or, for a bf16 ``out`` with
    ``zero_rows``, written as zeros (with a float32 ``out`` the caller zero-fills them).
    """
    X, Y, Lq, D = q.shape
    bf16 = q.dtype == torch.bfloat16
    if lse.dtype != torch.float32 or not (out.dtype == torch.float32 or (bf16 and out.dtype == torch.bfloat16)):
        raise ValueError("the fused kernel writes float32 lse and out (bfloat16 out for bfloat16 inputs)")
    for t in (q, k, v, out):
        if t.stride(-1) != 1:
            raise ValueError("the fused kernel needs the head dim contiguous")
    out16 = out.dtype == torch.bfloat16
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *((0, 0, 0) if out16 else out.stride()[:3]),
               *lse.stride()]
    c = np.array([scale * _LOG2E], dtype=np.float64).view(np.int64).tolist()
    tail = [out.data_ptr(), *out.stride()[:3], Lq, int(zero_rows)] if out16 else [0, 0, 0, 0, 0, 0]
    params = np.array([q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if out16 else out.data_ptr(), lse.data_ptr(),
                       *strides, Y, D, items.table.data_ptr(), items.extras.data_ptr(), items.addresses.data_ptr(),
                       *c, int(bf16), *tail], dtype=np.int64)
    return Call(0, params, items, X * Y, 1, (q, k, v, out, lse), q.dtype, D)


def backward_call(items: Items, q, k, v, out, dout, lse, dlse, dq, dk, dv, scale: float) -> Call:
    """The call that accumulates the gradients of ``items`` into dq [X, Y, Lq, D], dk / dv [X, Y, Lk, D]
    (float32, in place; :func:`run`).

    q, dout [X, Y, Lq, D], k, v [X, Y, Lk, D] all float32 or all bfloat16 (stride 0 on Y where
    query heads share a key head); out [X, Y, Lq, D] float32 (the forward's, read only for delta);
    lse (the forward's, 0 on rows with no key) and dlse (the gradient into lse, or None) [X, Y, Lq]
    float32. The kernel forms delta = rowsum(dout * out) - dlse per row itself (no [X, Y, Lq, D]
    temporary). bf16 inputs round P and dS to bf16 for the gradient products (see csrc/attend.c).
    The Y heads of one x are one unit (one thread, in order), so dk / dv of a shared key head are
    summed in a fixed order.
    """
    X, Y, Lq, D = q.shape
    tensors = (q, k, v, dout, lse, out, dq, dk, dv)
    bf16 = q.dtype == torch.bfloat16
    for i, t in enumerate(tensors + (() if dlse is None else (dlse,))):
        want = torch.bfloat16 if bf16 and i < 4 else torch.float32
        if t.dtype != want or (t.dim() == 4 and t.stride(-1) != 1):
            raise ValueError("the fused backward needs q, k, v, dout all float32 or all bfloat16, float32 out, "
                             "lse, dlse and gradients, with the head dim contiguous")
    strides = []
    for t in tensors:
        strides += list(t.stride()[:3])
    floats = np.array([scale * _LOG2E, scale], dtype=np.float64).view(np.int64).tolist()
    dl = [0, 0, 0, 0] if dlse is None else [dlse.data_ptr(), *dlse.stride()[:3]]
    params = np.array([t.data_ptr() for t in tensors] + strides
                      + [Y, D, items.table.data_ptr(), items.extras.data_ptr(), items.addresses.data_ptr()]
                      + floats + [int(bf16)] + dl, dtype=np.int64)
    return Call(1, params, items, X, Y, (tensors, dlse), q.dtype, D)


def _openmp_runtime() -> bool:
    """Whether the kernel's jobs run on torch's own OpenMP team (see csrc/attend.c, "jobs"): torch's
    parallel backend is OpenMP, and GOMP_parallel is found among the dependencies of torch's
    libtorch_cpu (so the runtime is the one torch uses: libgomp here; LLVM's and Intel's runtimes
    export the symbol too), never another runtime another library happens to have loaded."""
    if _attend is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = sorted(os.listdir(lib)) if os.path.isdir(lib) else []
    return any(_attend.use_openmp(os.path.join(lib, name)) for name in names
               if name.startswith("libtorch_cpu.") and (".so" in name or name.endswith(".dylib")))


_OPENMP = _openmp_runtime()


def _forked_child() -> None:
    # A child made by os.fork() has the runtime but not the team's threads: libgomp would wait on
    # them for ever. Its kernel calls run on worker threads (threads.run_tasks makes new ones).
    global _OPENMP
    _OPENMP = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)

#: Jobs per thread a single call is cut into (more than one: a core the machine lends elsewhere
#: for a while delays one job, not a whole share of the call).
JOBS_PER_THREAD = 4


def run(chains: list[list[Call]]) -> int:
    """Run kernel calls: each chain's calls in order on one thread, different chains side by side;
    returns the number of threads they ran on (the team's size; 1: this thread alone).

    Different chains must write disjoint outputs. A chain of one call is cut into jobs of whole
    units (batch-heads; the backward's x ranges) when the work is large enough. Jobs are taken
    costliest first by ``torch.get_num_threads()`` threads (torch's OpenMP team where
    :data:`_OPENMP`, else worker threads of :func:`attnmask.threads.run_tasks`). No call's bits
    depend on the thread count or on which thread ran it. Each Python thread that calls has a team
    of its own (as for torch's ops), so concurrent callers share the cores.
    A job whose work buffers cannot be allocated raises MemoryError once the others have run; a
    backward's gradients then hold part of their sums (do not retry into the same buffers).
    """
    chains = [c for c in chains if c]
    total = sum(call.cost * call.units for chain in chains for call in chain)
    if not total:
        return 1
    n = min(torch.get_num_threads(), max(1, total // PARALLEL_SCORES))
    jobs: list[tuple[float, list[list[int]]]] = []       # (cost, rows) per chain of jobs
    for chain in chains:
        if len(chain) == 1 and n > 1:
            call = chain[0]
            cut = min(call.units, max(1, -(-call.cost * call.units * n * JOBS_PER_THREAD // total)))
            bounds = [call.units * i // cut for i in range(cut + 1)]
            for a, b in zip(bounds, bounds[1:]):
                jobs.append((call.cost * (b - a), [[call.kind, call.params.ctypes.data, call.n_items,
                                                    a * call.unit, b * call.unit]]))
        else:
            jobs.append((sum(c.cost * c.units for c in chain),
                         [[c.kind, c.params.ctypes.data, c.n_items, 0, c.units * c.unit] for c in chain]))
    jobs.sort(key=lambda j: -j[0])                       # stable: a fixed order for equal costs
    table = np.array([row for _, chain_rows in jobs for row in chain_rows], dtype=np.int64)
    starts = np.cumsum([0] + [len(r) for _, r in jobs], dtype=np.int64)
    counter = np.zeros(1, dtype=np.int64)
    n = min(n, len(jobs))
    args = (table.ctypes.data, starts.ctypes.data, len(jobs), counter.ctypes.data)
    if n <= 1 or _OPENMP:
        # The team is the calling thread's whole team (as torch's own ops use it), whatever n.
        return _attend.jobs(*args, n > 1)
    run_tasks([lambda: _attend.jobs(*args, False)] * n, [1] * n)
    return n


def run_items(items: Items, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              out: torch.Tensor, lse: torch.Tensor) -> None:
    """Run ``items`` (:func:`forward_call`, then :func:`run`)."""
    run([[forward_call(items, q, k, v, scale, out, lse)]])


def usable_backward(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel's backward runs inputs of ``dtype`` here: float32 and bfloat16, on the
    forward's conditions (float16 inputs are upcast to float32 by the autograd)."""
    return usable(dtype, head_dim)


def run_backward(items: Items, q, k, v, out, dout, lse, dlse, dq, dk, dv, scale: float) -> None:
    """Accumulate the gradients of ``items`` (:func:`backward_call`, then :func:`run`)."""
    run([[backward_call(items, q, k, v, out, dout, lse, dlse, dq, dk, dv, scale)]])
