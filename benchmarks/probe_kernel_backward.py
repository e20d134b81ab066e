"""The fused kernel alone, forward against backward, at bench_backward.py's shape.

N=8192, H=8, D=64, `causal & sliding(1024)` (block 128), float32 and bfloat16: `fused.run_items` and
`fused.run_backward` on the plan's item table, best of 5 after a warm-up (no autograd, no allocation in
the timed calls). The backward's ratio to the forward without the autograd's own work around it.

    /work/notes/cpu python benchmarks/probe_kernel_backward.py [threads]
"""
import sys
import time

import torch

import attnmask as am
from attnmask.engines import fused
from attnmask.engines.blocksparse import plan_for


def best(f, n=5):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def main() -> None:
    torch.manual_seed(0)
    N, H, D = 8192, 8, 64
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    items = fused.plan_items(plan_for((am.causal & am.sliding(1024)).compile(N, block_size=128)))
    heads = lambda t: t.reshape(H, 1, *t.shape[2:])        # noqa: E731 (kv heads as x: the thread split)
    line = [f"{torch.get_num_threads()} threads"]
    for dt in (torch.float32, torch.bfloat16):
        q, k, v, do = (torch.randn(1, H, N, D).to(dt) for _ in range(4))
        out, lse = torch.empty(1, H, N, D), torch.empty(1, H, N)
        tf = best(lambda: fused.run_items(items, q, k, v, 0.125, out, lse))
        dq, dk, dv = (torch.zeros(1, H, N, D) for _ in range(3))
        tb = best(lambda: fused.run_backward(items, *map(heads, (q, k, v, out, do, lse)), None,
                                             *map(heads, (dq, dk, dv)), 0.125))
        line.append(f"{str(dt)[6:]}: fwd {tf:.1f} ms, bwd {tb:.1f} ms, bwd / fwd {tb / tf:.2f}")
    print(" | ".join(line))


if __name__ == "__main__":
    main()
