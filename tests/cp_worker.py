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
    t0 = time.process_time()
    out = cp.attention(qs, ks, vs, plan, group=group, enable_gqa=gqa)
    out.backward(cp.shard(dout, plan, rank))
    cpu = time.process_time() - t0
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = am.attention(qr, kr, vr, mask, enable_gqa=gqa)
    ref.backward(dout)
    full = cp.gather(out, plan, group=group)
    return {"out": scaled_error(out, cp.shard(ref, plan, rank)), "dq": scaled_error(qs.grad, cp.shard(qr.grad, plan, rank)),
            "dk": scaled_error(ks.grad, cp.shard(kr.grad, plan, rank)),
            "dv": scaled_error(vs.grad, cp.shard(vr.grad, plan, rank)), "gather": scaled_error(full, ref),
            "strategy": plan.strategy, "schedule": plan.schedule, "cpu_s": cpu}


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
                res = run_case(case, members.index(rank), len(members), groups[members])
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
