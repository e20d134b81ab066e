"""float16 inputs: the float32 kernel on upcast copies (the engine's route) against the ATen path
(ATTNMASK_KERNEL=0, ATen's fp16 flash kernel per tile range) and against float32 inputs, at N=8192,
H=8, D=64, `causal & sliding(1024)`; the three calls alternate, best and median of 7 rounds.

    /work/notes/cpu python benchmarks/probe_fp16.py
"""
import os, statistics, time, torch, attnmask as am

torch.manual_seed(0)
m = am.causal & am.sliding(1024)
q16, k16, v16 = (torch.randn(1, 8, 8192, 64).half() for _ in range(3))
q32, k32, v32 = q16.float(), k16.float(), v16.float()


def run(q, k, v, kernel):
    os.environ["ATTNMASK_KERNEL"] = "1" if kernel else "0"
    am.attention(q, k, v, m)


calls = {"fp16, float32 kernel on copies": lambda: run(q16, k16, v16, True),
         "fp16, ATen path (ATTNMASK_KERNEL=0)": lambda: run(q16, k16, v16, False),
         "fp32 inputs, kernel": lambda: run(q32, k32, v32, True)}
with torch.no_grad():
    for f in calls.values():
        f()
    ts = {n: [] for n in calls}
    for r in range(7):
        for n in (list(calls) if r % 2 else list(calls)[::-1]):
            t = time.perf_counter(); calls[n](); ts[n].append(time.perf_counter() - t)
os.environ.pop("ATTNMASK_KERNEL")
for n, t in ts.items():
    print(f"| {n} | {min(t) * 1e3:.1f} | {statistics.median(t) * 1e3:.1f} |")
