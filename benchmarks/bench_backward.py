"""Forward + backward benchmark of the block-sparse engine against SDPA, side by side in one run.

Default case (issue 6): N=8192, H=8, D=64, float32, ``causal & sliding(1024)``.
It times, best of ``--repeats`` after one warm-up:

* attnmask forward (no grad), attnmask backward alone (also with a gradient into the returned
  lse), attnmask forward + backward;
* SDPA with a dense bool mask, forward + backward (the competitor of the target);
* SDPA ``is_causal`` forward and forward + backward (the anchor of the ideal:
  is_causal time x attended pairs / (N(N+1)/2)).

and, each in a fresh subprocess, the peak memory a training step (forward +
backward, layout compile included) adds on top of its inputs: attnmask at
``--memory-length`` (64K by default), and attnmask vs SDPA+mask at N. torch
allocations are invisible to tracemalloc, so the peak is the process's VmHWM
(reset through /proc/self/clear_refs just before the step) minus its RSS
before it. Ratios are printed against the issue's targets and written to
``benchmarks/results/backward.md`` with the date, machine and command.

    python benchmarks/bench_backward.py                       # the full run (a few minutes)
    python benchmarks/bench_backward.py --length 2048 --memory-length 8192 --results ''   # quick look

``attnmask bench --mode backward`` runs the same forward + backward engines
over the benchmark's masks and lengths (``harness.MODES["backward"]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import attnmask as am
from harness import fwd_bwd, machine_description, reset_peak, save_results, status_kb, without_kernel

ATEN_FWD, ATEN_FWD_BWD = "attnmask fwd, ATTNMASK_KERNEL=0", "attnmask fwd+bwd, ATTNMASK_KERNEL=0"
TARGETS = {"bwd_over_fwd": 2.5, "sdpa_mask_over_ours": 5.0, "memory_gb": 1.0}


# -- one forward + backward step of each engine ----------------------------------------------------

def fwd_bwd_attnmask(q, k, v, layout, dout) -> Callable[[], None]:
    """One attnmask forward + backward (gradients into fresh leaves)."""
    return fwd_bwd(lambda qq, kk, vv: am.attention(qq, kk, vv, layout, backend="blocksparse"), q, k, v, dout)


def fwd_bwd_sdpa(q, k, v, dout, *, attn_mask=None, is_causal=False) -> Callable[[], None]:
    return fwd_bwd(lambda qq, kk, vv: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=attn_mask,
                                                                      is_causal=is_causal), q, k, v, dout)


# -- memory in a fresh process ---------------------------------------------------------------------

def memory_child(engine: str, n: int, heads: int, dim: int, mask_text: str, block_size: int) -> dict:
    """Peak memory (MB) one training step adds on top of its inputs, in this (fresh) process."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, heads, n, dim, generator=g) for _ in range(4))
    mask = am.parse(mask_text)
    if engine == "sdpa+mask":   # the dense mask is part of that engine's cost
        def step():
            dense = mask.to_dense(n, limit=n * n)
            fwd_bwd_sdpa(q, k, v, dout, attn_mask=dense)()
    else:
        def step():
            layout = mask.compile(n, block_size=block_size)
            fwd_bwd_attnmask(q, k, v, layout, dout)()
    base = status_kb("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    # A training step must at least create out, dq, dk and dv: as large as the four inputs.
    return {"engine": engine, "n": n, "added_mb": (peak - base) / 1024, "inputs_mb": 4 * q.numel() * 4 / 2**20,
            "hwm_reset": reset, "step_s": elapsed}


def run_memory(engine: str, n: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", engine, "--length", str(n),
           "--heads", str(args.heads), "--dim", str(args.dim), "--mask", args.mask,
           "--block-size", str(args.block_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"engine": engine, "n": n, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def measure(q, k, v, dout, layout, dense, repeats: int, aten: bool = False) -> dict[str, float | None]:
    """Best ms of each engine (attnmask fwd / bwd / fwd+bwd, SDPA is_causal fwd and fwd+bwd, SDPA+mask
    fwd+bwd when ``dense`` is given), round robin: one warm-up round, then best of ``repeats``.
    ``aten``: also attnmask's fwd and fwd+bwd with ``ATTNMASK_KERNEL=0`` (the ATen path), side by side."""
    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def fwd_attnmask():
        with torch.no_grad():
            am.attention(q, k, v, layout, backend="blocksparse")

    def fwd_causal():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def bwd_only() -> float:                 # the forward of each run is not timed
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            out = am.attention(qq, kk, vv, layout, backend="blocksparse")
        t0 = time.perf_counter()
        out.backward(dout)
        return time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    w_lse = torch.randn(q.shape[:3], generator=g)

    def bwd_with_lse() -> float:             # a gradient also into the returned lse (context parallelism)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            out, lse = am.attention(qq, kk, vv, layout, backend="blocksparse", return_lse=True)
            loss = (out * dout).sum() + (lse * w_lse).sum()
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    runs: dict[str, Callable[[], float] | None] = {
        "attnmask fwd": timed(fwd_attnmask),
        "sdpa is_causal fwd": timed(fwd_causal),
        "attnmask bwd": bwd_only,
        "attnmask bwd, lse gradient too": bwd_with_lse,
        "attnmask fwd+bwd": timed(fwd_bwd_attnmask(q, k, v, layout, dout)),
        "sdpa is_causal fwd+bwd": timed(fwd_bwd_sdpa(q, k, v, dout, is_causal=True)),
        "sdpa+mask fwd+bwd": None if dense is None else timed(fwd_bwd_sdpa(q, k, v, dout, attn_mask=dense)),
    }
    if aten:
        runs[ATEN_FWD] = without_kernel(timed(fwd_attnmask))
        runs[ATEN_FWD_BWD] = without_kernel(timed(fwd_bwd_attnmask(q, k, v, layout, dout)))
    # Round robin (one warm-up round, then best of --repeats): on a shared machine the load
    # drifts, and interleaving lets every engine see the same conditions.
    best: dict[str, float] = {}
    for rnd in range(repeats + 1):
        for name, run in runs.items():
            if run is None:
                continue
            t = run()
            if rnd:
                best[name] = min(best.get(name, math.inf), t)
    return {name: (best[name] * 1e3 if name in best else None) for name in runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--mask", default="causal & sliding(1024)",
                   help="mask text, or a benchmark mask name of harness.MASKS (e.g. random_documents)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (comma-separated: a table for each)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine (best kept; the box is shared)")
    p.add_argument("--memory-length", type=int, default=65536, help="length of the memory check (0 = skip)")
    p.add_argument("--no-sdpa-mask", action="store_true", help="skip SDPA with a dense mask")
    p.add_argument("--aten-column", action="store_true",
                   help="also time attnmask's fwd and fwd+bwd with ATTNMASK_KERNEL=0 (the ATen path), side by side")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default="benchmarks/results/backward.md", help="markdown file ('' = none)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from harness import MASKS
    if args.mask in MASKS:
        args.mask = MASKS[args.mask](args.length)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.length, args.heads, args.dim, args.mask,
                                      args.block_size)))
        return 0

    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_backward.py"] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mach = machine_description()
    n, H, D = args.length, args.heads, args.dim
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    print(f"bench_backward: N={n} H={H} D={D} {dtypes} mask {args.mask!r}\n  {mach}")
    mask = am.parse(args.mask)
    layout = mask.compile(n, block_size=args.block_size)
    frac = layout.attended_pairs() / (n * (n + 1) / 2)
    dense = None if args.no_sdpa_mask else mask.to_dense(n, limit=n * n)
    sections, summary = [], []
    for dtype_name in dtypes:
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, H, n, D, generator=g).to(getattr(torch, dtype_name)) for _ in range(4))
        ms = measure(q, k, v, dout, layout, dense, args.repeats, aten=args.aten_column)
        ideal_f = ms["sdpa is_causal fwd"] * frac
        ideal_fb = ms["sdpa is_causal fwd+bwd"] * frac
        bwd_ratio = ms["attnmask bwd"] / ms["attnmask fwd"]
        sdpa_ratio = None if ms["sdpa+mask fwd+bwd"] is None else ms["sdpa+mask fwd+bwd"] / ms["attnmask fwd+bwd"]
        lines = [f"| {dtype_name} | {name} | {'-' if t is None else f'{t:,.1f}'} |" for name, t in ms.items()]
        lines.append(f"| {dtype_name} | ideal fwd (is_causal fwd x {frac:.3f}) | {ideal_f:,.1f} |")
        lines.append(f"| {dtype_name} | ideal fwd+bwd (is_causal x {frac:.3f}) | {ideal_fb:,.1f} |")
        sections += lines
        summary += [
            f"- {dtype_name}: backward / forward = {bwd_ratio:.2f} (target <= {TARGETS['bwd_over_fwd']:.1f}): "
            f"{verdict(bwd_ratio <= TARGETS['bwd_over_fwd'])}",
            f"- {dtype_name}: SDPA+mask fwd+bwd / attnmask fwd+bwd = "
            + ("-" if sdpa_ratio is None else f"{sdpa_ratio:.1f}x")
            + f" (target >= {TARGETS['sdpa_mask_over_ours']:.0f}x): "
            + verdict(None if sdpa_ratio is None else sdpa_ratio >= TARGETS["sdpa_mask_over_ours"]),
            f"- {dtype_name}: backward with an lse gradient / without = "
            f"{ms['attnmask bwd, lse gradient too'] / ms['attnmask bwd']:.2f}",
            f"- {dtype_name}: attnmask fwd / ideal fwd = {ms['attnmask fwd'] / ideal_f:.2f}; "
            f"attnmask fwd+bwd / ideal = {ms['attnmask fwd+bwd'] / ideal_fb:.2f}; "
            f"attnmask fwd+bwd / SDPA is_causal fwd+bwd = {ms['attnmask fwd+bwd'] / ms['sdpa is_causal fwd+bwd']:.2f}",
        ]
        if ms.get(ATEN_FWD):
            summary.append(
                f"- {dtype_name}: with ATTNMASK_KERNEL=0 (the ATen path), side by side: fwd {ms[ATEN_FWD]:,.1f} ms "
                f"({ms[ATEN_FWD] / ideal_f:.2f}x the ideal), fwd+bwd {ms[ATEN_FWD_BWD]:,.1f} ms; backward / forward "
                f"{(ms[ATEN_FWD_BWD] - ms[ATEN_FWD]) / ms[ATEN_FWD]:.2f} (fwd+bwd - fwd)"
                + ("" if sdpa_ratio is None else f"; SDPA+mask fwd+bwd / it = {ms['sdpa+mask fwd+bwd'] / ms[ATEN_FWD_BWD]:.1f}x"))
        print("\n".join(lines))

    mem = []
    if args.memory_length:
        mem.append(run_memory("attnmask", args.memory_length, args))
        mem.append(run_memory("attnmask", n, args))
        if not args.no_sdpa_mask:
            mem.append(run_memory("sdpa+mask", n, args))
    mem_lines = []
    for m in mem:
        if "error" in m:
            mem_lines.append(f"| {m['engine']} | {m['n']:,} | failed: {m['error']} | | |")
        else:
            mem_lines.append(f"| {m['engine']} | {m['n']:,} | {m['added_mb']:,.0f} | {m['inputs_mb']:,.0f} | "
                             f"{m['step_s']:.2f} |")
    big = next((m for m in mem if m["engine"] == "attnmask" and m["n"] == args.memory_length and "error" not in m),
               None)
    mem_ok = None if big is None else big["added_mb"] < TARGETS["memory_gb"] * 1024
    if args.memory_length:
        summary.append("- training step at " + f"{args.memory_length:,}" + " tokens (float32) adds "
                       + ("-" if big is None else f"{big['added_mb']:,.0f} MB")
                       + f" (target < {TARGETS['memory_gb']:.0f} GB): " + verdict(mem_ok))
    memory_part = [] if not mem_lines else [
        "Peak memory added by one training step (float32, forward + backward, compile or dense mask included), "
        "fresh subprocess, VmHWM - RSS before the step:", "",
        "| engine | tokens | added MB | inputs (q, k, v, dout) MB = the least a step adds (out, dq, dk, dv) "
        "| step s |", "|---|---|---|---|---|", *mem_lines, ""]
    report = "\n".join([
        "# Backward benchmark (issues 6, 13)", "",
        f"- date: {started}", f"- machine: {mach}", f"- command: `{command}`",
        f"- case: N={n:,}, H={H}, D={D}, {', '.join(dtypes)}, `{args.mask}`, block {args.block_size}, "
        f"density of causal {frac:.3f}; best of {args.repeats} round-robin runs after a warm-up round", "",
        "| dtype | what | ms |", "|---|---|---|", *sections, "", *memory_part,
        "Against the targets:", "", *summary, ""])
    print(report)
    if args.results:
        save_results(args.results, report)
        print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
