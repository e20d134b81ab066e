"""16K bf16 `causal & sliding(1024)`, H=8, D=64 through am.attention: best and median of 7 after two
warm-ups. Run in alternating processes on two trees (PYTHONPATH) for an A/B.

    /work/notes/cpu python benchmarks/probe_bf16_window.py
"""
import torch, time, attnmask as am
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, 16384, 64).bfloat16() for _ in range(3))
m = am.causal & am.sliding(1024)
with torch.no_grad():
    for _ in range(2): am.attention(q, k, v, m)
    ts = []
    for _ in range(7):
        t = time.perf_counter(); am.attention(q, k, v, m); ts.append(time.perf_counter() - t)
print(f"bf16 16K window: best {min(ts)*1e3:.1f} ms, median {sorted(ts)[3]*1e3:.1f}")
