"""`causal & (sliding(w) | sink(4))` against `causal & sliding(w)` alone, side by side (issue 13).

The model-shapes table (bench_attention.py --model-shapes) times nine calls per round, and at these
millisecond sizes which call a mask follows moves it by 20-40% on the project's machine; this bench
times only the pair, alternating which goes first, over many rounds, and reports the median and the
best ratio. SmolLM2-135M shapes (B=1, H=9, Hkv=3, D=64), L = 1024 and 4096, float32 and bfloat16.

    /work/notes/cpu python benchmarks/bench_sink_pair.py [--rounds 25] [--window 64]
"""
import argparse
import statistics
import time

import torch

import attnmask as am
from harness import kernel_description, machine_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    print(f"- {machine_description()}, {kernel_description()}")
    print(f"- {args.rounds} rounds, the two calls alternating which goes first; 3 warm-up calls each\n")
    print("| dtype | L | window ms | + sink(4) ms | ratio (median) | ratio (best) | target |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    B, H, Hkv, D = 1, 9, 3, 64
    masks = {"window": am.causal & am.sliding(args.window),
             "sink": am.causal & (am.sliding(args.window) | am.sink(4))}
    for dtype in (torch.float32, torch.bfloat16):
        for L in (1024, 4096):
            q = torch.randn(B, H, L, D).to(dtype)
            k, v = (torch.randn(B, Hkv, L, D).to(dtype) for _ in range(2))
            with torch.no_grad():
                for m in masks.values():
                    for _ in range(3):
                        am.attention(q, k, v, m, enable_gqa=True)
                times = {n: [] for n in masks}
                for r in range(args.rounds):
                    for n in (list(masks) if r % 2 else list(masks)[::-1]):
                        t0 = time.perf_counter()
                        am.attention(q, k, v, masks[n], enable_gqa=True)
                        times[n].append((time.perf_counter() - t0) * 1e3)
            w, s = statistics.median(times["window"]), statistics.median(times["sink"])
            print(f"| {str(dtype)[6:]} | {L} | {w:.2f} | {s:.2f} | {s / w:.3f} | "
                  f"{min(times['sink']) / min(times['window']):.3f} | <= 1.1 |")


if __name__ == "__main__":
    main()
