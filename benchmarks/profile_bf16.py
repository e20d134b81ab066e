"""Where a bf16 forward spends its time, from the kernel up: the profile behind issue 13's bf16 work.

Three measurements, each side by side in one process (calls taking turns, medians):

1. the fused CPU flash kernel on one block of a window (q 128 x k 1152, 8 heads,
   D=64), ns per score, fp32 against bf16, without a mask, with an additive
   mask in the query's dtype, with a float32 additive mask, and as is_causal;
2. the hardware's own bf16 speed: a batched QK^T matmul (oneDNN) in fp32 and bf16;
3. the engine on ``causal & sliding(1024)`` (and with ``| sink(4)``) in fp32 and
   bf16, with torch.profiler's self CPU time per operator (kernel calls, LSE
   merges, accumulator copies).

Where the engine's fused kernel (``csrc/attend.c``, ``engines/fused.py``) is usable, the
first two tables also time it (the same window block through the engine, and the engine
with ``ATTNMASK_KERNEL=0`` beside it), and a breakdown splits each call into the time
inside ``fused.run_items`` (the kernel, threads included) and the Python around it: the
kernel is one opaque call, so torch.profiler sees only the operators around it.
``ATTNMASK_KERNEL=0`` in the environment profiles the ATen path instead.

Run it with the tree to measure first on PYTHONPATH (main for "before", a branch
for "after"); ``--label`` names the run in the results file, which is appended to.

    $ PYTHONPATH=src python benchmarks/profile_bf16.py --label after --length 8192
    $ ATTNMASK_KERNEL=0 PYTHONPATH=src python benchmarks/profile_bf16.py --label "ATen path" --length 8192
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

import attnmask as am
from attnmask.engines import fused
from harness import machine_description, without_kernel

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _turns(calls: dict, repeats: int) -> dict[str, float]:
    for fn in calls.values():
        fn()
    t: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            a = time.perf_counter()
            fn()
            t[k].append(time.perf_counter() - a)
    return {k: statistics.median(v) for k, v in t.items()}


def kernel_table(repeats: int) -> list[str]:
    H, Q, K, D = 8, 128, 1152, 64
    g = torch.Generator().manual_seed(0)
    calls, cells = {}, {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).replace("torch.", "")
        q, k, v = (torch.randn(1, H, n, D, generator=g).to(dt) for n in (Q, K, K))
        allowed = torch.rand(Q, K, generator=g) > 0.3
        add = torch.zeros(Q, K, dtype=dt).masked_fill_(~allowed, float("-inf"))
        add32 = torch.zeros(Q, K).masked_fill_(~allowed, float("-inf"))
        qc = torch.randn(1, H, K, D, generator=g).to(dt)
        calls[f"{name} no mask"] = lambda q=q, k=k, v=v: _flash(q, k, v, 0.0, False, scale=0.125)
        calls[f"{name} additive mask ({name})"] = lambda q=q, k=k, v=v, m=add: _flash(q, k, v, 0.0, False, attn_mask=m,
                                                                                      scale=0.125)
        calls[f"{name} additive mask (float32)"] = lambda q=q, k=k, v=v, m=add32: _flash(q, k, v, 0.0, False,
                                                                                         attn_mask=m, scale=0.125)
        calls[f"{name} is_causal, 1152 x 1152"] = lambda q=qc, k=k, v=v: _flash(q, k, v, 0.0, True, scale=0.125)
        for key in list(calls):
            cells.setdefault(key, H * K * (K + 1) / 2 if "is_causal" in key else H * Q * K)
        a = torch.randn(H, Q, D, generator=g).to(dt)
        b = torch.randn(H, D, K, generator=g).to(dt)
        calls[f"{name} bmm q k^T (oneDNN)"] = lambda a=a, b=b: torch.bmm(a, b)
        cells[f"{name} bmm q k^T (oneDNN)"] = H * Q * K
        # The same block through the engine: the last 128 rows of a 1152-key window, per attended pair.
        band = am.parse("causal & sliding(1024)")
        pairs = H * sum(min(1024, K - Q + i + 1) for i in range(Q))
        engine = lambda q=q, k=k, v=v: am.attention(q, k, v, band, q_offset=K - Q)
        if fused.usable(dt, D):
            calls[f"{name} engine, fused kernel, `causal & sliding(1024)` (per attended pair)"] = engine
        calls[f"{name} engine, ATen path, `causal & sliding(1024)` (per attended pair)"] = without_kernel(engine)
        for key in list(calls):
            cells.setdefault(key, pairs)
    ms = _turns(calls, repeats)
    lines = ["| call | ns / score (median) |", "|---|---|"]
    for key, t in ms.items():
        lines.append(f"| {key} | {t * 1e9 / cells[key]:.2f} |")
    return lines


def engine_profile(L: int, repeats: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    H, D = 8, 64
    g = torch.Generator().manual_seed(1)
    lines = []
    calls = {}
    tensors = {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).replace("torch.", "")
        tensors[dt] = tuple(torch.randn(1, H, L, D, generator=g).to(dt) for _ in range(3))
        for text in ("causal & sliding(1024)", "causal & (sliding(1024) | sink(4))"):
            lay = am.parse(text).compile(L)
            q, k, v = tensors[dt]
            fn = lambda q=q, k=k, v=v, lay=lay: am.attention(q, k, v, lay)
            if fused.usable(dt, D):
                calls[f"{name} `{text}`, fused kernel"] = fn
                calls[f"{name} `{text}`, ATTNMASK_KERNEL=0"] = without_kernel(fn)
            else:
                calls[f"{name} `{text}`, ATen path ({fused.status()['reason'] or 'kernel unusable'})"] = fn
        q, k, v = tensors[dt]
        calls[f"{name} SDPA is_causal"] = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True)
    ms = _turns(calls, repeats)
    lines += [f"L={L}, H={H}, D={D}; median of {repeats} calls, taking turns.", "",
              "| case | ms |", "|---|---|"]
    lines += [f"| {k} | {t * 1e3:.1f} |" for k, t in ms.items()]
    for dt in (torch.float32, torch.bfloat16):
        if fused.usable(dt, D):
            lines += [""] + kernel_breakdown(tensors[dt], L, repeats)
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = tensors[dt]
        lay = am.parse("causal & (sliding(1024) | sink(4))").compile(L)
        am.attention(q, k, v, lay)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(3):
                am.attention(q, k, v, lay)
            wall = time.perf_counter() - t0
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        lines += ["", f"torch.profiler, {str(dt).replace('torch.', '')} `causal & (sliding(1024) | sink(4))`, "
                      f"3 calls ({wall * 1e3:.1f} ms wall; the fused kernel, where it ran, is no operator): "
                      "self CPU time by operator", "",
                  "| operator | calls | self CPU ms | share |", "|---|---|---|---|"]
        for e in rows:
            lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                         f"{e.self_cpu_time_total / max(total, 1):.0%} |")
    return lines


def kernel_breakdown(tensors, L: int, repeats: int) -> list[str]:
    """Each engine call split into the wall time inside ``fused.run_items`` and the rest (median of calls).

    ``run_items`` is the kernel (the C call and its thread hand-off); the rest is the engine's
    Python: plan lookup, output allocation, the float32 -> bf16 cast. Calls running side by
    side on threads would add up to more than the wall time; these single-mask calls make one."""
    q, k, v = tensors
    name = str(q.dtype).replace("torch.", "")
    spent: list[float] = []
    original = fused.run_items

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    lines = [f"Breakdown, {name}: wall ms per call inside the fused kernel (`fused.run_items`) and around it, "
             f"median of {repeats} calls", "",
             "| case | call ms | kernel ms | kernel calls | Python around it ms | kernel share |", "|---|---|---|---|---|---|"]
    fused.run_items = timed
    try:
        for text in ("causal & sliding(1024)", "causal & (sliding(1024) | sink(4))"):
            lay = am.parse(text).compile(L)
            am.attention(q, k, v, lay)
            totals, inside, counts = [], [], []
            for _ in range(repeats):
                spent.clear()
                t = time.perf_counter()
                am.attention(q, k, v, lay)
                totals.append(time.perf_counter() - t)
                inside.append(sum(spent))
                counts.append(len(spent))
            tot, ins = statistics.median(totals), statistics.median(inside)
            lines.append(f"| `{text}` | {tot * 1e3:.2f} | {ins * 1e3:.2f} | {max(counts)} | {(tot - ins) * 1e3:.2f} | "
                         f"{ins / tot:.0%} |")
    finally:
        fused.run_items = original
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results", default="benchmarks/results/bf16_profile.md", help="file appended to ('' = none)")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description()
    env = f"ATTNMASK_KERNEL={os.environ['ATTNMASK_KERNEL']} " if "ATTNMASK_KERNEL" in os.environ else ""
    text = [f"## {args.label}", "", f"- Date: {started}", f"- Machine: {machine}",
            f"- Command: `{env}PYTHONPATH={os.environ.get('PYTHONPATH', '')} python benchmarks/profile_bf16.py "
            + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
            f"- attnmask from: `{os.path.dirname(am.__file__)}`",
            f"- ATTNMASK_KERNEL={os.environ.get('ATTNMASK_KERNEL', '(unset)')}", "",
            "### The flash kernel, one window block (q 128 x k 1152, 8 heads, D=64)", ""]
    text += kernel_table(args.repeats)
    text += ["", "### The engine", ""] + engine_profile(args.length, args.repeats)
    out = "\n".join(text) + "\n\n"
    print(out)
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        new = not os.path.exists(args.results)
        with open(args.results, "a") as f:
            if new:
                f.write("# The bf16 path, profiled (issue 13)\n\nEach section is one run of "
                        "benchmarks/profile_bf16.py; \"before\" runs main's tree, \"after\" this branch's.\n\n")
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
