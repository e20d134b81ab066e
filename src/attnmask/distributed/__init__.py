"""Context parallelism: masked attention over a torch.distributed process group, balanced by the mask.

    from attnmask import distributed as cp
    plan = cp.plan(mask, length, world_size, block_size=128)   # from the layout alone; same on every rank
    q_local, k_local, v_local = (cp.shard(t, plan, rank) for t in (q, k, v))
    out_local = cp.attention(q_local, k_local, v_local, plan)  # autograd: dK/dV return to their owners
    out = cp.gather(out_local, plan)                           # the full tensor on every rank

The planner (:mod:`.planner`) needs no process group; the runtime
(:mod:`.runtime`) runs on gloo (CPU) or NCCL (GPU) through torch.distributed.

    >>> import attnmask as am
    >>> from attnmask import distributed as cp
    >>> cp.plan(am.causal, 4096, 4).world_size
    4
"""

from .planner import BASELINES, CALL_RULES, SCHEDULES, STRATEGIES, CostModel, Plan, PlanError, Simulation, compare, plan
from .report import draw, format_report, summary_rows
from .runtime import CommunicationError, PlanMismatchError, attention, gather, shard, unshard

__all__ = ["plan", "compare", "Plan", "CostModel", "Simulation", "PlanError", "PlanMismatchError",
           "CommunicationError", "shard", "unshard", "gather", "attention", "format_report", "draw", "summary_rows", "STRATEGIES", "SCHEDULES", "BASELINES", "CALL_RULES"]
