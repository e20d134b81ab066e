"""The side-by-side attention benchmark behind ``attnmask bench`` (and the shared helpers of benchmarks/).

It lives in the repository's benchmarks/ folder, not in the package: ``attnmask bench``
loads this file from a source checkout (see ``attnmask.cli``), and the scripts beside it
import it as ``harness``. It writes files only where asked (``--results``, ``--plot``,
``--json``; none by default).

In one process, for each mask and length, it times the engines of a *mode*
(registry ``MODES``; ``"forward"`` is built in): attnmask's blocksparse engine,
SDPA with a dense bool mask, SDPA ``is_causal`` (the anchor of the ideal) and
FlexAttention (compiled; compile time reported apart from the warm time).
The ideal for a mask is ``is_causal time x attended pairs / (N(N+1)/2)``.
It prints a table of times, ratios and distance from the ideal, saves a
log-log plot (time against length, one line per engine) and writes a
markdown results file with the date, machine and command. Extra checks run in
fresh subprocesses: first call against second call, peak memory of a 128K
sliding-window forward, and a decoding step against 1M cached keys.

Each competitor is one function ``prepare(case) -> callable`` that raises
:class:`Skip` when it does not fit; a mode is a dict of them, so other modes
(e.g. forward + backward) can be added without touching the rest.

    $ python benchmarks/harness.py --masks sliding,causal --lengths 4096 --no-flex --no-extras
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["add_arguments", "run_from_args", "main", "MASKS", "MODES", "Case", "Skip", "register_mode"]


# -- masks -----------------------------------------------------------------------------------------

def _doc_lengths(n: int) -> list[int]:
    # Eight packed documents of uneven, fixed proportions (boundaries not block-aligned).
    fracs = (0.05, 0.2, 0.1, 0.15, 0.1, 0.25, 0.05)
    lens = [max(1, int(n * f)) for f in fracs]
    lens.append(max(1, n - sum(lens)))
    return lens


def _random_doc_lengths(n: int, count: int = 8, lo: int = 500, hi: int = 1500, seed: int = 0) -> list[int]:
    """``count`` seeded random document lengths in [lo, hi] (at 8K), scaled to sum to ``n``."""
    import random
    rnd = random.Random(seed)
    raw = [rnd.randint(lo, hi) for _ in range(count)]
    lens = [max(1, round(x * n / sum(raw))) for x in raw[:-1]]
    lens.append(max(1, n - sum(lens)))
    return lens


def _mask_text(name: str, n: int) -> str:
    texts = {
        "sliding": "causal & sliding(1024)",
        "sinks": "causal & (sliding(1024) | sink(4))",
        "documents": "causal & document(" + ", ".join(str(x) for x in _doc_lengths(n)) + ")",
        "random_documents": "causal & document(" + ", ".join(str(x) for x in _random_doc_lengths(n)) + ")",
        "chunked": "causal & chunked(2048)",
        "signature": f"causal - (rows(1000, {n}, 4096) - diagonal)",
        "dilated": "dilated(512, 4)",
        "causal": "causal",
    }
    return texts[name]


MASKS: dict[str, Callable[[int], str]] = {name: (lambda n, _name=name: _mask_text(_name, n)) for name in
                                          ("sliding", "sinks", "documents", "random_documents", "chunked",
                                           "signature", "dilated", "causal")}
"""Benchmark masks by name: length -> mask text (scaled with the length where it matters)."""


# -- cases and competitors ---------------------------------------------------------------------------

class Skip(Exception):
    """A competitor does not fit this case (memory, time or support); the message says why."""


@dataclass
class Case:
    mask_name: str
    mask_text: str
    n: int
    heads: int
    dim: int
    dtype: torch.dtype
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    args: argparse.Namespace
    notes: dict = field(default_factory=dict)

    @property
    def mask(self):
        from attnmask.language import parse
        return parse(self.mask_text)


def prep_attnmask(case: Case) -> Callable:
    from attnmask.engines import attention
    t0 = time.perf_counter()
    layout = case.mask.compile(case.n, block_size=case.args.block_size)
    case.notes["compile_ms"] = (time.perf_counter() - t0) * 1e3
    case.notes["attended"] = layout.attended_pairs()
    q, k, v = case.q, case.k, case.v
    return lambda: attention(q, k, v, layout, backend="blocksparse")


ATEN_LABEL = "attnmask ATen"


def without_kernel(fn: Callable) -> Callable:
    """``fn`` run with ``ATTNMASK_KERNEL=0``: the engine's ATen path, the "before" of the fused kernel.

    The engine reads the variable on every call (``engines.fused.usable``), so the two paths
    can take turns in one process, side by side."""
    def call():
        old = os.environ.get("ATTNMASK_KERNEL")
        os.environ["ATTNMASK_KERNEL"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["ATTNMASK_KERNEL"]
            else:
                os.environ["ATTNMASK_KERNEL"] = old
    return call


def prep_attnmask_aten(case: Case) -> Callable:
    return without_kernel(prep_attnmask(case))


def prep_sdpa_mask(case: Case) -> Callable:
    import torch.nn.functional as F
    n = case.n
    # bool mask n^2 bytes, and SDPA turns it into an additive float mask (n^2 x itemsize).
    need = n * n * (1 + case.q.element_size())
    if need > case.args.max_dense_gb * 2**30:
        raise Skip(f"dense mask needs {need / 2**30:.1f} GB > --max-dense-gb {case.args.max_dense_gb}")
    if case.notes.get("sdpa_mask_est_s", 0) > case.args.max_seconds:
        raise Skip("estimated over --max-seconds")
    dense = case.mask.to_dense(n, limit=n * n)
    q, k, v = case.q, case.k, case.v
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def prep_sdpa_causal(case: Case) -> Callable:
    import torch.nn.functional as F
    q, k, v = case.q, case.k, case.v
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def prep_flex(case: Case) -> Callable:
    if case.args.no_flex:
        raise Skip("--no-flex")
    if case.n > case.args.flex_max_length:
        raise Skip(f"length over --flex-max-length {case.args.flex_max_length} (each shape compiles anew)")
    import warnings
    from attnmask.engines.flex import compiled_flex
    # Each (mask, shape) compiles anew; start from a clean dynamo cache so that torch's
    # recompile limit (8 per function) never silently drops later cases to eager mode.
    torch._dynamo.reset()
    block_mask = case.mask.compile(case.n, block_size=128).to_flex_block_mask()
    fn = compiled_flex()
    q, k, v = case.q, case.k, case.v
    call = lambda: fn(q, k, v, block_mask=block_mask)  # noqa: E731
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call()                               # first call compiles
    case.notes["flex_compile_s"] = time.perf_counter() - t0
    return call


def fwd_bwd(attend: Callable, q, k, v, dout) -> Callable:
    """A callable running one forward + backward of ``attend(q, k, v)`` (grads into fresh leaves).

    It turns gradients on itself: the timing loop runs under no_grad.
    """
    def step():
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            attend(qq, kk, vv).backward(dout)
    return step


def prep_attnmask_fwd_bwd(case: Case) -> Callable:
    from attnmask.engines import attention
    layout = case.mask.compile(case.n, block_size=case.args.block_size)
    case.notes["attended"] = layout.attended_pairs()
    return fwd_bwd(lambda q, k, v: attention(q, k, v, layout, backend="blocksparse"),
                   case.q, case.k, case.v, torch.randn_like(case.q))


def prep_sdpa_mask_fwd_bwd(case: Case) -> Callable:
    import torch.nn.functional as F
    n = case.n
    need = n * n * (1 + 2 * case.q.element_size())   # bool mask, float mask, and its gradient-time scores
    if need > case.args.max_dense_gb * 2**30:
        raise Skip(f"dense mask needs {need / 2**30:.1f} GB > --max-dense-gb {case.args.max_dense_gb}")
    dense = case.mask.to_dense(n, limit=n * n)
    return fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                   case.q, case.k, case.v, torch.randn_like(case.q))


def prep_sdpa_causal_fwd_bwd(case: Case) -> Callable:
    import torch.nn.functional as F
    return fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                   case.q, case.k, case.v, torch.randn_like(case.q))


MODES: dict[str, dict[str, Callable[[Case], Callable]]] = {
    "forward": {
        "attnmask": prep_attnmask,
        "sdpa+mask": prep_sdpa_mask,
        "sdpa is_causal": prep_sdpa_causal,
        "flex (warm)": prep_flex,
    },
    # FlexAttention has no CPU backward, so it is absent here.
    "backward": {
        "attnmask": prep_attnmask_fwd_bwd,
        "sdpa+mask": prep_sdpa_mask_fwd_bwd,
        "sdpa is_causal": prep_sdpa_causal_fwd_bwd,
    },
}
"""mode -> {engine label -> prepare(case) -> callable}. The first engine is attnmask's."""

ANCHOR = "sdpa is_causal"


def register_mode(name: str, engines: dict[str, Callable[[Case], Callable]]) -> None:
    """Add a benchmark mode (e.g. forward + backward); engines as in ``MODES['forward']``."""
    MODES[name] = engines


# -- timing ----------------------------------------------------------------------------------------

def time_call(fn: Callable, repeats: int, warmup: int = 1) -> float:
    """Best wall time in ms over ``repeats`` calls after ``warmup`` calls (no grad); inf if repeats is 0."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (e.g. "VmRSS", "VmHWM"); Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where unsupported.

    torch's allocations are invisible to tracemalloc, so benchmarks measure
    peak memory as VmHWM after the call minus VmRSS before it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_results(path: str, text: str) -> None:
    """Write a benchmark's results file, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def machine_description() -> str:
    """The CPU, cores, memory, OS, Python, torch and load: the header of every results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    except OSError:
        load = ""
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads{load}, "
            f"{kernel_description()}")


def kernel_description() -> str:
    """Which attention kernel the engine runs here: the fused kernel's dtypes, or why it is not used.

    Part of every machine line, so each results file says whether its figures came from the
    fused kernel (``csrc/attend.c``) or the ATen path (``ATTNMASK_KERNEL=0``, not built, no AVX-512)."""
    try:
        from attnmask.engines import fused
    except ImportError as exc:
        return f"fused kernel: unknown (attnmask.engines.fused: {exc})"
    st = fused.status()
    dtypes = [name for name in ("float32", "bfloat16") if st[name]]
    text = "fused kernel: " + (" + ".join(dtypes) if dtypes else "off")
    return text + (f" ({st['reason']})" if st["reason"] else "")


# -- the main sweep --------------------------------------------------------------------------------

def run_sweep(args, console) -> list[dict]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    engines = MODES[args.mode]
    rows: list[dict] = []
    # dtypes side by side: for each length, every mask in every dtype before the next length
    jobs = [(n, m, dt) for n in args.lengths for dt in _dtypes(args.dtype) for m in args.masks]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("benchmark", total=len(jobs) * len(engines))
        tensors = {}
        anchor_ms: dict[int, float] = {}
        for n, mname, dtype_name in jobs:
            dtype = getattr(torch, dtype_name)
            if (n, dtype) not in tensors:
                tensors.clear()
                g = torch.Generator().manual_seed(0)
                tensors[(n, dtype)] = tuple(torch.randn(1, args.heads, n, args.dim, generator=g).to(dtype)
                                            for _ in range(3))
            q, k, v = tensors[(n, dtype)]
            case = Case(mname, MASKS[mname](n), n, args.heads, args.dim, dtype, q, k, v, args)
            row = {"mask": mname, "text": case.mask_text, "n": n, "dtype": dtype_name, "ms": {}, "skip": {}}
            calls: dict[str, Callable] = {}
            for label, prep in engines.items():
                progress.update(task, description=f"N={n:>6} {mname:<10} {label:<15}")
                if label == ANCHOR and (n, dtype) in anchor_ms and not args.anchor_every_mask:
                    row["ms"][label] = anchor_ms[(n, dtype)]       # mask-independent: once per length
                    continue
                try:
                    fn = prep(case)
                    time_call(fn, 0)                     # warm-up
                    calls[label] = fn
                except Skip as e:
                    row["skip"][label] = str(e)
                except (RuntimeError, MemoryError) as e:   # a competitor failing must not stop the sweep
                    row["skip"][label] = f"failed: {str(e).splitlines()[0][:80]}"
            # Engines take turns, one call each per round, so that a noisy spell on this shared
            # machine hits every engine alike instead of whichever ran during it.
            best = {label: math.inf for label in calls}
            for _ in range(args.repeats):
                for label, fn in calls.items():
                    try:
                        best[label] = min(best[label], time_call(fn, 1, warmup=0))
                    except (RuntimeError, MemoryError) as e:
                        row["skip"][label] = f"failed: {str(e).splitlines()[0][:80]}"
            for label, ms in best.items():
                if label in row["skip"]:
                    continue
                row["ms"][label] = ms
                if label == ANCHOR:
                    anchor_ms[(n, dtype)] = ms
            progress.advance(task, len(engines))
            row.update({k2: case.notes[k2] for k2 in case.notes})
            if not console.is_terminal:   # no live bar in a log file: one line per case instead
                console.print(f"N={n} {mname} {dtype_name}: " + ", ".join(f"{lab} {ms:.1f} ms" for lab, ms in row["ms"].items()))
            if ANCHOR in row["ms"] and "attended" in row:
                row["ideal_ms"] = row["ms"][ANCHOR] * row["attended"] / (n * (n + 1) / 2)
            rows.append(row)
    return rows


def _dtypes(text: str) -> list[str]:
    """``--dtype`` as a list: ``"float32,bfloat16"`` times both dtypes side by side."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    from attnmask.errors import MaskValueError
    for d in names:
        if d not in ("float32", "bfloat16", "float16"):
            raise MaskValueError(f"--dtype takes float32, bfloat16 or float16 (comma-separated), got {d!r}")
    return names


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 1e4 else f"{x:,.0f}"


def table_rows(rows: list[dict], mode: str) -> tuple[list[str], list[list[str]]]:
    labels = list(MODES[mode])
    ours = labels[0]
    head = ["mask", "N", "dtype", "density"] + [f"{lab} ms" for lab in labels] + ["ideal ms", "/ ideal"]
    versus = [lab for lab in labels[1:] if lab != ANCHOR]
    head += [f"vs {lab}" for lab in versus] + ["flex compile s"]
    out = []
    for r in rows:
        ms = r["ms"]
        density = r.get("attended", 0) / (r["n"] * r["n"])
        line = [r["mask"], str(r["n"]), r.get("dtype", "float32"), f"{density:.3f}"]
        line += [_fmt_ms(ms.get(lab)) if lab in ms else "skip" for lab in labels]
        ideal = r.get("ideal_ms")
        line += [_fmt_ms(ideal), f"{ms[ours] / ideal:.2f}x" if ideal and ours in ms else "-"]
        for lab in versus:
            line.append(f"{ms[lab] / ms[ours]:.1f}x" if lab in ms and ours in ms else "-")
        line.append(f"{r['flex_compile_s']:.1f}" if "flex_compile_s" in r else "-")
        out.append(line)
    return head, out


def save_plot(rows: list[dict], mode: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    masks = list(dict.fromkeys((r["mask"], r.get("dtype", "float32")) for r in rows))
    labels = list(MODES[mode])
    cols = min(4, len(masks))
    nrows = math.ceil(len(masks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, masks):
        sel = [r for r in rows if (r["mask"], r.get("dtype", "float32")) == m]
        for lab in labels:
            pts = [(r["n"], r["ms"][lab]) for r in sel if lab in r["ms"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lab)
        pts = [(r["n"], r["ideal_ms"]) for r in sel if "ideal_ms" in r]
        if pts:
            ax.plot(*zip(*pts), linestyle="--", color="gray", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{m[0]} ({m[1]})" if len({d for _, d in masks}) > 1 else m[0])
        ax.set_xlabel("length N")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(masks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"attention {mode}: time against length (log-log)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- extras in fresh subprocesses --------------------------------------------------------------------

_CHILD_FIRST_CALL = """
import time, torch
t0 = time.perf_counter()
import attnmask as am
n, h, d = {n}, {h}, {d}
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
t_import = time.perf_counter() - t0
mask = am.parse({text!r})
with torch.no_grad():
    t0 = time.perf_counter(); am.attention(q, k, v, mask); first = time.perf_counter() - t0
    t0 = time.perf_counter(); am.attention(q, k, v, mask); second = time.perf_counter() - t0
print(first * 1e3, second * 1e3, t_import * 1e3)
"""

_CHILD_MEMORY = """
import torch, attnmask as am
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
n, h, d = {n}, {h}, {d}
q = torch.empty(1, h, n, d).normal_(); k = torch.empty(1, h, n, d).normal_(); v = torch.empty(1, h, n, d).normal_()
mask = am.parse({text!r})
base = status('VmRSS:')
with torch.no_grad():
    out = am.attention(q, k, v, mask)
peak = status('VmHWM:')
print(peak - base, out.numel() * out.element_size())
"""

_CHILD_DECODE = """
import time, torch, attnmask as am
h, hkv, d = {h}, {hkv}, {d}
mask = am.parse({text!r})
res = []
for n in {lengths}:
    k = torch.empty(1, hkv, n, d).normal_(); v = torch.empty(1, hkv, n, d).normal_()
    q = torch.randn(1, h, 1, d)
    with torch.no_grad():
        t0 = time.perf_counter(); am.attention(q, k, v, mask, enable_gqa=True); first = time.perf_counter() - t0
        best = 1e9
        for _ in range(20):
            t0 = time.perf_counter(); am.attention(q, k, v, mask, enable_gqa=True); best = min(best, time.perf_counter() - t0)
    res.append((n, first * 1e3, best * 1e3))
    del k, v
print(res)
"""


def _child(code: str, timeout: float) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    return proc.stdout.strip().splitlines()[-1]


def run_extras(args, console) -> dict:
    out: dict = {}
    h, d = args.heads, args.dim
    n = args.first_call_length
    text = "causal & sliding(1024)"
    console.print(f"[bold]extras[/]: first call vs second call (fresh process, N={n}, {text})")
    try:
        first, second, imp = map(float, _child(_CHILD_FIRST_CALL.format(n=n, h=h, d=d, text=text), 600).split())
        out["first_call"] = {"n": n, "mask": text, "first_ms": first, "second_ms": second, "import_ms": imp}
    except Exception as e:  # noqa: BLE001 - report, do not abort the benchmark
        out["first_call"] = {"error": str(e)}
    n = args.memory_length
    text = "causal & sliding(1024)"
    console.print(f"[bold]extras[/]: peak memory of a forward (fresh process, N={n}, {text})")
    try:
        added, out_bytes = map(int, _child(_CHILD_MEMORY.format(n=n, h=h, d=d, text=text), 900).split())
        out["memory"] = {"n": n, "mask": text, "added_mb": added / 2**20, "output_mb": out_bytes / 2**20}
    except Exception as e:  # noqa: BLE001
        out["memory"] = {"error": str(e)}
    text = "causal & (sliding(4096) | sink(4))"
    lengths = [65536, 1048576]
    console.print(f"[bold]extras[/]: decoding step q_len=1 ({text}, keys {lengths}, {h} query heads, "
                  f"{args.decode_kv_heads} kv heads)")
    try:
        res = eval(_child(_CHILD_DECODE.format(h=h, hkv=args.decode_kv_heads, d=d, text=text, lengths=lengths), 900))
        out["decode"] = {"mask": text, "kv_heads": args.decode_kv_heads,
                         "steps": [{"keys": a, "first_ms": b, "warm_ms": c} for a, b, c in res]}
    except Exception as e:  # noqa: BLE001
        out["decode"] = {"error": str(e)}
    return out


def extras_lines(ex: dict) -> list[str]:
    lines = []
    fc = ex.get("first_call", {})
    if "first_ms" in fc:
        lines.append(f"- First call in a fresh process (N={fc['n']}, `{fc['mask']}`): {fc['first_ms']:.1f} ms; "
                     f"second call {fc['second_ms']:.1f} ms; difference {fc['first_ms'] - fc['second_ms']:.1f} ms "
                     f"(import + tensors before it: {fc['import_ms']:.0f} ms).")
    elif fc:
        lines.append(f"- First call: failed ({fc.get('error')})")
    mem = ex.get("memory", {})
    if "added_mb" in mem:
        lines.append(f"- Peak memory added by a forward (N={mem['n']}, `{mem['mask']}`, VmHWM - VmRSS before): "
                     f"{mem['added_mb']:.0f} MB, of which the output tensor is {mem['output_mb']:.0f} MB.")
    elif mem:
        lines.append(f"- Memory: failed ({mem.get('error')})")
    dec = ex.get("decode", {})
    if "steps" in dec:
        steps = "; ".join(f"{s['keys']:,} keys: {s['warm_ms']:.2f} ms warm (first {s['first_ms']:.1f} ms)"
                          for s in dec["steps"])
        lines.append(f"- Decoding step, q_len=1, `{dec['mask']}`, {dec['kv_heads']} kv head(s): {steps}.")
    elif dec:
        lines.append(f"- Decode: failed ({dec.get('error')})")
    return lines


# -- results file ------------------------------------------------------------------------------------

def write_markdown(path: str, args, rows, extras, command: str, started: str, elapsed: float) -> None:
    head, body = table_rows(rows, args.mode)
    lines = [f"# Attention benchmark ({args.mode})", "",
             f"- Date: {started} UTC (took {elapsed:.0f} s)",
             f"- Machine: {machine_description()}",
             f"- Command: `{command}`",
             f"- Shapes: B=1, H={args.heads}, D={args.dim}, {args.dtype}; times are the best of "
             f"{args.repeats} calls after one warm-up, the engines taking turns call by call; "
             f"block size {args.block_size}.",
             "- ideal = SDPA is_causal time x attended pairs / (N(N+1)/2); `/ ideal` is attnmask's distance "
             "from it; `vs X` = X time / attnmask time (above 1: attnmask faster).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    skips = [(r["mask"], r["n"], lab, why) for r in rows for lab, why in r["skip"].items()]
    if skips:
        lines += ["", "Skipped: " + "; ".join(f"{lab} at {m} N={n} ({why})" for m, n, lab, why in skips)]
    lines += ["", "Masks: " + "; ".join(f"{m} = `{MASKS[m](8192)}`" + (" (at N=8192)" if m in ("documents", "random_documents", "signature") else "")
                                        for m in dict.fromkeys(r["mask"] for r in rows))]
    if extras:
        lines += ["", "## Extras", ""] + extras_lines(extras)
    if args.mode == "forward":
        lines += ["", "Where the time goes: `benchmarks/results/attention_profile.md` (`python benchmarks/profile_forward.py`) "
                  "and the kernel's cost per score by call shape, `benchmarks/results/kernel_slices.md` "
                  "(`python benchmarks/bench_kernel_slices.py`)."]
    save_results(path, "\n".join(lines) + "\n")


# -- CLI entry points --------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        out.append(int(part) * mult)
    return out


def add_arguments(parser: argparse.ArgumentParser, *, results: str = "", plot: str = "") -> None:
    """Add the benchmark's options to ``parser`` (used by ``attnmask bench`` and the scripts).

    Files are written only where asked: ``results`` and ``plot`` are the defaults of
    ``--results`` and ``--plot`` ('' = none; benchmarks/bench_attention.py passes the
    repository's results file and picture).
    """
    parser.add_argument("--mode", default="forward", help="what to time: " + ", ".join(MODES) + " (default forward)")
    parser.add_argument("--masks", default=",".join(MASKS), help="comma-separated mask names: " + ", ".join(MASKS))
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="comma-separated lengths (4k style ok)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32",
                        help="float32, bfloat16 or float16; comma-separated for rows of each side by side")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine (best is kept)")
    parser.add_argument("--max-dense-gb", type=float, default=3.0, help="skip SDPA+mask above this mask memory")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="skip a competitor estimated slower")
    parser.add_argument("--anchor-once", dest="anchor_every_mask", action="store_false",
                        help="time SDPA is_causal once per length instead of beside every mask (faster; "
                             "only fair on a quiet machine)")
    parser.add_argument("--aten-column", action="store_true",
                        help=f"forward mode: also time attnmask with ATTNMASK_KERNEL=0 ('{ATEN_LABEL}', the "
                             "ATen path without the fused kernel), side by side")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take minutes)")
    parser.add_argument("--flex-max-length", type=int, default=16384)
    parser.add_argument("--no-extras", action="store_true", help="skip first-call, memory and decode checks")
    parser.add_argument("--first-call-length", type=int, default=16384)
    parser.add_argument("--memory-length", type=int, default=131072)
    parser.add_argument("--decode-kv-heads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--results", default=results,
                        help=f"markdown results file (default: {results or 'none'}; '' = none)")
    parser.add_argument("--plot", default=plot, help=f"plot file (default: {plot or 'none'}; '' = none)")
    parser.add_argument("--json", default="", help="also dump raw results as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    from rich.console import Console
    from rich.table import Table
    from attnmask.errors import MaskValueError
    console = Console()
    if console.width < 160:
        console = Console(width=160)     # the table is wide; piped output defaults to 80 columns
    if args.mode not in MODES:
        raise MaskValueError(f"unknown benchmark mode {args.mode!r}; choose one of {', '.join(MODES)}")
    if getattr(args, "aten_column", False):
        if args.mode != "forward":
            raise MaskValueError("--aten-column is for --mode forward")
        engines = dict(MODES["forward"])
        first = next(iter(engines))
        MODES["forward"] = {first: engines.pop(first), ATEN_LABEL: prep_attnmask_aten, **engines}
    args.masks = [m.strip() for m in args.masks.split(",")] if isinstance(args.masks, str) else args.masks
    for m in args.masks:
        if m not in MASKS:
            raise MaskValueError(f"unknown benchmark mask {m!r}; choose from {', '.join(MASKS)}")
    try:
        args.lengths = _int_list(args.lengths) if isinstance(args.lengths, str) else args.lengths
    except ValueError:
        raise MaskValueError(f"--lengths must be comma-separated whole numbers, got {args.lengths!r}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in ([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    console.print(f"[bold]attnmask bench[/] mode={args.mode}  {machine_description()}")
    rows = run_sweep(args, console)
    head, body = table_rows(rows, args.mode)
    table = Table(title=f"attention {args.mode}, H={args.heads}, D={args.dim}, {args.dtype} (ms, best of {args.repeats})")
    for h in head:
        table.add_column(h, justify="right" if h not in ("mask",) else "left")
    for line in body:
        table.add_row(*line)
    console.print(table)
    extras = {} if args.no_extras else run_extras(args, console)
    for line in extras_lines(extras):
        console.print(line)
    if args.plot:
        save_plot(rows, args.mode, args.plot)
        console.print(f"plot: {args.plot}")
    if args.results:
        write_markdown(args.results, args, rows, extras, command, started, time.perf_counter() - t0)
        console.print(f"results: {args.results}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "extras": extras}, f, indent=1, default=str)
    return 0


def main(argv: list[str] | None = None, *, results: str = "", plot: str = "") -> int:
    """``python benchmarks/harness.py [options]`` (``results`` / ``plot``: default output files)."""
    parser = argparse.ArgumentParser(prog="attnmask bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser, results=results, plot=plot)
    args = parser.parse_args(argv)
    from attnmask.errors import MaskError
    try:
        return run_from_args(args)
    except MaskError as e:
        print(f"attnmask bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
