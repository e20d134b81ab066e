"""The fused kernel alone (fused.run_items), causal, D=64, fp32, tiny calls: one thread against the
job table handed to torch's OpenMP team (fused.PARALLEL_SCORES patched to 1), median of 400 calls, twice each.
What fused.PARALLEL_SCORES = 2^12 rests on.

    /work/notes/cpu python benchmarks/probe_handoff.py
"""
import torch, time, statistics
from attnmask.engines import fused
from attnmask.engines.blocksparse import kernel_items
import attnmask as am
torch.manual_seed(0)
for H, L in ((2, 32), (2, 64), (8, 32), (4, 64), (8, 64), (2, 128)):
    q = torch.randn(1, H, L, 64); k = torch.randn(1, H, L, 64); v = torch.randn(1, H, L, 64)
    items, _ = kernel_items(am.causal.compile(L))
    out = torch.empty(1, H, L, 64); lse = torch.empty(1, H, L)
    res = {}
    for rep in range(2):
      for P in (1 << 30, 1):
        fused.PARALLEL_SCORES = P
        ts = []
        for r in range(400):
            t = time.perf_counter(); fused.run_items(items, q, k, v, 0.125, out, lse); ts.append(time.perf_counter() - t)
        res.setdefault(P, []).append(round(statistics.median(ts) * 1e6, 1))
    print(H, L, "scores", items.scores * H, "one", res[1 << 30], "split", res[1])
