"""Small calls at SmolLM2's shapes (H=9, Hkv=3, D=64, `causal & (sliding(64) | sink(4))`, L = 64-1024):
the fused kernel free to pick its own thread count per call (new: fused.PARALLEL_SCORES as it is,
no clamp) against the rule before (old: the one-thread clamp below threads.SMALL_WORK around the
call, PARALLEL_SCORES = 1 << 17), the two shuffled call by call in one process, 400 rounds.

    /work/notes/cpu python benchmarks/probe_small_calls.py
"""
import torch, time, statistics, attnmask as am, random
from attnmask.engines import fused
from attnmask.threads import threads_for, SMALL_WORK
torch.manual_seed(0); random.seed(0)
H, Hk, D = 9, 3, 64
new_ps = fused.PARALLEL_SCORES
for dt in (torch.float32, torch.bfloat16):
    for L in (64, 128, 256, 512, 1024):
        q = torch.randn(1, H, L, D).to(dt); k, v = (torch.randn(1, Hk, L, D).to(dt) for _ in range(2))
        m = am.causal & (am.sliding(64) | am.sink(4))
        work = m.compile(L).attended_pairs() * H
        def old():
            fused.PARALLEL_SCORES = 1 << 17
            with threads_for(work, SMALL_WORK):
                am.attention(q, k, v, m, enable_gqa=True)
        def new():
            fused.PARALLEL_SCORES = new_ps
            am.attention(q, k, v, m, enable_gqa=True)
        calls = {"old": old, "new": new}
        for f in calls.values():
            for _ in range(10): f()
        ts = {n: [] for n in calls}
        for r in range(400):
            order = list(calls); random.shuffle(order)
            for n in order:
                t = time.perf_counter(); calls[n](); ts[n].append(time.perf_counter() - t)
        o, n_ = statistics.median(ts["old"]) * 1e6, statistics.median(ts["new"]) * 1e6
        print(f"{str(dt)[6:]} L={L} pairs x heads {work}: old {o:.0f} us, new {n_:.0f} us, new/old {n_/o:.2f}", flush=True)
