"""Where a first call's extra time goes: one case in this (fresh) process, its stages timed per call.

bench_first_call.py says how much slower a first call is; this probe says where: it wraps the
engine's stages (``compile``: the dispatcher's layout compile; ``plan``: ``plan_for``; ``items``:
``fused.plan_items``, the kernel's item table and packed masks; ``kernel fwd`` / ``kernel bwd``:
``fused.run_items`` / ``fused.run_backward``) and prints, for the first three calls, their times,
the minor page faults, and the modules the call imported. torch's own first
``Tensor.backward(gradient)`` (its sympy import) is paid before the calls, as bench_first_call.py
does. The engine's modules are imported before the calls (to wrap them); in bench_first_call.py
the first call imports them. Run it under the CPU lock, a few times (one process is one sample).

    $ python benchmarks/probe_first_call.py sinks 16384 forward
    $ python benchmarks/probe_first_call.py sliding 8192 fwd_bwd
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time

import torch

import attnmask as am
from attnmask.engines import autograd, blocksparse, dispatch, fused
from harness import MASKS

STAGES = {"compile": (dispatch, "_resolve_masks"), "plan": (blocksparse, "plan_for"),
          "items": (fused, "plan_items"), "kernel fwd": (fused, "run_items"), "kernel bwd": (fused, "run_backward")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mask", choices=list(MASKS))
    ap.add_argument("length", type=int)
    ap.add_argument("mode", choices=["forward", "fwd_bwd"])
    args = ap.parse_args(argv)
    if args.mode == "fwd_bwd":
        x = torch.ones(3, requires_grad=True)
        t0 = time.perf_counter()
        (x * 2).backward(torch.ones(3))
        print(f"torch's first backward(gradient): {(time.perf_counter() - t0) * 1e3:.0f} ms")
    spent: dict[str, float] = collections.defaultdict(float)
    inside: set[str] = set()

    def timed(fn, name):
        def run(*a, **kw):
            if name in inside:                       # a nested call (a key set's rest is planned inside)
                return fn(*a, **kw)
            inside.add(name)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
                inside.discard(name)
        return run

    for name, (module, attr) in STAGES.items():
        setattr(module, attr, timed(getattr(module, attr), name))
    autograd.plan_for = blocksparse.plan_for              # the backward's own reference to the planner
    n = args.length
    g = torch.Generator().manual_seed(0)
    mask = am.parse(MASKS[args.mask](n))
    q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
    dout = torch.randn(1, 8, n, 64, generator=g)
    if args.mode == "fwd_bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    for i in range(3):
        spent.clear()
        modules = set(sys.modules)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        if args.mode == "forward":
            with torch.no_grad():
                am.attention(q, k, v, mask)
        else:
            am.attention(q, k, v, mask).backward(dout)
            for t in (q, k, v):
                t.grad = None
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        stages = ", ".join(f"{name} {spent[name] * 1e3:.1f}" for name in STAGES if name in spent)
        new = sorted(set(sys.modules) - modules)
        print(f"call {i + 1}: {wall:.1f} ms (CPU {cpu:.1f}), {faults} minor faults; {stages}"
              + (f"; imported {', '.join(new)}" if new else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
