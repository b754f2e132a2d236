"""The CPU backward's fast path (``functional._cpu_unified_topk``: unified top-k, 2-D,
dense gradients) against the general route (``functional._gradients``), bit for bit.

The general route is itself checked against an independent oracle in test_functional.py;
here the two implementations of the same numbers must agree exactly, in every case the
fast path takes: each dtype, ties at the k-th unit, NaN / inf scores (its fallback to the
stable sort), strided tensors, each subset of gradients, and weight gradients on both
sides of the size where it stops gathering rows (``reference._LAZY_ZEROS_BYTES``).
"""

from __future__ import annotations

import math

import pytest
import torch

from meprop_triton import MePropLinear, functional, meprop_linear, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def general(grad, x, weight, k, needs):
    gx, gw, gb, _ = functional._gradients(grad, x, weight, k, "torch", True, "topk", False, None, None, needs)
    return gx, gw, gb


def assert_bitwise(got, want):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        # as integers: the sign of zero and NaN payloads count too
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
        assert torch.equal(g.contiguous().view(view), w.contiguous().view(view))


def case(M, out_f, in_f, dtype, gen, *, grad_kind="randn"):
    x = torch.randn(M, in_f, generator=gen).to(dtype)
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    if grad_kind == "ints":  # many equal scores: ties at the k-th unit
        g = torch.randint(-2, 3, (M, out_f), generator=gen).to(dtype)
    else:
        g = torch.randn(M, out_f, generator=gen).to(dtype)
    return g, x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1), (50, 500, 784), (13, 37, 7), (7, 123, 64), (64, 40, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kspec", ["1", "third", "out-1"])
@pytest.mark.parametrize("grad_kind", ["randn", "ints"])
def test_fast_path_equals_general_route(dtype, shape, kspec, grad_kind, gen):
    M, out_f, in_f = shape
    k = {"1": 1, "third": max(1, out_f // 3), "out-1": out_f - 1}[kspec]
    if k >= out_f:
        pytest.skip("the fast path takes k < out only")
    g, x, w = case(M, out_f, in_f, dtype, gen, grad_kind=grad_kind)
    needs = (True, True, True)
    assert_bitwise(functional._cpu_unified_topk(g, x, w, k, needs), general(g, x, w, k, needs))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, False)], ids=str)
def test_each_subset_of_gradients(needs, gen):
    g, x, w = case(9, 30, 11, torch.float32, gen)
    got = functional._cpu_unified_topk(g, x, w, 4, needs)
    assert_bitwise(got, general(g, x, w, 4, needs))
    assert [t is not None for t in got] == list(needs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_nonfinite_scores_take_the_stable_sort(bad, gen):
    g, x, w = case(6, 20, 5, torch.float32, gen)
    g[2, 7] = bad
    g[4, 3] = math.nan if bad != bad else bad  # two such units: ties among them
    for k in (1, 2, 5):
        assert_bitwise(functional._cpu_unified_topk(g, x, w, k, (True, True, True)),
                       general(g, x, w, k, (True, True, True)))


def test_strided_tensors(gen):
    g, x, w = case(12, 80, 60, torch.float32, gen)
    gs, xs, ws = g[:, :40].t().contiguous().t(), x[:, ::2], w[::2, ::2]  # (12, 40), (12, 30), (40, 30)
    assert not gs.is_contiguous() and not xs.is_contiguous() and not ws.is_contiguous()
    assert_bitwise(functional._cpu_unified_topk(gs, xs, ws, 5, (True, True, True)),
                   general(gs, xs, ws, 5, (True, True, True)))


def test_weight_gradient_at_the_lazy_zeros_size(gen, monkeypatch):
    """Below the size the rows are gathered in one pass; from it up, zeros (lazily
    mapped, in a real run) and a scatter: the same numbers either way."""
    g, x, w = case(5, 64, 32, torch.float32, gen)
    nbytes = 64 * 32 * 4
    for threshold in (nbytes, nbytes + 1):  # at the size: scatter; one byte more: gather
        monkeypatch.setattr(reference, "_LAZY_ZEROS_BYTES", threshold)
        assert_bitwise(functional._cpu_unified_topk(g, x, w, 6, (True, True, True)),
                       general(g, x, w, 6, (True, True, True)))


def test_row_maps_are_not_changed_by_use(gen):
    idx = torch.tensor([4, 0, 2])
    first = functional._row_map(6, 3, idx)
    assert first.tolist() == [1, 3, 2, 3, 0, 3]
    again = functional._row_map(6, 3, torch.tensor([5, 1, 3]))
    assert again.tolist() == [3, 1, 3, 2, 3, 0]
    assert functional._row_map(6, 3, idx).tolist() == first.tolist()


def test_a_module_backward_takes_the_fast_path(gen, monkeypatch):
    """A plain CPU training step runs the fast path, with the numbers of the general
    route; counters, sparse gradients, 3-D inputs and per-example selection do not."""
    calls = []
    real = functional._cpu_unified_topk
    monkeypatch.setattr(functional, "_cpu_unified_topk", lambda *a: calls.append(1) or real(*a))
    layer = MePropLinear(20, 30, k=5)
    x = torch.randn(8, 20, generator=gen, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert calls == [1]
    # the same step through the general route
    g = 2 * torch.nn.functional.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    gx, gw, gb = general(g, x.detach(), layer.weight.detach(), 5, (True, True, True))
    assert_bitwise((x.grad, layer.weight.grad, layer.bias.grad), (gx, gw, gb))

    for make in (lambda: MePropLinear(20, 30, k=5, track_selection=True),
                 lambda: MePropLinear(20, 30, k=5, sparse_grad=True),
                 lambda: MePropLinear(20, 30, k=5, unified=False)):
        make()(torch.randn(8, 20, generator=gen, requires_grad=True)).sum().backward()
    MePropLinear(20, 30, k=5)(torch.randn(2, 4, 20, generator=gen, requires_grad=True)).sum().backward()
    meprop_linear(torch.randn(3, 20, generator=gen, requires_grad=True), layer.weight, None,
                  k=30).sum().backward()  # k = out: the dense route
    assert calls == [1]


def test_create_graph_takes_the_general_route(gen):
    """A backward that records its own graph (a gradient penalty, grad of grad) runs
    the general route's differentiable ops; the first gradients are the same bits."""
    w = torch.randn(10, 6, generator=gen, requires_grad=True)
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    y = meprop_linear(x, w, None, k=3, backend="torch")
    gx, gw = torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=True)
    assert gx.requires_grad and gw.requires_grad
    (gx.pow(2).sum() + gw.pow(2).sum()).backward()
    assert x.grad is not None and w.grad is not None
    g = 2 * torch.nn.functional.linear(x.detach(), w.detach())
    want = general(g, x.detach(), w.detach(), 3, (True, True, False))
    assert_bitwise((gx.detach(), gw.detach()), want[:2])


@pytest.mark.parametrize("kind", ["linear", "linear-per-example", "conv1d", "conv1d-per-example", "lstm"])
def test_backward_inside_autocast_uses_the_tensors_dtypes(gen, kind):
    """``backward()`` called inside an autocast region gives the gradients of a
    backward outside it (fp32 parameters, a forward outside autocast), for every layer
    with a meProp backward of its own."""
    from meprop_triton import MePropConv1D, MePropLSTM

    unified = not kind.endswith("per-example")
    if kind.startswith("linear"):
        layer = MePropLinear(12, 20, k=4, unified=unified)
    elif kind.startswith("conv1d"):
        layer = MePropConv1D(20, 12, k=4, unified=unified)
    else:
        layer = MePropLSTM(12, 20, k=4)
    x = torch.randn(6, 3, 12, generator=gen, requires_grad=True)
    out = layer(x)
    out = out[0] if kind == "lstm" else out
    seed = torch.randn(out.shape, generator=gen)
    params = [x, *layer.parameters()]
    out.backward(seed, retain_graph=True)
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(seed, retain_graph=True)
    assert all(p.grad.dtype == torch.float32 for p in params)
    assert_bitwise([p.grad for p in params], want)
    for p in params:
        p.grad = None
    torch.set_autocast_enabled("cuda", True)  # autocast on for another device type only
    try:
        out.backward(seed)
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert_bitwise([p.grad for p in params], want)
