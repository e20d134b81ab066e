"""The tests' own float64 attention and the one error measure every numeric test uses.

Nothing here imports attnmask: the reference is plain PyTorch in float64, so a
test that holds the library to it compares the library with an independent
computation, never with itself (not with ``backend="dense"``, not the autograd
wrapper with the function it calls).

Error measure. ``scaled_error(got, ref, unit)`` is
``max |got - ref| / max(max |ref|, unit)`` where ``unit`` is a magnitude taken
from the *inputs* (``output_unit``, ``gradient_units``), never only from the
reference. A reference that is exactly zero (a row with no key, dq of a row that
sees one key, ``full`` at L = 1) then measures rounding noise against the size of
the numbers that produced it, instead of dividing by ~0.

Two references:

* ``reference`` takes a bool ``allowed`` [B|1, H|1, Lq, Lk]: small problems.
* ``banded_reference`` takes a predicate on positions and, per block of query
  rows, the key range that can hold an allowed key: long problems (32K tokens)
  in bounded memory. Both are differentiable (autograd in float64).

Example::

    >>> import torch
    >>> q = k = v = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    >>> allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    >>> out, lse = reference(q, k, v, allowed, 0.5)
    >>> scaled_error(out, out, output_unit(v))
    0.0
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, H, L, D] (query head h reads kv head h // (H // Hkv))."""
    return t.double().repeat_interleave(q.shape[1] // t.shape[1], 1)


def reference(q, k, v, allowed, scale):
    """float64 softmax(q k^T * scale, masked) v and its lse; rows with no key give 0 and -inf.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D], allowed bool broadcastable to [B, H, Lq, Lk].
    """
    with one_thread():
        kk, vv = _expand_kv(q, k), _expand_kv(q, v)
        s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
        return p @ vv, lse


def banded_reference(q, k, v, allowed: Predicate, key_range: Callable[[int, int], tuple[int, int]],
                     scale: float, *, q_offset: int = 0, rows_per_step: int = 256):
    """float64 attention for long sequences, a block of query rows at a time.

    ``allowed(q_pos [R, 1], k_pos [1, K]) -> bool [R, K]`` on absolute positions
    (query row i sits at ``q_offset + i``); ``key_range(r0, r1)`` gives the keys
    [k0, k1) outside which rows r0..r1-1 have no allowed key. Memory is
    rows_per_step x (k1 - k0) per head instead of Lq x Lk.
    """
    kk, vv = _expand_kv(q, k), _expand_kv(q, v)
    qd = q.double()
    Lq = q.shape[2]
    outs, lses = [], []
    with one_thread():
        for r0 in range(0, Lq, rows_per_step):
            r1 = min(Lq, r0 + rows_per_step)
            k0, k1 = key_range(r0, r1)
            qp = torch.arange(r0, r1)[:, None] + q_offset
            kp = torch.arange(k0, k1)[None, :]
            s = (qd[:, :, r0:r1] @ kk[:, :, k0:k1].transpose(-1, -2) * scale).masked_fill(
                ~allowed(qp, kp), float("-inf"))
            lse = torch.logsumexp(s, -1)
            p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
            outs.append(p @ vv[:, :, k0:k1])
            lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the reference on one thread: its many small float64 ops are 10x slower on two
    threads of a busy machine (measured: 10 s vs 0.8 s for a 16K-token window backward)."""
    threads = torch.get_num_threads()
    if threads == 1:                      # nested use
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scaled_error(got: torch.Tensor, ref: torch.Tensor, unit: float) -> float:
    """max |got - ref| / max(max |ref|, unit); ``unit`` > 0 comes from the inputs."""
    assert unit > 0, f"the input scale must be positive, got {unit}"
    got, ref = got.detach().double(), ref.detach().double()
    if got.numel() == 0:
        return 0.0
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), unit)


def output_unit(v: torch.Tensor) -> float:
    """Attention outputs are convex mixtures of v's rows: max |v| bounds every entry."""
    return float(v.detach().abs().max())


def _row_norm_max(t: torch.Tensor) -> float:
    return float(t.detach().double().norm(dim=-1).max())


def gradient_units(q, k, v, dout, scale: float, dlse=None) -> tuple[float, float, float]:
    """Input magnitudes for dq, dk, dv: the size of one term of each gradient's sum.

    dv_j = sum_i p_ij dout_i; dq_i = scale * sum_j p_ij (dout_i . v_j - delta_i + dlse_i) k_j, and
    dk symmetrically with q. Rounding in a term is relative to these sizes (``dlse``, the gradient
    of the lse [B, H, Lq], when one flows).
    """
    dov = scale * _row_norm_max(dout) * _row_norm_max(v)
    if dlse is not None:
        dov = max(dov, scale * float(dlse.detach().abs().max()))
    return (dov * float(k.detach().abs().max()), dov * float(q.detach().abs().max()),
            float(dout.detach().abs().max()))


def seeded_randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Standard normal values drawn in float64 from ``seed``, then cast (the same values in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def seeded_qkv(B, H, Hkv, Lq, Lk, D, seed: int, dtype=torch.float32):
    """q [B, H, Lq, D] and k, v [B, Hkv, Lk, D] from seeds seed, seed + 1, seed + 2."""
    return (seeded_randn((B, H, Lq, D), seed, dtype), seeded_randn((B, Hkv, Lk, D), seed + 1, dtype),
            seeded_randn((B, Hkv, Lk, D), seed + 2, dtype))
