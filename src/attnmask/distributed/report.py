"""Reports on context-parallel plans: the text ``attnmask cp-plan`` prints and the picture it draws.

Both take the dict of :func:`~attnmask.distributed.compare` (the chosen plan
beside every strategy), so the comparison is always one run on one cost model.
matplotlib is imported only by :func:`draw`.

    >>> import attnmask as am
    >>> from attnmask import distributed as cp
    >>> text = cp.format_report(cp.compare(am.causal, 4096, 4))
    >>> "busiest/mean" in text and "rank" in text
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["format_report", "draw", "summary_rows"]

ORDER = ("plan", "contiguous", "zigzag", "ptrr", "greedy", "balanced")


def summary_rows(plans: dict, kv_bytes_per_token: int = 4096) -> list[dict]:
    """One dict per plan in :data:`ORDER`: strategy, schedule and its figures (also for JSON and results)."""
    rows = []
    for name in ORDER:
        if name not in plans:
            continue
        p = plans[name]
        sim = p.simulation
        recv = p.received_tokens()
        ag = p.allgather_tokens()
        rows.append({
            "name": name, "strategy": p.strategy, "schedule": p.schedule,
            "busiest_over_mean": p.imbalance(), "step_over_ideal": sim.ratio,
            # the same assignment with kernel calls free, and with one call per step for every strategy
            "step_over_ideal_free": p.simulation_under("free").ratio,
            "step_over_ideal_per_step": p.simulation_under("per_step").ratio,
            "max_wait_over_ideal": sim.max_wait / sim.ideal if sim.ideal else 0.0,
            "recv_bytes_max": int(recv.max()) * kv_bytes_per_token,
            "recv_bytes_mean": float(recv.mean()) * kv_bytes_per_token,
            "allgather_bytes_max": int(ag.max()) * kv_bytes_per_token,
            "position_runs": sum(len(p.position_runs(r)) for r in range(p.world_size)),
        })
    return rows


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def format_report(plans: dict, kv_bytes_per_token: int = 4096, per_rank: bool = True) -> str:
    """The comparison table, then the chosen plan rank by rank (work, waits, bytes)."""
    p = plans["plan"]
    sim = p.simulation
    masks = "[" + ", ".join(map(str, p.masks)) + "]" if p.per_head else str(p.masks[0])
    if len(masks) > 100:
        masks = masks[:97] + "..."
    lines = [
        f"cp-plan {masks!r}: {p.length:,} positions on {p.world_size} ranks, block {p.block_size} "
        f"({p.n_chunks:,} chunks)",
        f"attended pairs {p.total_pairs:,} (ideal per rank {sim.ideal:,.0f}); cost model: a K/V token costs "
        f"{p.cost.token_cost:g} pair-times, a message {p.cost.message_cost:g}; {kv_bytes_per_token:,} K/V bytes "
        f"per token",
        "",
        f"{'plan':<12}{'strategy':<12}{'schedule':<11}{'busiest/mean':>13}{'step/ideal':>12}{'no calls':>10}"
        f"{'1/step':>9}{'max wait':>10}{'recv MiB max':>14}{'all-gather':>12}{'runs':>7}",
    ]
    for row in summary_rows(plans, kv_bytes_per_token):
        share = row["recv_bytes_max"] / row["allgather_bytes_max"] if row["allgather_bytes_max"] else 0.0
        lines.append(f"{row['name']:<12}{row['strategy']:<12}{row['schedule']:<11}{row['busiest_over_mean']:>13.4f}"
                     f"{row['step_over_ideal']:>12.4f}{row['step_over_ideal_free']:>10.4f}"
                     f"{row['step_over_ideal_per_step']:>9.4f}{row['max_wait_over_ideal']:>10.4f}"
                     f"{_mb(row['recv_bytes_max']):>14}{share:>11.1%}{row['position_runs']:>7}")
    lines.append("  (step/ideal: simulated time of the slowest rank, waits included, over total pairs / ranks, "
                 "with attnmask's runtime's kernel calls (one per query run x key run per step); no calls: the "
                 "same with calls free (balance, transfers, waits); 1/step: one call per step for every "
                 "strategy; max wait: the longest wait for data before one step, over the ideal; all-gather: "
                 "bytes received against all-gathering the whole K/V; runs: contiguous position runs)")
    if per_rank:
        pairs = p.rank_pairs()
        mean = pairs.mean() if pairs.mean() > 0 else 1.0
        recv, sent = p.received_tokens(), p.tokens.sum(0)
        lines += ["", f"chosen plan ({p.strategy}, {p.schedule}) per rank:",
                  f"{'rank':>5}{'chunks':>8}{'positions':>11}{'pairs':>18}{'/mean':>8}{'steps':>7}"
                  f"{'waits':>10}{'recv MiB':>10}{'send MiB':>10}"]
        for r in range(p.world_size):
            waits = sim.waits[r]
            lines.append(f"{r:>5}{len(p.chunks_of(r)):>8}{p.local_length(r):>11,}{int(pairs[r]):>18,}"
                         f"{pairs[r] / mean:>8.4f}{len(p.steps(r)):>7}{sum(waits) / sim.ideal if sim.ideal else 0:>10.4f}"
                         f"{_mb(recv[r] * kv_bytes_per_token):>10}{_mb(sent[r] * kv_bytes_per_token):>10}")
        lines.append("  (waits: total time rank sat waiting for data, over the ideal)")
    return "\n".join(lines)


def _coverage(plan, pixels: int) -> np.ndarray:
    """float [P, P]: share of attended tiles per picture cell, from the runs (all heads averaged)."""
    n = plan.n_chunks
    P = min(pixels, n)
    img = np.zeros((P, P + 1))
    for m in dict.fromkeys(plan.masks):
        lay = m.compile(plan.length, block_size=plan.block_size)
        qb = lay.run_q_blocks().numpy()
        k0, k1, st = lay.run_start.numpy(), lay.run_end.numpy(), lay.run_state.numpy()
        row = qb * P // n
        c0 = k0 * P // n
        c1 = np.maximum(c0 + 1, -(-k1 * P // n))
        # a run of b blocks spread over its cells; partial tiles count half
        w = np.where(st == 2, 1.0, 0.5) * (k1 - k0) / (c1 - c0) * plan.masks.count(m)
        np.add.at(img, (row, c0), w)
        np.add.at(img, (row, c1), -w)
    img = np.cumsum(img[:, :P], axis=1)
    per_cell = (n / P) ** 2 * len(plan.masks)
    img = img / per_cell
    img[img < 1e-9] = 0.0                     # cumsum leaves float residue past a run's end
    return np.clip(img, 0.0, 1.0)


def draw(plans: dict, path: str, *, pixels: int = 512, dpi: int = 110) -> None:
    """Draw the chosen plan's assignment over the block heatmap, beside each rank's work per strategy.

    Left: the mask's tiles (cells shaded by the share attended), each query row
    tinted by the colour of the rank that owns it, with an ownership strip.
    Right: each rank's pairs over the mean for the chosen plan and the baselines.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    p = plans["plan"]
    cover = _coverage(p, pixels)
    P = cover.shape[0]
    cmap = plt.get_cmap("tab20" if p.world_size > 10 else "tab10")
    colors = np.array([cmap(r % cmap.N)[:3] for r in range(p.world_size)])
    owner_px = p.owner[(np.arange(P) * p.n_chunks) // P]
    alpha = np.sqrt(cover)[..., None]                                 # sparse tiles stay visible
    rgb = 1.0 - alpha * (1.0 - colors[owner_px][:, None, :])
    rgb = np.where(cover[..., None] > 0, rgb * 0.85, rgb)             # attended cells a touch darker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.05, 1]})
    ext = (0, p.length, p.length, 0)
    ax.imshow(rgb, extent=ext, interpolation="nearest", aspect="auto")
    strip = owner_px[:, None]
    ax.imshow(strip, extent=(-p.length * 0.04, 0, p.length, 0), cmap=ListedColormap(colors),
              vmin=-0.5, vmax=p.world_size - 0.5, interpolation="nearest", aspect="auto")
    ax.set_xlim(-p.length * 0.04, p.length)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position (row colour = owning rank)")
    masks = ", ".join(map(str, p.masks)) if p.per_head else str(p.masks[0])
    if len(masks) > 60:
        masks = masks[:57] + "..."
    ax.set_title(f"{masks}\n{p.length:,} positions, {p.world_size} ranks: {p.strategy} / {p.schedule}", fontsize=10)

    ranks = np.arange(p.world_size)
    styles = {"contiguous": ("#999999", "s"), "zigzag": ("#d62728", "^"), "ptrr": ("#2ca02c", "v"),
              "greedy": ("#9467bd", "x"), "balanced": ("#ff7f0e", "+")}
    for name in ("contiguous", "zigzag", "ptrr"):
        if name in plans:
            q = plans[name]
            w = q.rank_pairs()
            bx.plot(ranks, w / w.mean(), marker=styles[name][1], color=styles[name][0], lw=0.8, ms=4,
                    label=f"{name}: busiest {q.imbalance():.3f}, step {q.simulation.ratio:.3f}x ideal "
                          f"({q.simulation_under('free').ratio:.3f}x, calls free)")
    w = p.rank_pairs()
    bx.bar(ranks, w / w.mean(), color=colors, alpha=0.85, width=0.8,
           label=f"plan ({p.strategy}): busiest {p.imbalance():.3f}, step {p.simulation.ratio:.3f}x ideal "
                 f"({p.simulation_under('free').ratio:.3f}x, calls free)")
    bx.axhline(1.0, color="black", lw=0.6)
    bx.set_xlabel("rank")
    from matplotlib.ticker import MaxNLocator
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))   # ranks are whole numbers
    bx.set_ylabel("attended pairs / mean")
    bx.set_title("work per rank (step = simulated time incl. waits)", fontsize=10)
    bx.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
