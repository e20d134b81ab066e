"""Where the block-sparse backward's time goes (issue 13): kernel calls by kind, and the rest.

Times ``blocksparse_backward`` at N=8192, H=8, D=64, ``causal & sliding(1024)`` (block 128) with
every call of ATen's fused flash backward kernel timed and sorted into key-major calls (more rows
than keys: a band's key blocks; batched = its interior, single = its ends) and query-major ones (the
first rows' triangle, anything else). "rest" is the backward minus its kernel calls:
dQ/dK/dV accumulation, gradient buffers' zeros, casts. Best of ``--repeats`` runs.

    $ python benchmarks/profile_backward.py --dtype float32
    $ python benchmarks/profile_backward.py --dtype bfloat16 --mask 'causal & sliding(512)'
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import attnmask as am
import attnmask.engines.autograd as ag
from attnmask.engines.blocksparse import blocksparse_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--mask", default="causal & sliding(1024)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    N, H, D = args.length, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, H, N, D, generator=g).to(getattr(torch, args.dtype)) for _ in range(4))
    layout = am.parse(args.mask).compile(N, block_size=128)
    heads = torch.zeros(1, H, dtype=torch.int64)
    scale = D ** -0.5
    out, lse = blocksparse_forward(q, k, v, [layout], heads, scale)
    kernel = ag._flash_bwd
    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)

    def timed(dout_, q_, k_, *rest, **kw):
        t0 = time.perf_counter()
        result = kernel(dout_, q_, k_, *rest, **kw)
        rows, keys = q_.shape[2], k_.shape[2]
        # key-major calls have more rows than keys; batched ones (items > 1) are a band's interior
        kind = ("key-major" if rows > keys else "query-major") + (", batched" if q_.shape[0] > 1 else ", single")
        spent[kind] += time.perf_counter() - t0
        calls[kind] += 1
        return result

    ag._flash_bwd = timed
    runs = []
    try:
        for _ in range(args.repeats + 1):
            spent.clear()
            calls.clear()
            t0 = time.perf_counter()
            ag.blocksparse_backward(q, k, v, out, lse, dout, [layout], heads, scale)
            runs.append((time.perf_counter() - t0, dict(spent), dict(calls)))
    finally:
        ag._flash_bwd = kernel
    total, by_kind, n_calls = min(runs[1:], key=lambda r: r[0])
    print(f"{args.mask}, N={N}, H={H}, D={D}, {args.dtype}: backward {total * 1e3:.1f} ms (best of {args.repeats})")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:20s} {t * 1e3:7.1f} ms in {n_calls[kind]} calls")
    print(f"  {'rest':20s} {(total - sum(by_kind.values())) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
