"""Can PyTorch's public CPU ops give bf16 attention at the hardware's bf16 speed? (issue 13, Build 1)

One batch of ``G`` window blocks (q 128 x k 1152 per block, 8 heads, D=64, an additive band mask)
timed, calls taking turns, median of 7: the fused flash kernel in fp32 and bf16, the q k^T bmm
alone in fp32 and bf16 (oneDNN), and attention composed from bf16 ops (baddbmm with the mask,
softmax, bmm), with and without the logsumexp that merging calls and the backward need. Then
the error of each against float64, in units of the "stick" (the float64 result rounded to bf16).
Results and the conclusion: benchmarks/results/bf16_profile.md.

    $ python benchmarks/probe_bf16_routes.py 32        # G = 32 blocks
    $ OMP_NUM_THREADS=1 python benchmarks/probe_bf16_routes.py 32
"""
import time, statistics, torch, sys
torch.manual_seed(0)
flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
G, H, R, K, D = int(sys.argv[1]) if len(sys.argv) > 1 else 32, 8, 128, 1152, 64
scale = 0.125
q = torch.randn(G, H, R, D); k = torch.randn(G, H, K, D); v = torch.randn(G, H, K, D)
# a window mask: row r sees keys [r, r + 1024] of the 1152
r = torch.arange(R)[:, None]; c = torch.arange(K)[None, :]
allowed = (c >= r) & (c <= r + 1024)
add32 = torch.zeros(R, K).masked_fill_(~allowed, float("-inf"))
qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
addb = add32.bfloat16()
q3, k3, v3 = (t.reshape(G * H, -1, D) for t in (qb, kb, vb))
k3t = k3.transpose(1, 2)
def composed():
    s = torch.baddbmm(addb, q3, k3t, alpha=scale)           # bf16 out (fp32 accum inside)
    p = torch.softmax(s, -1)
    return torch.bmm(p, v3)
def composed_lse():
    s = torch.baddbmm(addb, q3, k3t, alpha=scale)
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1)
    return torch.bmm(p, v3), lse
def composed_f32sm():
    s = torch.baddbmm(addb, q3, k3t, alpha=scale)
    p = torch.softmax(s, -1, dtype=torch.float32).bfloat16()
    return torch.bmm(p, v3)
def parts():
    t = {}
    a = time.perf_counter(); s = torch.baddbmm(addb, q3, k3t, alpha=scale); t['baddbmm'] = time.perf_counter() - a
    a = time.perf_counter(); p = torch.softmax(s, -1); t['softmax'] = time.perf_counter() - a
    a = time.perf_counter(); o = torch.bmm(p, v3); t['bmm pv'] = time.perf_counter() - a
    a = time.perf_counter(); l = torch.logsumexp(s.float(), -1); t['lse'] = time.perf_counter() - a
    return t
calls = {
    "flash fp32 +mask": lambda: flash(q, k, v, 0.0, False, attn_mask=add32, scale=scale),
    "flash bf16 +mask": lambda: flash(qb, kb, vb, 0.0, False, attn_mask=addb, scale=scale),
    "composed bf16": composed,
    "composed bf16 + lse": composed_lse,
    "composed, fp32 softmax": composed_f32sm,
    "bmm qk fp32": lambda: torch.bmm(q.reshape(G*H,R,D), k.reshape(G*H,K,D).transpose(1,2)),
    "bmm qk bf16": lambda: torch.bmm(q3, k3t),
}
for f in calls.values(): f()
ts = {n: [] for n in calls}
for _ in range(7):
    for n, f in calls.items():
        a = time.perf_counter(); f(); ts[n].append(time.perf_counter() - a)
cells = G * H * R * K
for n, t in ts.items():
    print(f"{n:28s} {statistics.median(t)*1e3:8.2f} ms  {statistics.median(t)*1e9/cells:.3f} ns/score")
pt = [parts() for _ in range(5)]
print({k_: round(statistics.median(p[k_] for p in pt) * 1e9 / cells, 3) for k_ in pt[0]})
# accuracy vs float64, scaled by max|v|
qd, kd, vd = qb.double(), kb.double(), vb.double()
s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
ref = torch.softmax(s, -1) @ vd
unit = float(vd.abs().max())
def err(o): return float((o.double().reshape(ref.shape) - ref).abs().max()) / max(float(ref.abs().max()), unit)
print("stick", err(ref.bfloat16()), "flash bf16", err(flash(qb, kb, vb, 0.0, False, attn_mask=addb, scale=scale)[0]),
      "composed", err(composed()), "fp32 softmax", err(composed_f32sm()))
