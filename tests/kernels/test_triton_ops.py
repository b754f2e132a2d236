"""meprop_triton.triton_ops: the custom op chaining the kernels, against the reference."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

import kernel_checks
from kernel_checks import DEVICE, assert_reduction_close, randn, skip_unsupported
from meprop_triton import reference


def _d(t):
    return t.detach().to(torch.float64).cpu()


def check_against_reference(G, X, W, k, need=(True, True, True)):
    from meprop_triton.triton_ops import unified_topk_backward

    gx, gw, gb = unified_topk_backward(G, X, W, k, *need)
    # The kernel's fp32 scores are not bit-equal to the reference's: G comes from
    # make_grad (scores well apart), so both select the same set and a wrong selection
    # shows up in the values.
    idx = reference.unified_topk_indices(G, k).cpu()
    rx, rw, rb = reference.unified_backward(_d(G), _d(X), _d(W), idx)
    bx, bw, bb = reference.unified_backward(_d(G).abs(), _d(X).abs(), _d(W).abs(), idx)
    M = G.shape[0]
    for got, want, bound, length, needed, what in (
        (gx, rx, bx, k, need[0], "grad_x"),
        (gw, rw, bw, M, need[1], "grad_W"),
        (gb, rb, bb, M, need[2], "grad_b"),
    ):
        if needed:
            assert got is not None and got.dtype == G.dtype and got.device == G.device
            assert_reduction_close(got, want, bound, length, what=what)
        else:
            assert got is None, what


def make_grad(M, N, dtype, rng, device):
    """Random G whose column scores are well apart (relative gaps >> rounding)."""
    G = torch.randn(M, N, generator=rng, dtype=torch.float64)
    target = N + torch.randperm(N, generator=rng).to(torch.float64)
    return (G * (target / G.abs().sum(0))).to(dtype).to(device)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,I", [(1, 5, 3), (37, 130, 64), (7, 1000, 129)], ids=lambda v: str(v))
def test_matches_reference(M, N, I, dtype, rng, device, gemm_route):
    skip_unsupported(dtype)
    G = make_grad(M, N, dtype, rng, device)
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    for k in sorted({1, max(1, N - 1), N}):
        check_against_reference(G, X, W, k)


@pytest.mark.interpreter
@pytest.mark.parametrize("need", list(itertools.product([True, False], repeat=3)), ids=lambda n: "".join("xwb"[i] if v else "-" for i, v in enumerate(n)))
def test_need_flags(need, rng, device, gemm_route):
    G = make_grad(37, 130, torch.float32, rng, device)
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    check_against_reference(G, X, W, 13, need)


@pytest.mark.interpreter
def test_strided_and_three_d(rng, device, gemm_route):
    g3 = make_grad(5 * 7, 130, torch.float32, rng, device).reshape(5, 7, 130).transpose(0, 1)
    x3 = randn((5, 7, 64), torch.float32, rng, device).transpose(0, 1)
    W = randn((64, 130), torch.float32, rng, device).t()  # column-major weight
    check_against_reference(g3.reshape(-1, 130), x3.reshape(-1, 64), W, 20)


@pytest.mark.interpreter
def test_nan_grad_reaches_outputs(rng, device, gemm_route):
    from meprop_triton.triton_ops import unified_topk_backward

    G = randn((37, 130), torch.float32, rng, device) * 1e-3
    G[2, 99] = math.nan
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    gx, gw, gb = unified_topk_backward(G, X, W, 1)
    assert torch.isnan(gx).any() and torch.isnan(gw[99]).all() and torch.isnan(gb[99])
    assert (gw[:99] == 0).all() and (gw[100:] == 0).all()


@pytest.mark.interpreter
def test_nonfinite_unselected_weight_rows_stay_out(rng, device, gemm_route):
    """W's unselected rows are never read: inf / NaN there leaves grad_x finite (the
    cuBLAS route's padding rows are zeros it writes, not rows of W)."""
    from meprop_triton.triton_ops import unified_topk_backward

    G = make_grad(37, 130, torch.float32, rng, device)
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    k = 13  # padded to 16: three padding rows
    idx = reference.unified_topk_indices(G, k).cpu()
    never = torch.ones(130, dtype=torch.bool)
    never[idx] = False
    W[never.nonzero()[0, 0]] = math.inf
    W[never.nonzero()[1, 0]] = math.nan
    gx, gw, _ = unified_topk_backward(G, X, W, k)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    check_against_reference(G, X, W, k)


@pytest.mark.interpreter
def test_opcheck(rng, device):
    """Schema, fake-tensor and AOT-dispatch checks (on a GPU: the triton_op decomposition)."""
    import meprop_triton.triton_ops  # noqa: F401

    G = make_grad(37, 130, torch.float32, rng, device)
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    op = torch.ops.meprop_triton.unified_topk_backward.default
    torch.library.opcheck(op, (G, X, W, 13, True, True, True))
    torch.library.opcheck(op, (G, X, W, 13, False, True, False))


@pytest.mark.interpreter
def test_torch_compile_one_graph(rng, device):
    from meprop_triton.triton_ops import unified_topk_backward

    G = make_grad(37, 130, torch.float32, rng, device)
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    torch._dynamo.reset()
    # CPU: aot_eager keeps the test fast (the op is opaque there); GPU: inductor traces into it
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    fn = torch.compile(lambda g, x, w: unified_topk_backward(g, x, w, 13), fullgraph=True, backend=backend)
    got = fn(G, X, W)
    want = unified_topk_backward(G, X, W, 13)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_rejects_bad_arguments(rng, device):
    from meprop_triton.triton_ops import unified_topk_backward

    G = randn((3, 5), torch.float32, rng, device)
    X, W = randn((3, 4), torch.float32, rng, device), randn((5, 4), torch.float32, rng, device)
    with pytest.raises(ValueError, match="k must lie in"):
        unified_topk_backward(G, X, W, 0)
    with pytest.raises(ValueError, match="k must lie in"):
        unified_topk_backward(G, X, W, 6)
    with pytest.raises(ValueError, match="shapes do not fit"):
        unified_topk_backward(G, X, W.t(), 2)


@pytest.mark.interpreter
def test_operands_of_another_dtype(rng, device, gemm_route):
    """A weight (for grad_x) or an input (for grad_W) of another dtype than grad: a clear
    error before any work, whichever route; one that is not read is not checked, and
    grad_W comes in grad's dtype."""
    from meprop_triton.triton_ops import unified_backward_from_indices, unified_topk_backward

    G = make_grad(37, 130, torch.float32, rng, device)
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    idx = torch.arange(0, 130, 10, device=device)
    for fn, arg in ((unified_topk_backward, 13), (unified_backward_from_indices, idx)):
        with pytest.raises(TypeError, match="grad and weight must share dtype and device"):
            fn(G, X, W.half(), arg)
        with pytest.raises(TypeError, match="grad and x must share dtype and device"):
            fn(G, X.half(), W, arg)
        gx, gw, gb = fn(G, X, W.half(), arg, need_x=False)
        assert gx is None and gw.dtype == torch.float32 and gb.dtype == torch.float32


def _run(code: str) -> subprocess.CompletedProcess:
    env = kernel_checks.compiled_env()
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_package_import_does_not_import_triton():
    proc = _run("import sys, meprop_triton; assert 'triton' not in sys.modules, 'triton imported'")
    assert proc.returncode == 0, proc.stderr


def test_kernel_import_touches_no_cuda():
    pytest.importorskip("triton")
    proc = _run(
        "import torch, meprop_triton.triton_ops, meprop_triton.kernels.matmul, "
        "meprop_triton.kernels.scores, meprop_triton.kernels.topk\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'"
    )
    assert proc.returncode == 0, proc.stderr
