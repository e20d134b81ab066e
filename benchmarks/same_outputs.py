"""Bit-identity check of ``am.attention`` on the attention benchmark's masks, across code versions.

Run once with an old checkout on PYTHONPATH (``--save FILE``), once with the new one
(``--compare FILE``): forward outputs, lse and gradients must be ``torch.equal``.
Inputs are seeded, so both runs see the same tensors.

    $ PYTHONPATH=/tmp/before/src python benchmarks/same_outputs.py --save /tmp/before.pt
    $ PYTHONPATH=src python benchmarks/same_outputs.py --compare /tmp/before.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

import attnmask as am

try:
    from harness import MASKS
except ImportError:                      # checkouts where the harness was still inside the package
    from attnmask.bench import MASKS


def outputs(lengths: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for n in lengths:
        for name, text in ((name, fn(n)) for name, fn in MASKS.items()):
            g = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
            mask = am.parse(text)
            o, lse = am.attention(q, k, v, mask, return_lse=True)
            out[f"{name}@{n}/out"], out[f"{name}@{n}/lse"] = o, lse
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            am.attention(qg, kg, vg, mask).square().sum().backward()
            out[f"{name}@{n}/dq"], out[f"{name}@{n}/dk"], out[f"{name}@{n}/dv"] = qg.grad, kg.grad, vg.grad
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save")
    p.add_argument("--compare")
    p.add_argument("--lengths", default="4096,4000")
    args = p.parse_args()
    got = outputs([int(x) for x in args.lengths.split(",")])
    if args.save:
        torch.save(got, args.save)
        print(f"saved {len(got)} tensors to {args.save}")
    if args.compare:
        ref = torch.load(args.compare)
        assert set(ref) == set(got), sorted(set(ref) ^ set(got))
        diff = [key for key in ref if not torch.equal(ref[key], got[key])]
        print(f"{len(ref) - len(diff)} of {len(ref)} tensors bit-identical" + (f"; differ: {diff}" if diff else ""))
        for key in diff:
            # how far apart, scaled to the tensor: max |new - old| / max |old| (finite entries; -inf lse rows
            # must agree exactly)
            a, b = ref[key].double(), got[key].double()
            fin = torch.isfinite(a) & torch.isfinite(b)
            same_inf = bool(torch.equal(a[~fin], b[~fin]))
            scale = float(a[fin].abs().max()) if fin.any() else 1.0
            err = float((a[fin] - b[fin]).abs().max()) / max(scale, 1e-30) if fin.any() else 0.0
            changed = int((a != b).sum())
            print(f"  {key}: {changed} of {a.numel()} entries differ, max scaled difference {err:.2e}"
                  f"{'' if same_inf else ', infinite entries differ'}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
