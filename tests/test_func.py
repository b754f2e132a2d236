"""meProp under ``torch.func`` transforms: ``vmap`` over the backward (per-sample
gradients with ``vmap(grad(f))``, Opacus-style ``functional_call``, ensembles, ``jacrev``)
and ``grad`` of ``grad``.

Semantics: under ``vmap`` every vmapped entry is its own backward call. In
``vmap(grad(f))`` over a batch each sample is a batch of its own, so unified selection
keeps that sample's own top-k (per-example meProp when a sample is one row; over its T
rows when a sample is a (T, in) sequence); ``unified=False`` keeps each row's own top-k as
always. Random selection needs vmap's ``randomness`` to be "different" (each sample draws
its own units, in sample order, exactly as a loop over the samples drawing from the same
generator would) or "same" (one draw shared by all samples).

The expected values are computed one sample at a time with ``meprop_triton.reference``
(or eager autograd on a batch of one), in fp64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from meprop_triton import MePropLinear, meprop_linear, reference

IN, OUT = 7, 10
DT = torch.float64


def loss_of_y(y, t):
    """A smooth per-sample loss: its gradient G = dL/dy varies across rows and units."""
    return (torch.tanh(y) * t).sum() + 0.1 * y.pow(2).sum()


def make(gen, lead, bias):
    x = torch.randn(*lead, IN, generator=gen, dtype=DT)
    t = torch.randn(*lead, OUT, generator=gen, dtype=DT)
    w = torch.randn(OUT, IN, generator=gen, dtype=DT)
    b = torch.randn(OUT, generator=gen, dtype=DT) if bias else None
    return x, t, w, b


def reference_sample(x_b, t_b, w, b, k_units, unified, idx=None):
    """One sample as a batch of its own: G from autograd through F.linear, then the
    reference backward. ``idx``: given units (random selection), else top-k. Returns
    the gradients and the kept units (None: all)."""
    y = F.linear(x_b, w, b).detach().requires_grad_()
    (G,) = torch.autograd.grad(loss_of_y(y, t_b), y)
    G2, X2 = G.reshape(-1, OUT), x_b.reshape(-1, IN)
    if k_units >= OUT:
        gx, gw, gb = reference.dense_backward(G2, X2, w)
        idx = None
    else:
        if idx is None:
            idx = reference.unified_topk_indices(G2, k_units) if unified else reference.per_example_topk_indices(G2, k_units)
        run = reference.unified_backward if unified else reference.per_example_backward
        gx, gw, gb = run(G2, X2, w, idx)
    return gx.reshape(x_b.shape), gw, gb, idx


def per_sample(f, randomness="error"):
    """vmap(grad(f)) over the samples of x and t, the parameters shared."""
    return vmap(grad(f, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0), randomness=randomness)


def rows(g) -> list:
    return (g != 0).any(-1).nonzero().flatten().tolist()


@pytest.mark.parametrize("k", [3, 0.5, OUT], ids=["k3", "k0.5", "k=out"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(6,), (5, 4)], ids=["x2d", "x3d"])
def test_vmap_grad_per_sample_equals_each_sample_alone(k, unified, bias, lead):
    gen = torch.Generator().manual_seed(11)
    x, t, w, b = make(gen, lead, bias)
    k_units = {3: 3, 0.5: 5, OUT: OUT}[k]
    counts = torch.zeros(OUT + 1, dtype=torch.int64)  # selection statistics, as meSimp keeps

    def f(w_, b_, x_, t_):
        return loss_of_y(meprop_linear(x_, w_, b_, k=k, unified=unified, counts=counts), t_)

    if bias:
        gw, gb, gx = per_sample(f)(w, b, x, t)
    else:
        gw, gx = vmap(grad(lambda w_, x_, t_: f(w_, None, x_, t_), argnums=(0, 1)), in_dims=(None, 0, 0))(w, x, t)
    assert gw.shape == (lead[0], OUT, IN) and gx.shape == x.shape
    want_counts = torch.zeros(OUT + 1, dtype=torch.int64)
    for s in range(lead[0]):
        ex, ew, eb, idx = reference_sample(x[s], t[s], w, b, k_units, unified)
        rows_s = x[s].reshape(-1, IN).shape[0]
        want_counts[-1] += rows_s
        if idx is None:
            want_counts[:-1] += rows_s
        else:  # unified: every row of the sample keeps its set; per-example: its own
            want_counts[:-1] += torch.bincount(idx.flatten(), minlength=OUT) * (rows_s if unified else 1)
        torch.testing.assert_close(gw[s], ew, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gx[s], ex, rtol=1e-12, atol=1e-14)
        if bias:
            torch.testing.assert_close(gb[s], eb, rtol=1e-12, atol=1e-14)
        rows_per_sample = 1 if len(lead) == 1 else lead[1]
        if unified or rows_per_sample == 1:
            # The sample's own k units: exactly k weight rows (all of them for k = out).
            assert len(rows(gw[s])) == k_units
        else:
            assert k_units <= len(rows(gw[s])) <= min(OUT, k_units * rows_per_sample)
    assert torch.equal(counts, want_counts)
    if k_units < OUT and unified and len(lead) == 1:
        # Per sample, not one set for the batch: the samples' sets differ.
        assert len({tuple(rows(gw[s])) for s in range(lead[0])}) > 1


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("lead", [(6,), (5, 3)], ids=["x2d", "x3d"])
def test_vmap_random_different_draws_as_a_loop_over_samples_would(unified, lead):
    gen = torch.Generator().manual_seed(3)
    x, t, w, b = make(gen, lead, True)
    k = 3

    def f(w_, b_, x_, t_, g):
        return loss_of_y(meprop_linear(x_, w_, b_, k=k, unified=unified, selection="random", generator=g), t_)

    g_vmap = torch.Generator().manual_seed(99)
    gw, gb, gx = vmap(grad(f, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0, None), randomness="different")(
        w, b, x, t, g_vmap
    )
    g_loop = torch.Generator().manual_seed(99)
    sets = []
    for s in range(lead[0]):
        rows_ = x[s].reshape(-1, IN).shape[0]
        if unified:
            idx = reference.random_indices(OUT, k, generator=g_loop)
        else:
            idx = reference.per_example_random_indices(rows_, OUT, k, generator=g_loop)
        ex, ew, eb, _ = reference_sample(x[s], t[s], w, b, k, unified, idx=idx)
        torch.testing.assert_close(gw[s], ew, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gx[s], ex, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gb[s], eb, rtol=1e-12, atol=1e-14)
        sets.append(tuple(rows(gw[s])))
    assert len(set(sets)) > 1, "every sample drew the same units"
    # The same generator state afterwards: the vmapped call drew exactly what the loop drew.
    assert torch.equal(g_vmap.get_state(), g_loop.get_state())


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_vmap_random_same_shares_one_draw(unified):
    gen = torch.Generator().manual_seed(4)
    x, t, w, b = make(gen, (5,), True)
    k = 3

    def f(w_, b_, x_, t_):
        return loss_of_y(meprop_linear(x_, w_, b_, k=k, unified=unified, selection="random"), t_)

    torch.manual_seed(123)
    gw, gb, gx = per_sample(f, randomness="same")(w, b, x, t)
    torch.manual_seed(123)
    idx = reference.random_indices(OUT, k) if unified else reference.per_example_random_indices(1, OUT, k)
    for s in range(5):
        ex, ew, eb, _ = reference_sample(x[s], t[s], w, b, k, unified, idx=idx)
        torch.testing.assert_close(gw[s], ew, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gx[s], ex, rtol=1e-12, atol=1e-14)
        assert rows(gw[s]) == sorted(idx.flatten().tolist())


def test_vmap_random_under_default_randomness_is_refused_clearly():
    gen = torch.Generator().manual_seed(5)
    x, t, w, b = make(gen, (4,), True)

    def f(w_, b_, x_, t_):
        return loss_of_y(meprop_linear(x_, w_, b_, k=3, selection="random"), t_)

    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness='different'.*randomness='same'"):
        per_sample(f)(w, b, x, t)
    assert torch.equal(torch.get_rng_state(), state), "the refused call drew random numbers"


def test_vmap_sparse_grad_is_refused_clearly():
    gen = torch.Generator().manual_seed(6)
    x, t, w, b = make(gen, (4,), True)

    def f(w_, b_, x_, t_):
        return loss_of_y(meprop_linear(x_, w_, b_, k=3, sparse_grad=True), t_)

    with pytest.raises(NotImplementedError, match="sparse_grad=True cannot run under torch.func.vmap.*use sparse_grad=False"):
        per_sample(f)(w, b, x, t)


class Net(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.fc1 = MePropLinear(IN, 16, k=4, **options)
        self.fc2 = MePropLinear(16, 12, k=0.25, **options)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("detach", [True, False], ids=["detached-params", "params-requiring-grad"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_functional_call_per_sample_grads_equal_a_loop_of_batches_of_one(unified, detach):
    """Opacus-style: vmap(grad(loss via functional_call)) over a model, against eager
    backward passes one sample at a time; the selection counters (track_selection)
    count the same as the loop."""
    torch.manual_seed(0)
    model = Net(unified=unified, track_selection=True).double()
    loop_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, IN, generator=gen, dtype=DT)
    target = torch.randint(0, 3, (6,), generator=gen)
    params = {n: p.detach() if detach else p for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(params, buffers, x_s, t_s):
        logits = functional_call(model, (params, buffers), (x_s.unsqueeze(0),))
        return F.cross_entropy(logits, t_s.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))(params, buffers, x, target)
    for s in range(6):
        loop_model.zero_grad(set_to_none=True)
        F.cross_entropy(loop_model(x[s : s + 1]), target[s : s + 1]).backward()
        for n, p in loop_model.named_parameters():
            torch.testing.assert_close(grads[n][s], p.grad, rtol=1e-12, atol=1e-14, msg=n)
        assert len(rows(grads["fc1.weight"][s])) == 4
        assert len(rows(grads["fc2.weight"][s])) == 3
    for name in ("fc1", "fc2"):
        got = getattr(model, name).selection_stats()
        want = getattr(loop_model, name).selection_stats()
        assert got.rows == want.rows == 6
        assert torch.equal(got.hits, want.hits)


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_vmapped_forward_then_ordinary_backward_is_a_loop_over_entries(unified):
    """vmap over the forward only, then .backward() outside torch.func: each entry is
    its own call, so the gradients are the sums of the entries' own meProp gradients."""
    gen = torch.Generator().manual_seed(13)
    x, t, w, b = make(gen, (5, 3), True)
    w_, b_, x_ = (v.clone().requires_grad_() for v in (w, b, x))
    y = vmap(lambda xs: meprop_linear(xs, w_, b_, k=3, unified=unified))(x_)
    loss_of_y(y, t).backward()
    want_w, want_b = torch.zeros_like(w), torch.zeros_like(b)
    for s in range(5):
        ex, ew, eb, _ = reference_sample(x[s], t[s], w, b, 3, unified)
        torch.testing.assert_close(x_.grad[s], ex, rtol=1e-12, atol=1e-14)
        want_w += ew
        want_b += eb
    torch.testing.assert_close(w_.grad, want_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b_.grad, want_b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("which", ["vmapped-weights", "frozen-linear", "frozen-conv1d"])
def test_vmapped_forward_where_only_the_vmapped_tensor_requires_grad(which):
    """Under vmap a batched tensor reports requires_grad=False whatever it wraps. When
    the vmapped tensor is the only one that requires grad (an ensemble's stacked
    weights; a frozen layer over inputs that require grad), the forward must still be
    meProp's: each entry's gradient is that of an eager call of its own, not dense."""
    from meprop_triton import MePropConv1D

    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, IN, generator=gen, dtype=DT)
    if which == "vmapped-weights":
        ws = torch.randn(3, OUT, IN, generator=gen, dtype=DT)
        G = torch.randn(3, 6, OUT, generator=gen, dtype=DT)
        leaf = ws.clone().requires_grad_()
        vmap(lambda w_: meprop_linear(x, w_, None, k=2))(leaf).backward(G)
        for e in range(3):
            want = reference.unified_backward(G[e], x, ws[e], reference.unified_topk_indices(G[e], 2))[1]
            torch.testing.assert_close(leaf.grad[e], want, rtol=1e-12, atol=1e-14)
            assert len(rows(leaf.grad[e])) == 2
        return
    xs = torch.randn(4, 6, IN, generator=gen, dtype=DT)
    G = torch.randn(4, 6, OUT, generator=gen, dtype=DT)
    if which == "frozen-linear":
        layer = MePropLinear(IN, OUT, k=2, dtype=DT).requires_grad_(False)
        w = layer.weight
    else:
        layer = MePropConv1D(OUT, IN, k=2, dtype=DT).requires_grad_(False)
        w = layer.weight.t()
    leaf = xs.clone().requires_grad_()
    vmap(layer)(leaf).backward(G)
    for e in range(4):
        want = reference.unified_backward(G[e], xs[e], w, reference.unified_topk_indices(G[e], 2))[0]
        torch.testing.assert_close(leaf.grad[e], want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(leaf.grad, G @ w)  # not the dense gradient


def test_vmap_over_an_ensemble_of_weights_each_entry_its_own_call():
    """vmap over stacked weights with one shared minibatch: each entry's gradient is that
    of an eager call with its own weights (unified over the minibatch's rows)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, IN, generator=gen, dtype=DT)
    t = torch.randn(5, OUT, generator=gen, dtype=DT)
    ws = torch.randn(3, OUT, IN, generator=gen, dtype=DT)
    bs = torch.randn(3, OUT, generator=gen, dtype=DT)

    def f(w_, b_, x_):
        return loss_of_y(meprop_linear(x_, w_, b_, k=4), t)

    gw, gb, gx = vmap(grad(f, argnums=(0, 1, 2)), in_dims=(0, 0, None))(ws, bs, x)
    for e in range(3):
        w = ws[e].clone().requires_grad_()
        b = bs[e].clone().requires_grad_()
        xe = x.clone().requires_grad_()
        f(w, b, xe).backward()
        torch.testing.assert_close(gw[e], w.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gb[e], b.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gx[e], xe.grad, rtol=1e-12, atol=1e-14)
        assert len(rows(gw[e])) == 4


def test_jacrev_is_the_exact_jacobian():
    """jacrev vmaps the backward over one-hot cotangents: a one-hot gradient's own top-k
    holds its unit, so every row of the Jacobian is exact."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, IN, generator=gen, dtype=DT)
    w = torch.randn(OUT, IN, generator=gen, dtype=DT)
    got = jacrev(lambda w_: meprop_linear(x, w_, None, k=2))(w)
    want = jacrev(lambda w_: F.linear(x, w_))(w)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_grad_of_grad_equals_eager_double_backward(unified, sparse_grad):
    """torch.func's grad of grad: the derivative of the meProp gradients with the kept
    units held fixed, as eager autograd gives through the backward's operations."""
    gen = torch.Generator().manual_seed(12)
    x, t, w, b = make(gen, (6,), True)
    cw = torch.randn(OUT, IN, generator=gen, dtype=DT)
    cb = torch.randn(OUT, generator=gen, dtype=DT)
    cx = torch.randn(6, IN, generator=gen, dtype=DT)

    def f(w_, b_, x_):
        return (meprop_linear(x_, w_, b_, k=3, unified=unified, sparse_grad=sparse_grad).pow(3) * t).sum()

    def dense(g):
        return g.to_dense() if g.is_sparse else g

    def h(w_, b_, x_):
        gw, gb, gx = grad(f, argnums=(0, 1, 2))(w_, b_, x_)
        return (dense(gw) * cw).sum() + (dense(gb) * cb).sum() + (gx * cx).sum()

    got = grad(h, argnums=(0, 1, 2))(w, b, x)

    w2, b2, x2 = (v.clone().requires_grad_() for v in (w, b, x))
    gw, gb, gx = torch.autograd.grad(f(w2, b2, x2), (w2, b2, x2), create_graph=True)
    ((dense(gw) * cw).sum() + (dense(gb) * cb).sum() + (gx * cx).sum()).backward()
    for name, g, e in zip("wbx", got, (w2.grad, b2.grad, x2.grad)):
        assert g is not None and g.layout == e.layout, name  # sparse_grad: the bias's is sparse in both
        g, e = dense(g), dense(e)
        assert torch.any(g != 0), name
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["rows", "3d"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_forward_over_reverse_equals_reverse_over_reverse(unified, lead):
    """jacfwd(grad(f)), hessian (jacfwd over jacrev) and jacrev(grad(f)) all differentiate
    the meProp gradients with the kept units held fixed: the same second derivatives,
    w.r.t. the input, the weight and the bias, and not the dense layer's."""
    gen = torch.Generator().manual_seed(5)
    x, t, w, b = make(gen, lead, True)

    def f(w_, b_, x_, layer_k=3):
        return (meprop_linear(x_, w_, b_, k=layer_k, unified=unified).pow(3) * t).sum()

    for argnum in (0, 1, 2):
        fwd = torch.func.jacfwd(grad(f, argnums=argnum), argnums=argnum)(w, b, x)
        rev = jacrev(grad(f, argnums=argnum), argnums=argnum)(w, b, x)
        torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12, msg=f"argnum {argnum}")
        assert torch.any(fwd != 0)
        if argnum == 2:
            torch.testing.assert_close(torch.func.hessian(f, argnums=2)(w, b, x), rev, rtol=1e-12, atol=1e-12)
            dense = jacrev(grad(lambda w_, b_, x_: f(w_, b_, x_, layer_k=OUT), argnums=2), argnums=2)(w, b, x)
            assert not torch.allclose(dense, rev)  # k < out: not the dense layer's Hessian
    # cross terms: the weight gradient's derivative along the input, and the input's
    # along the weight
    for of, along in ((0, 2), (2, 0)):
        fwd = torch.func.jacfwd(grad(f, argnums=of), argnums=along)(w, b, x)
        rev = jacrev(grad(f, argnums=of), argnums=along)(w, b, x)
        torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12, msg=f"{of} along {along}")


def test_forward_over_reverse_of_sparse_gradients_is_refused_clearly():
    gen = torch.Generator().manual_seed(6)
    x, t, w, b = make(gen, (4,), True)

    def f(w_, x_):
        return (meprop_linear(x_, w_, b, k=3, sparse_grad=True) * t).sum()

    with pytest.raises(NotImplementedError, match="sparse_grad=False, or reverse mode"):
        torch.func.jacfwd(grad(f, argnums=1), argnums=1)(w, x)


TRITON_SCRIPT = r"""
import os, sys
import torch
cuda = torch.cuda.is_available()
if not cuda:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
os.environ["MEPROP_TRITON_TEST_CONFIG"] = "1"
import numpy as np
import triton
from torch.func import grad, vmap
from meprop_triton import meprop_linear

if not cuda and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7) and int(np.__version__.split(".")[0]) * 100 + int(np.__version__.split(".")[1]) >= 204:
    print("SKIP triton < 3.7's interpreter cannot run these kernels under numpy >= 2.4")
    sys.exit(0)
dev = "cuda" if cuda else "cpu"
gen = torch.Generator().manual_seed(0)
W = torch.randn(20, 16, generator=gen).to(dev)
X = torch.randn(4, 3, 16, generator=gen).to(dev)
T = torch.randn(4, 3, 20, generator=gen).to(dev)
for unified in (True, False):
    def f(w, x, t, backend):
        return (torch.tanh(meprop_linear(x, w, None, k=5, unified=unified, backend=backend)) * t).sum()
    for name, run in (("grad", grad(f)), ("vmap(grad)", vmap(grad(f), in_dims=(None, 0, 0, None)))):
        got, want = run(W, X, T, "triton"), run(W, X, T, "torch")
        rows = lambda g: (g != 0).any(-1)
        assert torch.equal(rows(got), rows(want)), f"{name} unified={unified}: other units kept"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} unified={unified}")
print("OK")
"""


def test_triton_backend_under_grad_and_vmap_matches_the_torch_path():
    """backend="triton" under torch.func: grad runs the kernels (on plain tensors, in
    _MePropGrad's forward), vmap(grad) the torch path; both give the torch path's
    gradients. In a subprocess: TRITON_INTERPRET must be set before triton is imported."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    if last.startswith("SKIP"):
        pytest.skip(last[5:])
    assert last == "OK", proc.stdout[-2000:]


def _jvp_cases():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.randn(7, 5, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    return (x, w, b), tangents


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 1, 2)], ids=["x", "weight", "bias", "all"])
def test_jvp_is_the_derivative_of_the_unchanged_forward(which):
    """meProp changes only the backward: forward-mode AD (torch.func.jvp, jacfwd, eager
    dual tensors) gives F.linear's derivative, on layers whose parameters train."""
    import torch.autograd.forward_ad as fwAD
    from meprop_triton import MePropConv1D

    primals, tangents = _jvp_cases()
    layer = MePropLinear(5, 7, k=2, dtype=torch.float64)
    conv = MePropConv1D(7, 5, k=2, dtype=torch.float64)

    def mine(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    def mine_conv(x, w, b):
        return torch.func.functional_call(conv, {"weight": w.t(), "bias": b}, (x,))

    def dense(x, w, b):
        return F.linear(x, w, b)

    def only(f):  # the tangent of the chosen inputs, the others held fixed
        def g(*moving):
            args = list(primals)
            for i, t in zip(which, moving):
                args[i] = t
            return f(*args)
        return g, tuple(primals[i] for i in which), tuple(tangents[i] for i in which)

    _, want = torch.func.jvp(*only(dense))
    for f in (mine, mine_conv):
        _, got = torch.func.jvp(*only(f))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # eager dual tensors, through the layers' own parameters (which require grad, so the
    # meProp Function runs)
    x, x_t = primals[0], tangents[0]
    with fwAD.dual_level():
        for f, w in ((layer, layer.weight), (conv, conv.weight.t())):
            out = f(fwAD.make_dual(x, x_t))
            assert out.requires_grad
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, F.linear(x_t, w), rtol=1e-12, atol=1e-12)


def test_jacfwd_equals_jacrev_for_one_sample():
    """For one row, unified top-k with k < out keeps only k units in backward, so jacrev
    (one backward per one-hot cotangent, each keeping its own unit) is the exact Jacobian,
    and jacfwd must agree with it."""
    torch.manual_seed(0)
    layer = MePropLinear(5, 7, k=2, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    fwd = torch.func.jacfwd(layer)(x)
    rev = torch.func.jacrev(layer)(x)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwd, layer.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("sample", [(3, 5), (5,)], ids=["rows", "vector"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_vmap_over_no_entries(kind, sample):
    """A vmapped dimension of size 0 (an empty batch of samples) gives empty outputs and
    per-sample gradients, as over nn.Linear; it failed inside the layers (torch.stack of
    no entries; reshape(-1, ...) of an empty tensor)."""
    from meprop_triton import MePropConv1D

    torch.manual_seed(0)
    layer = MePropLinear(5, 7, k=2) if kind == "linear" else MePropConv1D(7, 5, k=2)
    xs = torch.randn(0, *sample)
    assert vmap(layer)(xs).shape == (0, *sample[:-1], 7)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    per_sample = vmap(grad(lambda p, x: functional_call(layer, p, (x,)).sum()), in_dims=(None, 0))(params, xs)
    assert {n: g.shape for n, g in per_sample.items()} == {n: (0, *p.shape) for n, p in params.items()}
