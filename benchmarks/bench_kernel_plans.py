"""The fused kernel on two plans of one layout, side by side in one process: the ATen path's
(``costs.FORWARD``, what the kernel ran before it had plans of its own) and the kernel's
(``costs.KERNEL``), through ``fused.run_items`` alone (no dispatch, no output copy).

Prints a markdown row per (mask, dtype): best and median ms of each, and KERNEL / FORWARD.

    $ python benchmarks/bench_kernel_plans.py --lengths 16384 --masks sliding,sinks --repeats 5
    $ python benchmarks/bench_kernel_plans.py --lengths 4096 --heads 9 --kv-heads 3 \\
          --masks "causal & sliding(64);causal & (sliding(64) | sink(4))"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnmask as am
from attnmask.engines import blocksparse, fused
from attnmask.engines.costs import FORWARD, KERNEL
from harness import MASKS, machine_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384")
    ap.add_argument("--masks", default="sliding,sinks,documents,random_documents,chunked,signature",
                    help="benchmark mask names (harness.MASKS), or mask texts separated by ';'")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="GQA: key heads (default: --heads)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    H, D = args.heads, args.dim
    Hkv = args.kv_heads or H
    sep = ";" if ";" in args.masks else ","
    print(machine_description())
    print("| mask | L | dtype | FORWARD best ms | KERNEL best ms | ratio | FORWARD median | KERNEL median | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for L in (int(x) for x in args.lengths.split(",")):
        for dtype_name in args.dtype.split(","):
            dtype = getattr(torch, dtype_name)
            g = torch.Generator().manual_seed(L)
            q = torch.randn(Hkv, H // Hkv, L, D, generator=g).to(dtype)
            k, v = (torch.randn(Hkv, 1, L, D, generator=g).to(dtype).expand(Hkv, H // Hkv, L, D) for _ in range(2))
            out, lse = torch.empty(q.shape), torch.empty(q.shape[:3])
            for name in args.masks.split(sep):
                text = MASKS[name](L) if name in MASKS else name
                layout = am.parse(text).compile(L)
                calls = {}
                for d in (FORWARD, KERNEL):
                    plan = blocksparse.plan_for(layout, d)
                    items = fused.causal_items(((0, L),)) if plan.causal else fused.plan_items(plan)
                    calls[d.name] = lambda items=items: fused.run_items(items, q, k, v, D ** -0.5, out, lse)
                times = {x: [] for x in calls}
                for fn in calls.values():
                    fn()
                for _ in range(args.repeats):
                    for x, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        times[x].append((time.perf_counter() - t0) * 1e3)
                a, b = min(times["forward"]), min(times["kernel"])
                ma, mb = statistics.median(times["forward"]), statistics.median(times["kernel"])
                print(f"| {name.replace('|', chr(92) + '|')} | {L} | {dtype_name} | {a:.2f} | {b:.2f} | {b / a:.2f} | "
                      f"{ma:.2f} | {mb:.2f} | {mb / ma:.2f} |", flush=True)


if __name__ == "__main__":
    main()
