"""Side-by-side attention benchmark: attnmask vs SDPA (+dense mask, is_causal) vs FlexAttention.

Two tables, each measured side by side in one process (engines take turns call by
call; medians of ``--repeats`` rounds, so a noisy spell on a shared machine hits
every engine alike):

- the mask sweep (same options as ``attnmask bench``; ``--dtype float32,bfloat16``
  gives rows for both dtypes), written to benchmarks/results/attention.md;
- ``--model-shapes``: the shapes of a small real model (SmolLM2-135M: H=9, Hkv=3,
  D=64) at L = 1024 and 4096 in fp32 and bf16: a window with and without a
  4-key sink, a window with 32 key columns, a per-head list of nine different
  masks against the sum of their ideals, and decode steps (q_len = 1) with that
  list (and one mask) against SDPA's decode step at 4K and 64K cached keys (a
  fixed cache, whose plan is cached, and a cache that grows by one key per
  step, a new shape and so a new plan every call). Written to
  benchmarks/results/model_shapes.md.

The ideal of a mask is SDPA is_causal's time (same dtype, same heads) x its
attended pairs / the causal pairs; a per-head list's ideal sums its heads'.

    $ python benchmarks/bench_attention.py --masks sliding --lengths 4096 --no-flex --no-extras
    $ python benchmarks/bench_attention.py --model-shapes --repeats 9
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnmask as am
from harness import machine_description, main, save_results, without_kernel

#: Nine different masks for the heads of one layer, as a per-head fit gives them (mean density ~0.2).
NINE_MASKS = ["causal & (sliding(32) | sink(4))", "causal & (sliding(64) | sink(4))",
              "causal & (sliding(128) | sink(4))", "causal & (sliding(256) | sink(4))", "causal & sliding(64)",
              "causal & (sliding(16) | sink(1))", "causal & (sliding(512) | sink(4))", "causal",
              "causal & (sliding(128) | cols(0, 8))"]


def _columns(n: int, count: int = 32) -> str:
    """``count`` heavy-hitter key columns spread over the first 90% of the sequence."""
    step = max(1, int(n * 0.9) // count)
    return " | ".join(f"cols({7 + i * step})" for i in range(count))


def _median_rounds(calls: dict, repeats: int) -> dict[str, float]:
    """Median ms per call, the calls taking turns round by round (one warm-up each).

    Each round takes the calls in a new order (a seeded shuffle): on the project's machine the
    attnmask call right after SDPA's ran slower, whichever mask it was (benchmarks/results/
    model_shapes.md, 2026-12-02), so no call may always follow the same one."""
    with torch.no_grad():
        for fn in calls.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in calls}
        labels, shuffle = list(calls), random.Random(0)
        for _ in range(repeats):
            shuffle.shuffle(labels)
            for label in labels:
                fn = calls[label]
                t0 = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


_ATEN = " @aten"


def _with_aten(calls: dict, aten: bool) -> dict:
    """``calls`` plus, when ``aten``, each attnmask call again with ATTNMASK_KERNEL=0 (label + _ATEN)."""
    if not aten:
        return calls
    return {**calls, **{label + _ATEN: without_kernel(fn) for label, fn in calls.items() if not label.startswith("sdpa")}}


def model_shapes(repeats: int, lengths=(1024, 4096), decode_keys=(4096, 65536), dtypes=("float32", "bfloat16"),
                 log=print, aten: bool = False) -> list[str]:
    """Measure the model-shapes table; returns its markdown lines.

    ``aten``: every attnmask call is also timed with ATTNMASK_KERNEL=0 (the ATen path, the "before"
    of the fused kernel) in the same rounds, and two more columns give its time and ratio."""
    H, Hkv, D = 9, 3, 64
    nine = [am.parse(t) for t in NINE_MASKS]
    extra = " ATTNMASK_KERNEL=0 ms | ratio then |" if aten else ""
    lines = ["| dtype | L | case | attnmask ms | reference | reference ms | ratio | target |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if aten else "")]

    def line(dtype_name, where, case, ms, mine, ref_name, ref, target):
        # ``mine`` / ``ref``: labels of ms, or a number (an ideal: the same before and after)
        def get(x, suffix=""):
            return x if isinstance(x, float) else ms[x + suffix] if x + suffix in ms else ms[x]
        a, r = get(mine), get(ref)
        text = (f"| {dtype_name} | {where} | {case} | {a:.{3 if a < 1 else 2}f} | {ref_name} | "
                f"{r:.{3 if r < 1 else 2}f} | {a / r:.2f} | {target} |")
        if aten:
            a0, r0 = get(mine, _ATEN), get(ref, _ATEN)
            text += f" {a0:.{3 if a0 < 1 else 2}f} | {a0 / r0:.2f} |"
        lines.append(text)
        log(text)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for L in lengths:
            g = torch.Generator().manual_seed(L)
            q = torch.randn(1, H, L, D, generator=g).to(dtype)
            k, v = (torch.randn(1, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
            window = am.parse("causal & sliding(64)")
            sink = am.parse("causal & (sliding(64) | sink(4))")
            cols = am.parse(f"causal & (sliding(256) | {_columns(L)})")
            lays = {"window": window.compile(L), "sink": sink.compile(L), "cols": cols.compile(L),
                    "nine": [m.compile(L) for m in nine]}
            calls = {
                "sdpa is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                "window": lambda: am.attention(q, k, v, lays["window"], enable_gqa=True),
                "window + sink(4)": lambda: am.attention(q, k, v, lays["sink"], enable_gqa=True),
                "window(256) + 32 cols": lambda: am.attention(q, k, v, lays["cols"], enable_gqa=True),
                "nine per-head masks": lambda: am.attention(q, k, v, lays["nine"], enable_gqa=True),
                "causal": lambda: am.attention(q, k, v, am.causal, enable_gqa=True),
            }
            ms = _median_rounds(_with_aten(calls, aten), repeats)
            causal_pairs = L * (L + 1) / 2
            per_pair = ms["sdpa is_causal"] / causal_pairs          # all 9 heads
            ideal_cols = per_pair * lays["cols"].attended_pairs()
            ideal_nine = per_pair * sum(lay.attended_pairs() for lay in lays["nine"]) / H
            rows = [
                ("window + sink(4) vs window", "window + sink(4)", "`causal & sliding(64)`", "window", "<= 1.1"),
                ("window(256) + 32 cols vs its ideal", "window(256) + 32 cols", "ideal", ideal_cols, "<= 1.5"),
                ("nine per-head masks vs the sum of their ideals", "nine per-head masks", "ideal", ideal_nine,
                 "<= 1.5"),
                ("nine per-head masks vs SDPA is_causal", "nine per-head masks", "SDPA is_causal",
                 "sdpa is_causal", ""),
                ("`causal` vs SDPA is_causal", "causal", "SDPA is_causal", "sdpa is_causal", ""),
            ]
            for case, mine, ref_name, ref, target in rows:
                line(dtype_name, L, case, ms, mine, ref_name, ref, target)
        for Lk in decode_keys:
            g = torch.Generator().manual_seed(Lk)
            q = torch.randn(1, H, 1, D, generator=g).to(dtype)
            k, v = (torch.randn(1, Hkv, Lk + 64, D, generator=g).to(dtype) for _ in range(2))
            kf, vf = k[:, :, :Lk], v[:, :, :Lk]
            step = [0]

            def growing(masks):
                # a cache that grows by one key per step: a new shape, so a new (short-call) plan, every call
                step[0] = (step[0] + 1) % 64
                n = Lk + step[0]
                return am.attention(q, k[:, :, :n], v[:, :, :n], masks, enable_gqa=True)

            calls = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True),
                "nine per-head masks": lambda: am.attention(q, kf, vf, nine, enable_gqa=True),
                "nine per-head masks, growing cache": lambda: growing(nine),
                "causal & (sliding(64) | sink(4))": lambda: am.attention(q, kf, vf, nine[1], enable_gqa=True),
                "causal & (sliding(64) | sink(4)), growing cache": lambda: growing(nine[1]),
            }
            ms = _median_rounds(_with_aten(calls, aten), repeats)
            for case in ("nine per-head masks", "nine per-head masks, growing cache", "causal & (sliding(64) | sink(4))",
                         "causal & (sliding(64) | sink(4)), growing cache"):
                target = "<= 2" if case.startswith("nine") else ""
                line(dtype_name, f"decode, {Lk} keys", case.replace('|', chr(92) + '|'), ms, case, "SDPA decode",
                     "sdpa", target)
    return lines


def run_model_shapes(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="the model-shapes table (see the module docstring)")
    ap.add_argument("--model-shapes", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--decode-keys", default="4096,65536")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--results", default="benchmarks/results/model_shapes.md", help="markdown file ('' = none)")
    ap.add_argument("--aten-column", action="store_true",
                    help="also time every attnmask call with ATTNMASK_KERNEL=0 (the ATen path), side by side")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_attention.py " + " ".join(shlex.quote(a) for a in argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description()
    print(machine)
    t0 = time.perf_counter()
    lines = model_shapes(args.repeats, [int(x) for x in args.lengths.split(",")],
                         [int(x) for x in args.decode_keys.split(",")], args.dtype.split(","), aten=args.aten_column)
    if args.results:
        head = [
            "# Attention at a small real model's shapes (SmolLM2-135M: H=9, Hkv=3, D=64)", "",
            f"- Date: {started}",
            f"- Machine: {machine}",
            f"- Command: `{command}`",
            f"- Took {time.perf_counter() - t0:.0f} s. Median of {args.repeats} rounds, engines taking turns call "
            "by call (the load average above says how quiet the machine was).",
            "- Per-head masks: " + "; ".join(f"`{m}`" for m in NINE_MASKS) + ".",
            "- Ideal: SDPA is_causal (same dtype, enable_gqa) x attended pairs / causal pairs (a per-head list: "
            "the mean over its heads). Decode: one query row against the cache, `q_offset = Lk - 1`; SDPA "
            "attends every key. \"growing cache\": the cache grows by one key per step (a new shape every call).",
            *(["- `ATTNMASK_KERNEL=0 ms` / `ratio then`: the same attnmask call with the fused kernel off (the ATen "
               "path), timed in the same rounds; the reference of `ratio then` is likewise taken with the kernel "
               "off where it is attnmask's own (the window), SDPA and ideals are unchanged."] if args.aten_column else []),
            "",
        ]
        save_results(args.results, "\n".join(head + lines) + "\n")
        print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--model-shapes" in argv:
        sys.exit(run_model_shapes(argv))
    sys.exit(main(results="benchmarks/results/attention.md", plot="docs/bench_attention.png"))
