"""GPU check of the FlexAttention path fed by attnmask layouts (needs a CUDA machine).

What it checks, each section on its own so that one failure does not hide the rest:

1. exactness: ``am.attention(..., backend="flex")`` (and ``"auto"``, which picks flex on
   CUDA) against float64 dense attention, forward and gradients, fp32 and bf16;
2. block-mask build time: ``mask.compile(N).to_flex_block_mask(device="cuda")`` against
   torch's ``create_block_mask(..., _compile=True)`` (warm), up to 1M tokens;
3. speed: flex with attnmask's BlockMask against flex with ``create_block_mask``'s, SDPA
   ``is_causal`` (the ideal's anchor) and SDPA with a dense mask, forward and forward+backward;
4. per-head and per-batch masks through the flex backend, forward and gradients.

Results go to a markdown file written as it goes (a timeout still leaves what ran).

    $ PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu.md
    $ PYTHONPATH=src python benchmarks/gpu_check.py --quick --device cpu --out /tmp/gpu.md   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import time
import traceback
import warnings

import torch

import attnmask as am

MASKS = {
    "sliding": lambda n: am.causal & am.sliding(1024),
    "sinks": lambda n: am.causal & (am.sliding(1024) | am.sink(4)),
    "documents": lambda n: am.causal & am.document(*_docs(n)),
    "signature": lambda n: am.causal - (am.rows(1000, n, 4096) - am.diagonal),
    "dilated": lambda n: am.dilated(512, 4),
}


def _docs(n: int) -> list[int]:
    fr = (0.05, 0.2, 0.1, 0.15, 0.1, 0.25, 0.05)
    lens = [max(1, int(n * f)) for f in fr]
    return lens + [n - sum(lens)]


def _md(mask) -> str:
    return str(mask).replace("|", "\\|")     # a table cell


class Report:
    def __init__(self, path: str):
        self.path = path
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in ms (CUDA-synchronized) over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def section_exactness(rep: Report, device, quick: bool) -> None:
    rep.add("", "## 1. Exactness against float64 dense attention", "",
            "| mask | N | dtype | backend | out rel err | dq rel err | dk rel err | dv rel err |",
            "|---|---|---|---|---|---|---|---|")
    n = 300 if quick else 1000                  # not a multiple of the 128-token block
    g = torch.Generator(device="cpu").manual_seed(0)
    names = ["sinks", "documents"] if quick else ["sinks", "documents", "signature", "dilated"]
    for name in names:
        mask = MASKS[name](n)
        # Every mask is a new mask_mod and so a recompile; past torch's recompile limit (8) dynamo
        # would quietly run flex eagerly, which materializes all scores. Start each case clean.
        torch._dynamo.reset()
        for dtype in ((torch.float32,) if quick or name != "sinks" else (torch.float32, torch.bfloat16)):
            try:
                q, k, v = (torch.randn(2, 4, n, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
                backend = "auto" if name == "documents" else "flex"
                leaves = [t.detach().requires_grad_(device.type == "cuda") for t in (q, k, v)]
                out = am.attention(*leaves, mask, backend=backend)
                ref_leaves = [t.detach().double().requires_grad_(device.type == "cuda") for t in (q, k, v)]
                ref = am.attention(*ref_leaves, mask, backend="dense")
                cells = [f"{rel_err(out, ref):.1e}"]
                if device.type == "cuda":
                    dout = torch.randn(out.shape, generator=g).to(device)
                    out.backward(dout.to(dtype))
                    ref.backward(dout.double())
                    cells += [f"{rel_err(a.grad, b.grad):.1e}" for a, b in zip(leaves, ref_leaves)]
                else:
                    cells += ["-", "-", "-"]          # torch has no CPU backward for flex
                rep.add(f"| `{_md(mask)}` | {n} | {str(dtype)[6:]} | {backend} | " + " | ".join(cells) + " |")
            except Exception as e:   # report and go on: the other sections still run
                rep.add(f"| `{_md(mask)}` | {n} | {str(dtype)[6:]} | flex | failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]} | | | |")


def section_block_mask(rep: Report, device, quick: bool) -> None:
    from torch.nn.attention.flex_attention import create_block_mask
    rep.add("", "## 2. Building the BlockMask", "",
            "attnmask: `mask.compile(N)` (CPU, structural) + `layout.to_flex_block_mask(device)`; torch: "
            "`create_block_mask(mask.mask_mod, 1, 1, N, N, device, _compile=True)`, warm (its first call, "
            "which compiles, reported apart). Median of 5 (attnmask: fresh compile each time, cache cleared).", "",
            "| mask | N | attnmask ms | create_block_mask ms (warm) | create_block_mask first call s | ratio |",
            "|---|---|---|---|---|---|")
    lengths = [4096] if quick else [65536, 262144, 1048576]
    for name in ("sinks", "documents"):
        for n in lengths:
            mask = MASKS[name](n)
            try:
                def ours():
                    am.clear_cache()
                    return mask.compile(n).to_flex_block_mask(device=device)
                t_ours = timed(ours, device, repeats=5, warmup=1)
                mm = mask.mask_mod
                t0 = time.perf_counter()
                create_block_mask(mm, 1, 1, n, n, device=device, _compile=True)
                sync(device)
                first = time.perf_counter() - t0
                t_cbm = timed(lambda: create_block_mask(mm, 1, 1, n, n, device=device, _compile=True), device,
                              repeats=5, warmup=1)
                rep.add(f"| {name} | {n:,} | {t_ours:.1f} | {t_cbm:.1f} | {first:.1f} | {t_cbm / t_ours:.1f}x |")
            except Exception as e:
                rep.add(f"| {name} | {n:,} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |")


def section_speed(rep: Report, device, quick: bool) -> None:
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D = (16, 64) if not quick else (2, 64)
    rep.add("", f"## 3. Speed (B=1, H={H}, D={D}, {str(dtype)[6:]}; median of 10 after warm-up)", "",
            "ideal = SDPA is_causal x attended pairs / (N(N+1)/2); flex+attnmask = flex_attention with "
            "`layout.to_flex_block_mask()`; flex+cbm = the same kernel with `create_block_mask`'s BlockMask.", "",
            "| mask | N | pass | flex+attnmask ms | flex+cbm ms | sdpa is_causal ms | sdpa+mask ms | ideal ms | / ideal |",
            "|---|---|---|---|---|---|---|---|---|")
    lengths = [2048] if quick else [16384, 65536]
    names = ["sliding"] if quick else ["sliding", "sinks", "documents"]
    g = torch.Generator(device="cpu").manual_seed(1)
    for n in lengths:
        q, k, v = (torch.randn(1, H, n, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        dout = torch.randn(1, H, n, D, generator=g).to(device=device, dtype=dtype)
        for name in names:
            mask = MASKS[name](n)
            torch._dynamo.reset()          # see section 1: no silent eager fallback past the recompile limit
            try:
                layout = mask.compile(n)
                bm_ours = layout.to_flex_block_mask(device=device)
                bm_cbm = create_block_mask(mask.mask_mod, 1, 1, n, n, device=device, _compile=True)
                passes = ["forward"] + (["fwd+bwd"] if device.type == "cuda" and name == "sliding" else [])
                for p in passes:
                    def run(fn):
                        if p == "forward":
                            return lambda: fn(q, k, v)
                        def step():
                            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                            fn(qq, kk, vv).backward(dout)
                        return step
                    with torch.no_grad() if p == "forward" else torch.enable_grad():
                        t_ours = timed(run(lambda a, b, c: flex(a, b, c, block_mask=bm_ours)), device)
                        t_cbm = timed(run(lambda a, b, c: flex(a, b, c, block_mask=bm_cbm)), device)
                        t_causal = timed(run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)),
                                         device)
                        t_mask = "-"
                        if n <= 16384:
                            dense = mask.to_dense(n).to(device)
                            t_mask = f"{timed(run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense)), device):.2f}"
                            del dense
                    ideal = t_causal * layout.attended_pairs() / (n * (n + 1) / 2)
                    rep.add(f"| {name} | {n:,} | {p} | {t_ours:.2f} | {t_cbm:.2f} | {t_causal:.2f} | {t_mask} | "
                            f"{ideal:.2f} | {t_ours / ideal:.2f}x |")
            except Exception as e:
                rep.add(f"| {name} | {n:,} | - | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} "
                        "| | | | | |")
                traceback.print_exc()


def section_per_head(rep: Report, device, quick: bool) -> None:
    rep.add("", "## 4. Per-head and per-batch masks on FlexAttention", "",
            "One BlockMask with per-(batch, head) tables; the mask_mod keeps the mask of the head asking. "
            "Against float64 dense attention, fp32, forward and gradients.", "",
            "| masks | B x H x N | out rel err | dq rel err | dk rel err | dv rel err |",
            "|---|---|---|---|---|---|")
    n = 300 if quick else 1000
    g = torch.Generator(device="cpu").manual_seed(2)
    cases = {
        "per head: window, documents, dilated, window+sinks": [am.causal & am.sliding(100), am.causal & am.document(*_docs(n)),
                                                               am.dilated(64, 3), am.causal & (am.sliding(64) | am.sink(4))],
        "per batch: documents, signature cuts": am.per_batch([am.causal & am.document(*_docs(n)[::-1]),
                                                             am.causal - (am.rows(100, n, 250) - am.diagonal)]),
    }
    for label, masks in cases.items():
        torch._dynamo.reset()
        try:
            q, k, v = (torch.randn(2, 4, n, 64, generator=g).to(device) for _ in range(3))
            grad = device.type == "cuda"
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            out = am.attention(*leaves, masks, backend="flex")
            ref_leaves = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
            ref = am.attention(*ref_leaves, masks, backend="dense")
            cells = [f"{rel_err(out, ref):.1e}"]
            if grad:
                dout = torch.randn(out.shape, generator=g).to(device)
                out.backward(dout)
                ref.backward(dout.double())
                cells += [f"{rel_err(a.grad, b.grad):.1e}" for a, b in zip(leaves, ref_leaves)]
            else:
                cells += ["-", "-", "-"]
            rep.add(f"| {label} | 2 x 4 x {n} | " + " | ".join(cells) + " |")
        except Exception as e:
            rep.add(f"| {label} | 2 x 4 x {n} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |")
            traceback.print_exc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of this script)")
    ap.add_argument("--sections", default="1,2,3,4")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*_compile flag on create_block_mask.*")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rep = Report(args.out)
    rep.add("# GPU check: the FlexAttention path fed by attnmask layouts", "",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Device: {name}; torch {torch.__version__}",
            f"- Command: `PYTHONPATH=src python benchmarks/gpu_check.py{' --quick' if args.quick else ''} "
            f"--device {args.device} --out {args.out}`")
    t0 = time.perf_counter()
    for s in args.sections.split(","):
        {"1": section_exactness, "2": section_block_mask, "3": section_speed,
         "4": section_per_head}[s.strip()](rep, device, args.quick)
        rep.add("", f"(elapsed {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
