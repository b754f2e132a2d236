"""``torch.compile`` with ``MePropLinear`` inside: the same outputs, gradients and
selected units as eager mode."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear


def compile_backend() -> str:
    """Inductor needs a C++ compiler on a CPU machine; aot_eager (the same autograd
    tracing, no code generation) is the fallback without one."""
    cxx = os.environ.get("CXX", "g++")
    return "inductor" if shutil.which(cxx) or shutil.which("c++") else "aot_eager"


def nonzero_rows(grad):
    return (grad != 0).any(1).nonzero().flatten().tolist()


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = MePropLinear(12, 40, k=0.25)
        self.fc2 = MePropLinear(40, 24, k=5)
        self.out = nn.Linear(24, 6)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_compiled_matches_eager(dtype, fresh_dynamo):
    torch.manual_seed(0)
    eager = Mlp().to(dtype)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=compile_backend())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 12, dtype=dtype, generator=gen)
    # Distinct per-unit scales: fc1/fc2's unit scores are far from ties, so rounding
    # differences between the compiled and eager kernels cannot change the selection.
    weight = torch.randn(6, dtype=dtype, generator=gen)

    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for step in range(2):  # the second call reuses the compiled graphs on new data
        for p in (*eager.parameters(), *model.parameters()):
            p.grad = None
        xe = (x + step).requires_grad_()
        xc = (x + step).requires_grad_()
        ye = eager(xe)
        yc = compiled(xc)
        torch.testing.assert_close(yc, ye, rtol=rtol, atol=rtol)
        (ye * weight).sum().backward()
        (yc * weight).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=rtol, atol=rtol)
        for name in ("fc1", "fc2"):
            ge = getattr(eager, name).weight.grad
            gc = getattr(model, name).weight.grad
            assert len(nonzero_rows(ge)) == getattr(eager, name).k_units
            assert nonzero_rows(gc) == nonzero_rows(ge), f"{name}: a different selection"
        for (n, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=rtol, atol=rtol, msg=n)

def test_compiled_fullgraph_without_graph_breaks(fresh_dynamo):
    """A MePropLinear traces into one graph (no graph break) and its k is honoured."""
    torch.manual_seed(0)
    layer = MePropLinear(10, 30, k=4)
    compiled = torch.compile(layer, backend=compile_backend(), fullgraph=True)
    x = torch.randn(5, 10, requires_grad=True)
    compiled(x).pow(2).sum().backward()
    assert len(nonzero_rows(layer.weight.grad)) == 4
    assert x.grad is not None and x.grad.shape == x.shape


def test_sparse_grad_runs_outside_the_graph_and_fullgraph_names_it(fresh_dynamo):
    """torch.compile cannot trace building a sparse tensor: a sparse_grad=True layer
    runs eagerly inside a compiled model (eager's sparse gradients), and with
    fullgraph=True the error names sparse_grad rather than a tracer internal."""
    torch.manual_seed(0)
    x, g = torch.randn(6, 5), torch.randn(6, 7)
    eager = MePropLinear(5, 7, k=2, sparse_grad=True)
    layer = copy.deepcopy(eager)
    eager(x).backward(g)
    torch.compile(layer, backend=compile_backend())(x).backward(g)
    assert layer.weight.grad.is_sparse
    torch.testing.assert_close(layer.weight.grad.to_dense(), eager.weight.grad.to_dense())
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="sparse_grad=True"):
        torch.compile(copy.deepcopy(eager), backend=compile_backend(), fullgraph=True)(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compiled_dynamic_shapes_with_a_fractional_k(kind, fresh_dynamo):
    """``torch.compile(dynamic=True)`` of a layer with a float k, never run eagerly
    before: its k is resolved when set (in the forward it would be a symbolic float,
    which the resolution cannot take), and the compiled layer serves every sequence
    length with eager's gradients."""
    from meprop_triton import MePropConv1D

    torch.manual_seed(0)
    make = (lambda: MePropLinear(16, 40, k=0.1)) if kind == "linear" else (lambda: MePropConv1D(40, 16, k=0.1))
    eager = make()
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    scale = torch.randn(40, generator=gen)  # distinct unit scores: no ties
    for n in (3, 5, 8):
        x = torch.randn(n, 7, 16, generator=gen)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        (eager(xe) * scale).sum().backward()
        (compiled(xc) * scale).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
        ge, gc = eager.weight.grad, layer.weight.grad
        rows = (lambda g: nonzero_rows(g)) if kind == "linear" else (lambda g: nonzero_rows(g.t()))
        assert rows(gc) == rows(ge) and len(rows(ge)) == 4
        torch.testing.assert_close(gc, ge)
        eager.zero_grad(set_to_none=True)
        layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_lstm_keeps_the_meprop_backward(backend, fresh_dynamo):
    """A compiled model with a MePropLSTM gives eager mode's meProp gradients. (Under
    torch 2.11, Dynamo reads torch.compiler.is_exporting() as True, and the layer took
    its export path there: torch's LSTM op, whose gradients are the dense ones.)"""
    from meprop_triton import MePropLSTM

    torch.manual_seed(0)
    lstm = MePropLSTM(5, 7, k=2).double()
    dense = nn.LSTM(5, 7).double()
    dense.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.double)
    lstm(x)[0].pow(2).sum().backward()
    eager = [p.grad.clone() for p in lstm.parameters()]
    dense(x)[0].pow(2).sum().backward()
    assert not all(torch.allclose(a, p.grad) for a, p in zip(eager, dense.parameters()))  # k=2 is not dense
    lstm.zero_grad()
    torch.compile(lambda x: lstm(x)[0].pow(2).sum(), backend=backend)(x).backward()
    for a, p in zip(eager, lstm.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-13)


def _func_layer(kind):
    """A layer at k=2 of 9 units, its parameters (detached), and the loss' dense gradient
    function (what a dropped meProp backward gives)."""
    from meprop_triton import MePropConv1D

    torch.manual_seed(0)
    if kind == "linear":
        layer = MePropLinear(6, 9, k=2).double()

        def dense(p, x):
            return torch.nn.functional.linear(x, p["weight"], p["bias"]).pow(2).sum()
    else:
        layer = MePropConv1D(9, 6, k=2).double()

        def dense(p, x):
            return (x @ p["weight"] + p["bias"]).pow(2).sum()

    return layer, {n: p.detach() for n, p in layer.named_parameters()}, torch.func.grad(dense)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compiled_func_grad_keeps_the_meprop_backward(kind, fresh_dynamo):
    """torch.compile(grad(f)): eager grad's meProp gradients. Before torch 2.15 Dynamo
    dropped the meProp backward there and the gradients came out dense, silently; there
    the layer now runs outside the graph (and fullgraph=True names why)."""
    from torch.func import functional_call, grad, vmap

    layer, params, dense_grad = _func_layer(kind)
    x = torch.randn(4, 6, dtype=torch.double)

    def f(p, x):
        return functional_call(layer, p, (x,)).pow(2).sum()

    eager = grad(f)(params, x)
    dense = dense_grad(params, x)
    assert not torch.allclose(eager["weight"], dense["weight"])  # k=2 of 9 is not dense
    compiled = torch.compile(grad(f), backend="aot_eager")(params, x)
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-12, atol=1e-13)
    if torch.__version__ < "2.15":
        torch._dynamo.reset()
        with pytest.raises(Exception, match="Dynamo would drop the meProp backward"):
            torch.compile(grad(f), backend="aot_eager", fullgraph=True)(params, x)

    # vmap(grad) under compile: eager's per-sample gradients, or torch's own refusal
    # ("vmap over ApplyTemplate", README), never dense ones
    xs = torch.randn(3, 4, 6, dtype=torch.double)
    per_sample = vmap(grad(f), in_dims=(None, 0))(params, xs)
    torch._dynamo.reset()
    try:
        got = torch.compile(vmap(grad(f), in_dims=(None, 0)), backend="aot_eager")(params, xs)
    except Exception as e:  # noqa: BLE001 - torch raises its own internal error types
        assert "vmap over ApplyTemplate" in str(e)
    else:
        for n in per_sample:
            torch.testing.assert_close(got[n], per_sample[n], rtol=1e-12, atol=1e-13)
