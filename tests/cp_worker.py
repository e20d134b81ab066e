"""One rank of the context-parallel tests (tests/test_distributed.py starts 2 or 4 of these).

Usage: python tests/cp_worker.py RANK WORLD STORE_FILE CASES_JSON TIMEOUT_S
Prints one JSON line per case: {"case": name, "ok": bool, ...errors or the exception text}.
Each rank computes the single-process reference itself (am.attention on the full tensors, same seed).
"""

import time

START = time.perf_counter()

import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attnmask as am  # noqa: E402
from attnmask import distributed as cp  # noqa: E402


def scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((got - ref).abs().max()) / max(scale, 1.0) if ref.numel() else 0.0


def run_case(case: dict, rank: int, world: int, group=None) -> dict:
    L, B, H, Hkv, D = case["length"], case.get("batch", 1), case["heads"], case.get("kv_heads", case["heads"]), 16
    if case.get("per_head"):
        mask = [am.parse(t) for t in case["mask"]]
    else:
        mask = am.parse(case["mask"])
    if case.get("mismatch") and rank == 1:
        mask = am.parse(case["mismatch"])
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    dout = torch.randn(B, H, L, D, generator=g)
    gqa = Hkv != H
    plan = cp.plan(mask, L, world, block_size=case["block"], strategy=case.get("strategy", "auto"),
                   schedule=case.get("schedule", "auto"))
    qs, ks, vs = (cp.shard(t, plan, rank).requires_grad_() for t in (q, k, v))
    from attnmask.distributed import runtime
    piecewise = runtime._PIECEWISE_BACKWARD_DEVICES
    if case.get("autograd_backward"):       # the path CUDA takes: autograd through the pieces and the merge
        runtime._PIECEWISE_BACKWARD_DEVICES = ()
    try:
        t0 = time.process_time()
        out = cp.attention(qs, ks, vs, plan, group=group, enable_gqa=gqa)
        out.backward(cp.shard(dout, plan, rank))
        cpu = time.process_time() - t0
    finally:
        runtime._PIECEWISE_BACKWARD_DEVICES = piecewise
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = am.attention(qr, kr, vr, mask, enable_gqa=gqa)
    ref.backward(dout)
    full = cp.gather(out, plan, group=group)
    res = {}
    if case.get("gather_grad"):
        # every rank's loss reads the gathered tensor with its own weights; the reference sums them all
        weights = [torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
        qg, kg, vg = (cp.shard(t, plan, rank).requires_grad_() for t in (q, k, v))
        (cp.gather(cp.attention(qg, kg, vg, plan, group=group, enable_gqa=gqa), plan, group=group)
         * weights[rank]).sum().backward()
        qr2, kr2, vr2 = (t.clone().requires_grad_() for t in (q, k, v))
        am.attention(qr2, kr2, vr2, mask, enable_gqa=gqa).backward(sum(weights))
        res = {"gather_dq": scaled_error(qg.grad, cp.shard(qr2.grad, plan, rank)),
               "gather_dk": scaled_error(kg.grad, cp.shard(kr2.grad, plan, rank))}
    return res | {"out": scaled_error(out, cp.shard(ref, plan, rank)), "dq": scaled_error(qs.grad, cp.shard(qr.grad, plan, rank)),
            "dk": scaled_error(ks.grad, cp.shard(kr.grad, plan, rank)),
            "dv": scaled_error(vs.grad, cp.shard(vr.grad, plan, rank)), "gather": scaled_error(full, ref),
            "strategy": plan.strategy, "schedule": plan.schedule, "cpu_s": cpu}


def run_training_step(case: dict, rank: int, world: int, group=None) -> dict:
    """The README's training-script recipe on a toy layer: parameter gradients summed over the group
    must equal one process's. x [B, L, C] -> q, k, v -> cp.attention -> projection -> loss."""
    L, B, C, H, D = case["length"], 1, 24, 2, 12
    mask = am.parse(case["mask"])
    torch.manual_seed(7)
    qkv, proj = torch.nn.Linear(C, 3 * H * D), torch.nn.Linear(H * D, C)
    x = torch.randn(B, L, C, generator=torch.Generator().manual_seed(8))
    target = torch.randn(B, L, C, generator=torch.Generator().manual_seed(9))

    def layer(xs, attend):
        n = xs.shape[1]
        q, k, v = qkv(xs).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)      # [B, H, n, D] each
        return proj(attend(q, k, v).transpose(1, 2).reshape(B, n, H * D))

    plan = cp.plan(mask, L, world, block_size=case["block"])
    pos = plan.positions(rank)
    out = layer(x[:, pos], lambda q, k, v: cp.attention(q, k, v, plan, group=group))
    ((out - target[:, pos]) ** 2).sum().div(L).backward()                 # this rank's share of the loss
    grads = [p.grad.clone() for p in (*qkv.parameters(), *proj.parameters())]
    for g in grads:
        dist.all_reduce(g, group=group)                                   # what DDP over the group does
    for p in (*qkv.parameters(), *proj.parameters()):
        p.grad = None
    ref = layer(x, lambda q, k, v: am.attention(q, k, v, mask))
    ((ref - target) ** 2).sum().div(L).backward()
    errors = [scaled_error(g, p.grad) for g, p in zip(grads, (*qkv.parameters(), *proj.parameters()))]
    return {"out": scaled_error(out, ref[:, pos]), "dq": max(errors), "dk": 0.0, "dv": 0.0, "gather": 0.0,
            "strategy": plan.strategy, "schedule": plan.schedule}


def main() -> None:
    rank, world, store_file, cases, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), float(sys.argv[5])
    torch.set_num_threads(1)
    print(json.dumps({"imported_after": time.perf_counter() - START}), flush=True)
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    # every rank creates every subgroup, in the same order (torch.distributed requires it)
    groups = {}
    for case in cases:
        members = tuple(case.get("group", range(world)))
        if members not in groups:
            groups[members] = None if len(members) == world else dist.new_group(list(members))
    try:
        for case in cases:
            members = tuple(case.get("group", range(world)))
            if rank not in members:
                continue
            if case.get("raise_on") == rank:
                raise ValueError(f"boom on rank {rank}")
            try:
                run = run_training_step if case.get("training_step") else run_case
                res = run(case, members.index(rank), len(members), groups[members])
                res.update(case=case["name"], ok=True)
            except cp.PlanMismatchError as e:
                res = {"case": case["name"], "ok": False, "error": type(e).__name__, "message": str(e)}
            res["world"] = len(members)
            res["seconds_since_start"] = time.perf_counter() - START
            print(json.dumps(res), flush=True)
        dist.barrier()
    finally:
        sys.stdout.flush()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
