"""``meprop_linear`` / ``MePropLinear`` end to end on the Triton backend.

Under the interpreter on CPU machines, on CUDA tensors on a GPU: the same tests. The
torch path (itself checked against an independent oracle in tests/) is the reference.
"""

from __future__ import annotations

import pytest
import torch

import meprop_triton.triton_ops as triton_ops
from kernel_checks import BACKEND_TOL, BF16_DOT, INTERPRET
from meprop_triton import MePropLinear, meprop_linear

pytestmark = pytest.mark.interpreter


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach the Triton op, so a test knows the kernels ran."""
    calls = []
    real = triton_ops.unified_topk_backward

    def wrapped(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "unified_topk_backward", wrapped)
    return calls


def run(backend, x, w, b, g, k):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = meprop_linear(x, w, b, k=k, backend=backend)
    y.backward(g)
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("lead", [(), (7,), (2, 5)], ids=["1d", "M7", "B2T5"])
@pytest.mark.parametrize("size", [(33, 40), (64, 130), (5, 3)], ids=["in33-out40", "in64-out130", "in5-out3"])
@pytest.mark.parametrize("k", [1, 0.1, "out-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_backend_matches_torch_backend(lead, size, k, dtype, bias, rng, device, spy):
    in_f, out_f = size
    k = max(1, out_f - 1) if k == "out-1" else k
    x = torch.randn(*lead, in_f, generator=rng).to(device, dtype)
    w = (torch.randn(out_f, in_f, generator=rng) / in_f**0.5).to(device, dtype)
    b = torch.randn(out_f, generator=rng).to(device, dtype) if bias else None
    # Column magnitudes spread apart so the selection has no near-ties in fp16 / bf16.
    scale = torch.linspace(0.5, 2.0, out_f)[torch.randperm(out_f, generator=rng)]
    g = (torch.randn(*lead, out_f, generator=rng) * scale).to(device, dtype)
    y_t, gx_t, gw_t, gb_t = run("triton", x, w, b, g, k)
    y_r, gx_r, gw_r, gb_r = run("torch", x, w, b, g, k)
    assert len(spy) == 1
    assert torch.equal(y_t, y_r)  # the forward is F.linear on both
    rows_t = gw_t.abs().sum(1).nonzero().flatten()
    rows_r = gw_r.abs().sum(1).nonzero().flatten()
    assert torch.equal(rows_t, rows_r)
    torch.testing.assert_close(gx_t, gx_r, **BACKEND_TOL[dtype])
    torch.testing.assert_close(gw_t, gw_r, **BACKEND_TOL[dtype])
    if bias:
        torch.testing.assert_close(gb_t, gb_r, **BACKEND_TOL[dtype])


def test_module_on_triton_backend_trains(rng, device, spy):
    torch.manual_seed(0)
    layer = MePropLinear(16, 48, k=0.25, backend="triton", device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(12, 16, generator=rng).to(device)
    target = torch.randn(12, 48, generator=rng).to(device)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        assert int((layer.weight.grad != 0).any(1).sum()) == 12
        opt.step()
        losses.append(loss.item())
    assert len(spy) == 5
    assert losses[-1] < losses[0]


def test_auto_backend_uses_kernels_only_for_cuda(rng, device, spy):
    x = torch.randn(4, 8, generator=rng).to(device).requires_grad_()
    w = torch.randn(10, 8, generator=rng).to(device).requires_grad_()
    meprop_linear(x, w, k=3).sum().backward()
    assert len(spy) == (1 if device == "cuda" else 0)


def test_triton_backend_refuses_sparse_grad(rng, device):
    x = torch.randn(4, 8, generator=rng).to(device).requires_grad_()
    w = torch.randn(10, 8, generator=rng).to(device)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        meprop_linear(x, w, k=3, backend="triton", sparse_grad=True)


@pytest.mark.parametrize(
    "mode,op",
    [
        (dict(unified=False), "per_example_topk_backward"),
        (dict(selection="random"), "unified_backward_from_indices"),
        (dict(unified=False, selection="random"), "per_example_backward_from_indices"),
    ],
    ids=["per-example-topk", "unified-random", "per-example-random"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_other_modes_on_triton_match_torch(mode, op, dtype, rng, device, monkeypatch):
    calls = []
    real = getattr(triton_ops, op)
    monkeypatch.setattr(triton_ops, op, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    in_f, out_f = 24, 70
    x = torch.randn(3, 3, in_f, generator=rng).to(device, dtype)
    w = (torch.randn(out_f, in_f, generator=rng) / in_f**0.5).to(device, dtype)
    b = torch.randn(out_f, generator=rng).to(device, dtype)
    g = torch.randn(3, 3, out_f, generator=rng).to(device, dtype)
    grads = {}
    for backend in ("triton", "torch"):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        gen = torch.Generator(device=device).manual_seed(17)
        meprop_linear(xs, ws, bs, k=7, backend=backend, generator=gen, **mode).backward(g)
        grads[backend] = (xs.grad, ws.grad, bs.grad)
    assert len(calls) == 1
    tol = BACKEND_TOL[dtype]
    rows_t = grads["triton"][1].abs().sum(1).nonzero().flatten()
    rows_r = grads["torch"][1].abs().sum(1).nonzero().flatten()
    assert torch.equal(rows_t, rows_r)
    for a, r in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
def test_autocast_runs_the_kernels_in_the_autocast_dtype(dtype, backward_inside, rng, device, spy):
    """Mixed-precision training as users write it on a GPU: fp32 parameters, a forward
    under ``torch.autocast``. The layer's output is autocast's ``nn.Linear`` output, the
    kernels run in the autocast dtype, and the fp32 parameters get fp32 gradients equal
    to the torch path's under the same autocast (the backward called inside the
    autocast region or after it)."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(48, 96, device=device)
    x = torch.randn(3, 10, 48, generator=rng).to(device)
    scale = torch.linspace(0.5, 2.0, 96)[torch.randperm(96, generator=rng)]
    g = (torch.randn(3, 10, 96, generator=rng) * scale).to(device, dtype)
    got = {}
    for backend in ("triton", "torch"):
        layer = MePropLinear.from_linear(dense, k=0.1, backend=backend)
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            y = layer(xs)
            with torch.no_grad():
                y_dense = dense(x)
            if backward_inside:
                y.backward(g)
        if not backward_inside:
            y.backward(g)
        assert y.dtype == dtype and torch.equal(y, y_dense)
        got[backend] = (xs.grad, layer.weight.grad, layer.bias.grad)
    assert len(spy) == 1
    for t in got["triton"]:
        assert t.dtype == torch.float32
    rows_t = got["triton"][1].abs().sum(1).nonzero().flatten()
    rows_r = got["torch"][1].abs().sum(1).nonzero().flatten()
    assert rows_t.numel() == 10 and torch.equal(rows_t, rows_r)
    for a, r in zip(got["triton"], got["torch"]):
        torch.testing.assert_close(a, r, **BACKEND_TOL[dtype])


def test_triton_backend_refuses_float64(rng, device):
    x = torch.randn(4, 8, dtype=torch.float64).to(device)
    w = torch.randn(10, 8, dtype=torch.float64).to(device)
    with pytest.raises(TypeError, match="float64"):
        meprop_linear(x, w, k=3, backend="triton")


@pytest.mark.skipif(not (INTERPRET and BF16_DOT), reason="the interpreter's bf16 dot, as the harness mends it")
def test_interpreter_with_a_wrong_bf16_dot_is_refused_before_any_work(rng, device, monkeypatch):
    """Triton's own interpreter multiplies bf16 dot operands as raw bits: there
    backend='triton' refuses bf16 with the reason (gradients would be garbage), before
    any work; with the dot mended (as kernel_checks does) the same call runs."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    mended = builder.create_dot
    x = torch.randn(4, 8, generator=rng).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(10, 8, generator=rng).to(device, torch.bfloat16).requires_grad_()
    monkeypatch.setattr(builder, "create_dot", mended._meprop_original)
    with pytest.raises(TypeError, match="bfloat16 tl.dot"):
        meprop_linear(x, w, k=3, backend="triton")
    with pytest.raises(TypeError, match="bfloat16 tl.dot"):
        MePropLinear(8, 10, k=3, backend="triton", dtype=torch.bfloat16)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16 tl.dot"):
        meprop_linear(x.float(), w.float(), k=3, backend="triton")
    assert x.grad is None and w.grad is None
    monkeypatch.setattr(builder, "create_dot", mended)
    meprop_linear(x, w, k=3, backend="triton").float().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(w.grad).all()
