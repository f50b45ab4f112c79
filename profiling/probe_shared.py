"""Probe: where the Qwen-like layer's time goes — shared expert (ours vs cuBLAS chain) and routed experts."""
import torch, torch.nn.functional as F
from bench.common import time_ms
import csrc_triton as ct

torch.manual_seed(0)
T, H, S, E, k, I = 16384, 2048, 5632, 60, 4, 1408
dt = torch.bfloat16
x = torch.randn(T, H, device="cuda", dtype=dt)
wg, wu = (torch.randn(S, H, device="cuda", dtype=dt) * 0.02 for _ in range(2))
wd = torch.randn(H, S, device="cuda", dtype=dt) * 0.02
gate = torch.rand(T, 1, device="cuda")
dout = torch.randn(T, H, device="cuda", dtype=dt)
params = [wg, wu, wd]

def run(fn, bwd):
    def f():
        xx = x.requires_grad_(bwd)
        for p in params: p.requires_grad_(bwd)
        with torch.set_grad_enabled(bwd):
            o = fn(xx)
            if bwd:
                o.backward(dout)
    return f

ours = lambda xx: ct.shared_expert_mlp(xx, wg, wu, wd, gate)
cublas = lambda xx: gate * F.linear(F.silu(F.linear(xx, wg)) * F.linear(xx, wu), wd)
fl = 2 * T * H * 3 * S
for name, fn in [("shared ours", ours), ("shared cublas", cublas)]:
    f = time_ms(run(fn, False)); fb = time_ms(run(fn, True), grad_to_none=[x] + params)
    print(f"{name:16s} fwd {f:7.3f} ms {fl/f/1e9:5.0f} TF/s   fwd+bwd {fb:7.3f} ms {3*fl/fb/1e9:5.0f} TF/s")
a = torch.randn(T, H, device="cuda", dtype=dt); b = torch.randn(H, 2 * S, device="cuda", dtype=dt)
ms = time_ms(lambda: a @ b); print(f"mm T,H x H,2S cublas  {ms:7.3f} ms {2*T*H*2*S/ms/1e9:5.0f} TF/s")
dh = torch.randn(T, 2 * S, device="cuda", dtype=dt)
ms = time_ms(lambda: dh.t() @ x); print(f"wgrad dh^T x cublas   {ms:7.3f} ms {2*T*H*2*S/ms/1e9:5.0f} TF/s")
# routed experts alone
logits = torch.randn(T, E, device="cuda", dtype=dt)
r = ct.route(logits, top_k=k)
wgu = torch.randn(E, 2 * I, H, device="cuda", dtype=dt) * 0.02
wdn = torch.randn(E, H, I, device="cuda", dtype=dt) * 0.02
w = r.weights.to(dt)
def routed(bwd):
    def f():
        xx = x.requires_grad_(bwd); wgu.requires_grad_(bwd); wdn.requires_grad_(bwd)
        with torch.set_grad_enabled(bwd):
            o = ct.expert_mlp(xx, w, r.expert_ids, wgu, wdn)
            if bwd: o.backward(dout)
    return f
flr = 2 * T * k * H * 3 * I
f = time_ms(routed(False)); fb = time_ms(routed(True), grad_to_none=[x, wgu, wdn])
print(f"routed ours      fwd {f:7.3f} ms {flr/f/1e9:5.0f} TF/s   fwd+bwd {fb:7.3f} ms {3*flr/fb/1e9:5.0f} TF/s")
