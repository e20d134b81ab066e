"""SmolLM2's nine per-head masks against their ideal (SDPA is_causal x density), the two calls alone, alternating.

    /work/notes/cpu python benchmarks/probe_nine_heads.py    (OMP_WAIT_POLICY=PASSIVE to see the thread effect)
"""
import sys, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, "benchmarks")
import attnmask as am
from bench_attention import NINE_MASKS
torch.manual_seed(0)
H, Hk, D = 9, 3, 64
for dt in (torch.float32, torch.bfloat16):
    for L in (1024, 4096):
        q = torch.randn(1, H, L, D).to(dt); k, v = (torch.randn(1, Hk, L, D).to(dt) for _ in range(2))
        lays = [am.parse(t).compile(L) for t in NINE_MASKS]
        pairs = sum(l.attended_pairs() for l in lays) / len(lays)
        calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                 "nine": lambda: am.attention(q, k, v, lays, enable_gqa=True)}
        with torch.no_grad():
            for f in calls.values(): f(); f()
            ts = {n: [] for n in calls}
            for r in range(25):
                for n in (list(calls) if r % 2 else list(calls)[::-1]):
                    t = time.perf_counter(); calls[n](); ts[n].append(time.perf_counter() - t)
        s, n = statistics.median(ts["sdpa"]), statistics.median(ts["nine"])
        ideal = s * pairs / (L * (L + 1) / 2)
        print(f"{str(dt)[6:]} L={L}: nine {n*1e3:.2f} ms, ideal {ideal*1e3:.2f} ms, ratio {n/ideal:.2f}")
