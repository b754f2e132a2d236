"""The unified top-k Triton backward inside a CUDA graph: captured once, replayed on new
data copied into the static inputs, checked against the reference on those inputs.

A capture fails if anything in the path synchronizes with the host (``.item()``, a
host-side size read from the GPU), allocates outside the graph's pool or launches on
another stream; a replay is wrong if a launch baked in a pointer or a value of the
capture-time data. Needs a real GPU: under Triton's interpreter (CPU tensors) there is
nothing to capture, and these tests skip.
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, INTERPRET, assert_reduction_close, randn, tf32_round
from meprop_triton import reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none found)"),
    pytest.mark.skipif(
        INTERPRET or DEVICE != "cuda",
        reason="the kernels run under Triton's interpreter (TRITON_INTERPRET=1): no GPU launches to capture",
    ),
]

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def _d(t):
    return t.detach().to(torch.float64).cpu()


def make_grad(M, N, dtype, rng):
    """Random G whose column scores are well apart, so the kernel's fp32 scores and the
    reference's select the same set (their summation orders differ)."""
    G = torch.randn(M, N, generator=rng, dtype=torch.float64)
    target = N + torch.randperm(N, generator=rng).to(torch.float64)
    return (G * (target / G.abs().sum(0))).to(dtype).to("cuda")


def check(gx, gw, gb, G, X, W, k, dtype):
    idx = reference.unified_topk_indices(G, k).cpu()
    rx, rw, rb = reference.unified_backward(_d(G), _d(X), _d(W), idx)
    bx, bw, bb = reference.unified_backward(_d(G).abs(), _d(X).abs(), _d(W).abs(), idx)
    rows = torch.nonzero((gw != 0).any(dim=1)).flatten().cpu()
    assert torch.equal(rows, idx), f"grad_W rows written {rows.tolist()[:10]}... != selected {idx.tolist()[:10]}..."
    M = G.shape[0]
    r = tf32_round(dtype)
    assert_reduction_close(gx, rx, bx, k, in_round=r, what="grad_x")
    assert_reduction_close(gw, rw, bw, M, in_round=r, what="grad_W")
    assert_reduction_close(gb, rb, bb, M, what="grad_b")


def _warm_up(fn, n=2):
    """Run ``fn`` on a side stream (compiles and autotunes outside the capture), as
    torch's CUDA graph notes ask."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,N,I,k", [(96, 300, 136, 17), (1024, 1024, 512, 51)], ids=["small", "1024"])
def test_unified_topk_backward_replays(M, N, I, k, dtype, rng):
    from meprop_triton.triton_ops import unified_topk_backward

    G = make_grad(M, N, dtype, rng)
    X, W = randn((M, I), dtype, rng, "cuda"), randn((N, I), dtype, rng, "cuda")
    _warm_up(lambda: unified_topk_backward(G, X, W, k))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gx, gw, gb = unified_topk_backward(G, X, W, k)

    for _ in range(2):  # two fresh data sets: the replay reads the static inputs each time
        G.copy_(make_grad(M, N, dtype, rng))
        X.copy_(randn((M, I), dtype, rng, "cuda"))
        W.copy_(randn((N, I), dtype, rng, "cuda"))
        gw.fill_(float("nan"))  # a replay that writes nothing cannot pass
        gx.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(gx, gw, gb, G, X, W, k, dtype)


def _reference_layer_grads(layer, x, w_out, k):
    """Gradients of ``(layer(x) * w_out).sum()`` from the reference, in fp64."""
    G = w_out.expand(x.shape[0], -1)  # d loss / d y
    G = G.to(x.dtype)
    idx = reference.unified_topk_indices(G, k).cpu()
    exact = reference.unified_backward(_d(G), _d(x), _d(layer.weight), idx)
    bound = reference.unified_backward(_d(G).abs(), _d(x).abs(), _d(layer.weight).abs(), idx)
    return idx, exact, bound


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_meprop_linear_make_graphed_callables(dtype, rng):
    from meprop_triton import MePropLinear

    M, I, N, k = 256, 192, 320, 24
    torch.manual_seed(0)
    layer = MePropLinear(I, N, k=k, backend="triton", device="cuda", dtype=dtype)
    sample = randn((M, I), dtype, rng, "cuda").requires_grad_()
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))

    for _ in range(2):
        x = randn((M, I), dtype, rng, "cuda").requires_grad_()
        # an upstream gradient with well-separated column scores (a random sign per row)
        w_out = make_grad(1, N, dtype, rng)[0] * 16
        layer.weight.grad = layer.bias.grad = None
        y = graphed(x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
        (y * w_out).sum().backward()
        torch.cuda.synchronize()
        idx, (rx, rw, rb), (bx, bw, bb) = _reference_layer_grads(layer, x.detach(), w_out, k)
        rows = torch.nonzero((layer.weight.grad != 0).any(dim=1)).flatten().cpu()
        assert torch.equal(rows, idx)
        r = tf32_round(dtype)
        assert_reduction_close(x.grad, rx, bx, k, in_round=r, what="grad_x")
        assert_reduction_close(layer.weight.grad, rw, bw, M, in_round=r, what="grad_W")
        assert_reduction_close(layer.bias.grad, rb, bb, M, what="grad_b")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_meprop_linear_backward_captured_whole(dtype, rng):
    """Forward, loss and ``loss.backward()`` captured in one graph; the parameters'
    ``.grad`` are the graph's outputs (allocated in its pool at capture)."""
    from meprop_triton import MePropLinear

    M, I, N, k = 200, 160, 384, 40
    torch.manual_seed(0)
    layer = MePropLinear(I, N, k=k, backend="triton", device="cuda", dtype=dtype)
    x = randn((M, I), dtype, rng, "cuda").requires_grad_()
    w_out = make_grad(1, N, dtype, rng)[0] * 16

    def step():
        (layer(x) * w_out).sum().backward()

    _warm_up(step)
    layer.weight.grad = layer.bias.grad = x.grad = None  # the capture allocates them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for _ in range(2):
        with torch.no_grad():
            x.copy_(randn((M, I), dtype, rng, "cuda"))
            w_out.copy_(make_grad(1, N, dtype, rng)[0] * 16)
            layer.weight.grad.fill_(float("nan"))
        graph.replay()  # the captured backward writes .grad (it does not accumulate)
        torch.cuda.synchronize()
        idx, (rx, rw, rb), (bx, bw, bb) = _reference_layer_grads(layer, x.detach(), w_out, k)
        rows = torch.nonzero((layer.weight.grad != 0).any(dim=1)).flatten().cpu()
        assert torch.equal(rows, idx)
        r = tf32_round(dtype)
        assert_reduction_close(x.grad, rx, bx, k, in_round=r, what="grad_x")
        assert_reduction_close(layer.weight.grad, rw, bw, M, in_round=r, what="grad_W")
        assert_reduction_close(layer.bias.grad, rb, bb, M, what="grad_b")
