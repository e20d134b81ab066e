"""Train a tiny byte-level language model whose attention goes through attnmask, on CPU.

The text is Python's own standard library source (it ships with every Python),
the attention mask is StreamingLLM-style ``causal & (sliding(W) | sink(S))``,
and every attention call is ``am.attention(q, k, v, layout)`` on the
block-sparse engine, forward and backward. After training, the per-head
attention weights of a held-out window are drawn next to the mask itself
(the mask panel is drawn by ``am.render``; learned weights are not a mask, so
those panels are plain matplotlib ``imshow`` in the same orientation).

    python examples/train_tiny_lm.py                     # ~300 steps, a minute or two on 2 cores
    python examples/train_tiny_lm.py --steps 5 --length 64 --out /tmp/maps.png   # smoke run

Each logged step prints ``loss <step> <value>``; the loss falls from ~5.5
(uniform over 256 bytes) as the model learns.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnmask as am

# Standard-library modules whose source makes the corpus (any that exist are used).
CORPUS_FILES = ("functools.py", "argparse.py", "inspect.py", "typing.py", "dataclasses.py",
                "collections/__init__.py", "pathlib.py", "textwrap.py", "string.py", "heapq.py")


def load_corpus(max_bytes: int) -> torch.Tensor:
    """uint8 bytes of standard-library source files, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for name in CORPUS_FILES:
        path = root / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no standard-library sources found under {root}")
    blob = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


class Block(nn.Module):
    """Pre-norm transformer block; attention through attnmask with a fixed compiled layout."""

    def __init__(self, dim: int, heads: int, layout: am.BlockLayout):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.keep_qk = False
        self.last_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.keep_qk:
            self.last_qk = (q.detach(), k.detach())
        a = am.attention(q, k, v, self.layout, backend="blocksparse")     # [B, H, L, Dh]
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, dim))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, length: int, dim: int, heads: int, layers: int, layout: am.BlockLayout):
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, layout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
        idx = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        yield idx[:, :-1], idx[:, 1:]


def attention_maps(model: TinyLM, mask: am.Mask, window: torch.Tensor, path: str) -> None:
    """Save per-layer, per-head attention weights on one window, beside the mask (am.render)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for blk in model.blocks:
        blk.keep_qk = True
    with torch.no_grad():
        model(window[None])
    L = window.shape[0]
    allowed = mask.to_dense(L)
    layers, heads = len(model.blocks), model.blocks[0].heads
    fig, axes = plt.subplots(layers, heads + 1, figsize=(2.6 * (heads + 1), 2.6 * layers), squeeze=False)
    for li, blk in enumerate(model.blocks):
        q, k = blk.last_qk
        blk.keep_qk, blk.last_qk = False, None
        # Dense weights are fine here: one short window, for a picture.
        s = (q[0] @ k[0].transpose(-1, -2)) / math.sqrt(q.shape[-1])
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        am.render(mask, L, ax=axes[li, 0], annotate=False)
        axes[li, 0].set_title(f"layer {li}: mask", fontsize=9)
        for h in range(heads):
            ax = axes[li, h + 1]
            # Square root brightens small weights so the window/sink structure stays visible.
            ax.imshow(w[h].sqrt().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                      extent=(0, L, L, 0))
            ax.set_title(f"layer {li} head {h}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"learned attention (sqrt of weight) under {mask}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--length", type=int, default=256, help="context length in bytes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="sliding window W")
    p.add_argument("--sink", type=int, default=4, help="sink tokens S")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--corpus-bytes", type=int, default=1_000_000)
    p.add_argument("--out", default="tiny_lm_attention.png", help="where to save the attention maps")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    mask = am.causal & (am.sliding(args.window) | am.sink(args.sink))
    layout = mask.compile(args.length, block_size=args.block_size)
    model = TinyLM(args.length, args.dim, args.heads, args.layers, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s / max(args.steps, 1), 1.0))))
    print(f"corpus: {len(data):,} bytes of stdlib source; mask {mask} at length {args.length} "
          f"(density {layout.density:.1%}); {sum(p.numel() for p in model.parameters()):,} parameters")

    def step_fn(xb, yb) -> float:
        logits = model(xb)
        loss = F.cross_entropy(logits.reshape(-1, 256), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    it = batches(train, args.batch, args.length, gen)
    loss = float("nan")
    if args.no_progress:
        for step in range(args.steps):
            loss = step_fn(*next(it))
            if step % args.log_every == 0 or step == args.steps - 1:
                print(f"loss {step} {loss:.4f}", flush=True)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task("train", total=args.steps, loss=float("nan"))
            for step in range(args.steps):
                loss = step_fn(*next(it))
                bar.update(task, advance=1, loss=loss)
                if step % args.log_every == 0 or step == args.steps - 1:
                    bar.console.print(f"loss {step} {loss:.4f}")
    elapsed = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        vb = batches(val, 8, args.length, torch.Generator().manual_seed(1))
        xb, yb = next(vb)
        val_loss = float(F.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1)))
    tokens = args.steps * args.batch * args.length
    print(f"trained {args.steps} steps in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s); "
          f"final train loss {loss:.3f}, held-out loss {val_loss:.3f} nats/byte")
    attention_maps(model, mask, val[: args.length], args.out)
    print(f"attention maps saved to {args.out}")
    return val_loss


if __name__ == "__main__":
    main()
