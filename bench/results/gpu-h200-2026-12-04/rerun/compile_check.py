# torch.compile over a converted MLP on the GPU: gradients against eager, and the time of a step.
import copy, time, torch
from torch import nn
from meprop_triton import convert
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)).to(dev, dt)
eager = convert(mlp(), k=0.05, exclude=["4"])
comp_model = convert(mlp(), k=0.05, exclude=["4"])
comp = torch.compile(comp_model)
x = torch.randn(8192, 4096, device=dev, dtype=dt); y = torch.randint(0, 10, (8192,), device=dev)
def step(m):
    for p in m.parameters(): p.grad = None
    nn.functional.cross_entropy(m(x), y).backward()
t0 = time.perf_counter(); step(comp); torch.cuda.synchronize(); print(f"compile + first step {time.perf_counter()-t0:.1f} s", flush=True)
step(eager)
for (n, a), b in zip(eager.named_parameters(), comp_model.parameters()):
    d = (a.grad.float() - b.grad.float()).abs().max().item(); s = a.grad.float().abs().max().item()
    rows_e = (a.grad != 0).any(dim=-1).sum().item() if a.dim() == 2 else -1
    rows_c = (b.grad != 0).any(dim=-1).sum().item() if b.dim() == 2 else -1
    print(f"{n}: max |eager - compiled| {d:.3g} (max |g| {s:.3g}); nonzero rows eager {rows_e}, compiled {rows_c}", flush=True)
for name, m in [("eager", eager), ("compiled", comp), ("eager", eager), ("compiled", comp)]:
    for _ in range(3): step(m)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20): step(m)
    torch.cuda.synchronize(); print(f"{name}: {(time.perf_counter()-t0)/20*1e3:.2f} ms per forward+backward (wall)", flush=True)
