import cProfile, io, pstats, statistics, sys, time, os
import torch, triton
from torch import nn
from meprop_triton import MePropLinear
from meprop_triton import triton_ops
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0), flush=True)
dev = "cuda"

def host_us(fn, n=30):
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize(); return statistics.median(ts) * 1e6

def wall_us(fn, n=20):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6

def graph_us(fn, n=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    g.replay(); torch.cuda.synchronize()
    for a, b in ev:
        a.record(); g.replay(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3

def case(M, I, O, k, dt, mode="unified", prof=True):
    print(f"\n===== {mode} M={M} in={I} out={O} k={k} {dt}", flush=True)
    torch.manual_seed(0)
    dense = nn.Linear(I, O).to(dev, dt)
    mp = MePropLinear.from_linear(dense, k=k, unified=(mode == "unified"), backend="triton")
    x = torch.randn(M, I, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(M, O, device=dev, dtype=dt)
    y = mp(x); yd = dense(x)
    f = lambda: torch.autograd.grad(y, (x, mp.weight, mp.bias), g, retain_graph=True)
    fd = lambda: torch.autograd.grad(yd, (x, dense.weight, dense.bias), g, retain_graph=True)
    W = dense.weight.detach(); xd = x.detach()
    if mode == "unified":
        op = lambda: triton_ops.unified_topk_backward(g, xd, W, k)
    else:
        op = lambda: triton_ops.per_example_topk_backward(g, xd, W, k)
    dm = lambda: (g @ W, g.t() @ xd, g.sum(0))
    t0 = time.perf_counter()
    for _ in range(3): f(); fd(); op()
    torch.cuda.synchronize(); print(f"warm-up (compile/autotune) {time.perf_counter()-t0:.1f} s", flush=True)
    for name, fn in [("meprop autograd", f), ("dense autograd", fd), ("op direct", op), ("dense matmuls", dm)]:
        print(f"{name:16s} host {host_us(fn):8.1f} us   wall(sync) {wall_us(fn):8.1f} us", flush=True)
    for name, fn in [("op direct", op), ("dense matmuls", dm)]:
        try:
            print(f"{name:16s} CUDA graph replay {graph_us(fn):8.1f} us", flush=True)
        except Exception as e:
            print(f"{name} graph failed: {type(e).__name__}: {e}"[:300], flush=True)
    if not prof:
        return
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(30):
        op()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:6000], flush=True)

case(8192, 4096, 4096, 205, torch.bfloat16)
case(8192, 4096, 4096, 41, torch.bfloat16, prof=False)
case(1024, 8192, 8192, 8, torch.bfloat16)
case(8192, 4096, 4096, 41, torch.bfloat16, mode="per-example")
