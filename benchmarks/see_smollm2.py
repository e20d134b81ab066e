"""The pictures of docs/: SmolLM2-135M's heads on a held-out standard-library file.

Captures every head on the first 1024 tokens of ``shlex.py`` (held out: the
plans were fitted on other files by fit_smollm2.py) and draws

- docs/heads_gallery.png: one head of each type, like the signature picture,
  with the outline of the 95% plan's mask and the share it keeps on this text;
- docs/heads_columns.png: a column-heavy layer with the data-dependent plan's
  masks resolved on this text (its columns picked from the last 64 queries);
- docs/model_overview.png: all 30 layers x 9 heads, pooled;
- docs/head_census.png: the census of head types;
- docs/plan_95.png: the 95% plan's density per head.

    PYTHONPATH=src python benchmarks/see_smollm2.py      # after fit_smollm2.py wrote the plans
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time

import attnmask as am
from attnmask import models
from attnmask.weights import head_census, render_census, render_overview, render_plan, render_weights

TEXT = "shlex.py"
RESULTS = "benchmarks/results"
COLUMN_LAYER = 4


def main() -> int:
    model, tok = models.load("smollm2")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], TEXT), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0][:1024]
    t0 = time.perf_counter()
    maps = {layer: m[0] for layer, m in models.capture(model, ids).items()}
    print(f"capture {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    plan = am.MaskPlan.from_json(os.path.join(RESULTS, "smollm2_plan_95.json"))
    dyn = am.MaskPlan.from_json(os.path.join(RESULTS, "smollm2_plan_95_dynamic.json"))

    census = head_census(maps)
    render_census(census, title=f"SmolLM2-135M head types on {TEXT} (1024 tokens, rows q >= 32)",
                  path="docs/head_census.png")
    render_overview(maps, title=f"SmolLM2-135M, every layer x head on {TEXT} (1024 tokens)\n"
                    "each tile: keys left to right, queries top to bottom, mean of 16 x 16 tokens",
                    path="docs/model_overview.png")
    render_plan(plan, title="SmolLM2-135M, per-head masks keeping 95% on 4 calibration texts",
                path="docs/plan_95.png")

    # one head of each type: the one whose type share is largest
    picks = []
    for kind in ("sink", "local", "previous", "self", "columns", "diffuse"):
        best = None
        for layer, types in census["types"].items():
            for h, t in enumerate(types):
                share = float(census["shares"][layer][h, census_index(kind)])
                if t == kind and (best is None or share > best[0]):
                    best = (share, layer, h)
        if best is not None:
            picks.append((kind, best[1], best[2]))
    import torch
    weights = torch.stack([maps[l][h] for _, l, h in picks])
    masks = [plan.layer(l)[h] for _, l, h in picks]
    render_weights(weights, mask=masks, scale="log", ncols=3,
                   titles=[f"layer {l} head {h} ({kind})" for kind, l, h in picks],
                   title=f"SmolLM2-135M heads on {TEXT} (held out), outlined: the 95% plan's mask",
                   path="docs/heads_gallery.png")
    for (kind, l, h), m in zip(picks, masks):
        print(f"gallery: layer {l} head {h} {kind}: {m}")

    layer = COLUMN_LAYER
    resolved = dyn.resolve(layer, maps[layer][:, -64:])
    render_weights(maps[layer], mask=list(resolved), scale="log", ncols=3,
                   titles=[f"layer {layer} head {h}" for h in range(maps[layer].shape[0])],
                   title=f"Layer {layer} on {TEXT}: columns chosen from the last 64 queries (95% plan with "
                         "top_columns)", path="docs/heads_columns.png")
    for h, m in enumerate(resolved):
        print(f"columns layer {layer} head {h}: {m}")
    print("census: " + ", ".join(f"{t} {n}" for t, n in census["counts"].items()))
    return 0


def census_index(kind: str) -> int:
    from attnmask.weights import HEAD_TYPES
    return HEAD_TYPES.index(kind)


if __name__ == "__main__":
    sys.exit(main())
