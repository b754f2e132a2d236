"""``meprop_linear`` (backend="torch") against an independent statement of unified top-k meProp.

The expected values come from the ``oracle`` fixture (fp64 numpy, dense mask, stable
argsort); nothing here calls ``meprop_triton.reference`` to compute what is expected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from meprop_triton import meprop_linear, reference

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]
LEADS = [
    pytest.param((), id="1d"),
    pytest.param((1,), id="M1"),
    pytest.param((13,), id="M13"),
    pytest.param((3, 5), id="B3T5"),
]
SIZES = [  # (in_features, out_features)
    pytest.param((1, 1), id="in1-out1"),
    pytest.param((7, 37), id="in7-out37"),
    pytest.param((37, 7), id="in37-out7"),
    pytest.param((123, 64), id="in123-out64"),
    pytest.param((16, 123), id="in16-out123"),
]
K_SPECS = ["1", "0.1", "0.25", "1.0", "out-1", "out", "out+5"]


def k_value(spec: str, out_features: int):
    """A k for a spec: a literal int or float, or one relative to out_features."""
    if spec == "out-1":
        return max(1, out_features - 1)
    if spec == "out":
        return out_features
    if spec == "out+5":
        return out_features + 5
    return float(spec) if "." in spec else int(spec)


def make_params(in_f, out_f, dtype, bias, gen, *, requires_grad=(True, True)):
    w = torch.randn(out_f, in_f, dtype=dtype, generator=gen).requires_grad_(requires_grad[0])
    b = None
    if bias:
        b = torch.randn(out_f, dtype=dtype, generator=gen).requires_grad_(requires_grad[1])
    return w, b


def make_input(lead, in_f, dtype, gen, layout="contiguous"):
    """A leaf input of shape ``(*lead, in_f)`` laid out as asked."""
    if layout == "contiguous":
        base = torch.randn(*lead, in_f, dtype=dtype, generator=gen)
    elif layout == "transposed":  # the feature dim is the slowest one in memory
        base = torch.randn(in_f, *lead, 2, dtype=dtype, generator=gen)[..., 0]
        base = base.permute(*range(1, len(lead) + 1), 0)
    elif layout == "sliced":  # every other feature, starting at an offset
        base = torch.randn(*lead, 2 * in_f + 1, dtype=dtype, generator=gen)[..., 1::2]
    else:
        raise AssertionError(layout)
    assert base.shape == (*lead, in_f)
    if layout != "contiguous" and in_f > 1:
        assert not base.is_contiguous()
    return base.detach().requires_grad_()


def check_against_oracle(oracle, x, w, b, G, k):
    """Run meprop_linear forward + backward with ``G`` and compare with the oracle."""
    out_f = w.shape[0]
    y = meprop_linear(x, w, b, k=k, backend="torch")
    assert y.shape == (*x.shape[:-1], out_f)
    assert torch.equal(y, F.linear(x, w, b)), "the forward pass must be plain F.linear"
    y.backward(G)
    ku = oracle.k_units(k, out_f)
    ref = oracle.grads(x, w, G, ku)
    M = math.prod(x.shape[:-1])
    if x.requires_grad:
        oracle.assert_within_bound(x.grad, ref["grad_x"], ref["bound_x"], ku, what="grad_input")
    if w.requires_grad:
        oracle.assert_within_bound(w.grad, ref["grad_w"], ref["bound_w"], M, what="grad_weight")
        np.testing.assert_array_equal(oracle.selected_rows(w.grad), ref["selected"])
    if M > 0 and ku < out_f:  # the selection the torch path made, exactly
        idx = reference.unified_topk_indices(G.reshape(-1, out_f), ku)
        np.testing.assert_array_equal(idx.numpy(), ref["selected"])
    if b is not None and b.requires_grad:
        oracle.assert_within_bound(b.grad, ref["grad_b"], ref["bound_b"], M, what="grad_bias")
    return ref


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kspec", K_SPECS, ids=[f"k={s}" for s in K_SPECS])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lead", LEADS)
def test_gradients_match_definition(lead, size, kspec, dtype, bias, oracle, gen):
    in_f, out_f = size
    k = k_value(kspec, out_f)
    x = make_input(lead, in_f, dtype, gen)
    w, b = make_params(in_f, out_f, dtype, bias, gen)
    G = oracle.grad_output(lead, out_f, dtype=dtype, generator=gen)
    ref = check_against_oracle(oracle, x, w, b, G, k)
    assert len(ref["selected"]) == oracle.k_units(k, out_f)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0.25, 3], ids=["k=0.25", "k=3"])
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("lead", LEADS)
def test_noncontiguous_input(lead, layout, k, dtype, oracle, gen):
    in_f, out_f = 37, 23
    x = make_input(lead, in_f, dtype, gen, layout)
    w, b = make_params(in_f, out_f, dtype, True, gen)
    G = oracle.grad_output(lead, out_f, dtype=dtype, generator=gen)
    check_against_oracle(oracle, x, w, b, G, k)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_grad_output(dtype, oracle, gen):
    """A grad_output that is itself a strided view (as autograd can pass on)."""
    x = make_input((4, 6), 19, dtype, gen)
    w, b = make_params(19, 29, dtype, True, gen)
    G = oracle.grad_output((6, 4), 29, dtype=dtype, generator=gen).transpose(0, 1)
    assert not G.is_contiguous()
    check_against_oracle(oracle, x, w, b, G, 5)


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kspec", ["out", "out+5", "1.0", "10**9"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lead", LEADS)
def test_k_at_least_out_gives_dense_gradient(lead, size, kspec, dtype, bias, oracle, gen):
    in_f, out_f = size
    k = 10**9 if kspec == "10**9" else k_value(kspec, out_f)
    x = make_input(lead, in_f, dtype, gen)
    w, b = make_params(in_f, out_f, dtype, bias, gen)
    G = oracle.grad_output(lead, out_f, dtype=dtype, generator=gen)
    ref = check_against_oracle(oracle, x, w, b, G, k)
    assert ref["mask"].all()

    # ... and the same as ordinary autograd through F.linear (both within rounding).
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    b2 = None if b is None else b.detach().clone().requires_grad_()
    F.linear(x2, w2, b2).backward(G)
    M = math.prod(lead)
    oracle.assert_within_bound(x.grad, x2.grad.double().numpy(), ref["bound_x"], out_f, c=4, what="grad_input")
    oracle.assert_within_bound(w.grad, w2.grad.double().numpy(), ref["bound_w"], M, c=4, what="grad_weight")
    if bias:
        oracle.assert_within_bound(b.grad, b2.grad.double().numpy(), ref["bound_b"], M, c=4, what="grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_is_dense_and_exact(dtype, gen, oracle):
    """grad_b sums every unit's gradient, selected or not, in the gradient's dtype."""
    x = make_input((6, 5), 11, dtype, gen)
    w, b = make_params(11, 40, dtype, True, gen)
    # Small integers: every sum is exact in fp32 and fp64, so "exact" means equal.
    G = torch.randint(-8, 9, (6, 5, 40), generator=gen).to(dtype)
    y = meprop_linear(x, w, b, k=2, backend="torch")
    y.backward(G)
    assert torch.equal(b.grad, G.sum(dim=(0, 1)))
    assert (b.grad != 0).sum() > 2, "the bias gradient must not be sparsified"
    assert len(oracle.selected_rows(w.grad)) == 2


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ties_go_to_lower_index(k, oracle, gen):
    """Exactly equal scores: the lower index wins, including across the k boundary."""
    out_f, in_f = 8, 5
    # Column scores 2, 5, 5, 1, 5, 5, 0.5, 3 (exact in fp32): top by (-score, index).
    colvals = torch.tensor([2.0, 5.0, 5.0, 1.0, 5.0, 5.0, 0.5, 3.0])
    G = torch.zeros(4, out_f)
    G[:] = colvals / 4
    G[1] = -G[1]  # signs do not matter
    G[:, 4] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # same score, different spread
    expected = {1: [1], 2: [1, 2], 3: [1, 2, 4], 4: [1, 2, 4, 5]}[k]
    x = make_input((4,), in_f, torch.float32, gen)
    w, b = make_params(in_f, out_f, torch.float32, True, gen)
    ref = check_against_oracle(oracle, x, w, b, G, k)
    np.testing.assert_array_equal(ref["selected"], expected)  # the oracle agrees
    np.testing.assert_array_equal(oracle.selected_rows(w.grad), expected)


def test_all_scores_equal_selects_first_k(gen):
    x = make_input((3,), 4, torch.float32, gen)
    w, b = make_params(4, 10, torch.float32, False, gen)
    y = meprop_linear(x, w, b, k=4, backend="torch")
    G = torch.ones(3, 10)
    G[1] *= -1
    y.backward(G)
    rows = (w.grad != 0).any(1)
    assert rows.tolist() == [True] * 4 + [False] * 6


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_grad_output_reaches_gradients(bad, dtype, gen):
    """A non-finite entry makes its unit's score +inf, so the unit is always selected and
    the NaN/inf shows in grad_input and grad_weight (GradScaler must see overflow)."""
    M, in_f, out_f, j, m = 6, 9, 12, 7, 2
    x = make_input((M,), in_f, dtype, gen)
    w, b = make_params(in_f, out_f, dtype, True, gen)
    G = torch.randn(M, out_f, dtype=dtype, generator=gen)
    G[:, j] *= 1e-3  # unit j would never be chosen on its finite values
    G[m, j] = bad
    y = meprop_linear(x, w, b, k=1, backend="torch")
    y.backward(G)
    rows = (w.grad != 0).any(1)
    assert rows.nonzero().flatten().tolist() == [j]
    assert not torch.isfinite(w.grad[j]).any()
    assert not torch.isfinite(x.grad[m]).any()
    others = torch.ones(M, dtype=torch.bool)
    others[m] = False
    assert torch.isfinite(x.grad[others]).all()
    assert not torch.isfinite(b.grad[j])
    assert torch.isfinite(b.grad[torch.arange(out_f) != j]).all()


def test_two_nonfinite_units_tie_to_lower_index(gen):
    x = make_input((3,), 4, torch.float32, gen)
    w, _ = make_params(4, 9, torch.float32, False, gen)
    G = torch.randn(3, 9, generator=gen)
    G[0, 6] = math.nan
    G[2, 3] = math.inf
    meprop_linear(x, w, k=1, backend="torch").backward(G)
    assert (w.grad != 0).any(1).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("k", [2, 100], ids=["k<out", "k>=out"])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["M0", "B2T0", "B0T3"])
def test_empty_batch(lead, k, gen):
    x = torch.randn(*lead, 6, generator=gen).requires_grad_()
    w, b = make_params(6, 5, torch.float32, True, gen)
    y = meprop_linear(x, w, b, k=k, backend="torch")
    assert y.shape == (*lead, 5) and y.numel() == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert w.grad.shape == w.shape and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, False), (False, False, True), (True, True, False),
     (False, True, True), (True, False, True)],
    ids=lambda t: "grad:" + ",".join(n for n, f in zip("xwb", t) if f),
)
def test_partial_requires_grad(needs, oracle, gen):
    """Frozen weight, input without grad, frozen bias: each combination works and
    computes exactly the gradients asked for."""
    need_x, need_w, need_b = needs
    x = make_input((4, 3), 10, torch.float32, gen).requires_grad_(need_x)
    w, b = make_params(10, 14, torch.float32, True, gen, requires_grad=(need_w, need_b))
    G = oracle.grad_output((4, 3), 14, dtype=torch.float32, generator=gen)
    check_against_oracle(oracle, x, w, b, G, 0.25)
    assert (x.grad is not None) == need_x
    assert (w.grad is not None) == need_w
    assert (b.grad is not None) == need_b


def test_nothing_requires_grad_is_plain_linear(gen):
    x = make_input((5,), 8, torch.float32, gen).requires_grad_(False)
    w, b = make_params(8, 3, torch.float32, True, gen, requires_grad=(False, False))
    y = meprop_linear(x, w, b, k=1, backend="torch")
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, F.linear(x, w, b))


def test_no_grad_mode_is_plain_linear(gen):
    x = make_input((5,), 8, torch.float32, gen)
    w, b = make_params(8, 3, torch.float32, True, gen)
    with torch.no_grad():
        y = meprop_linear(x, w, b, k=1, backend="torch")
    assert y.grad_fn is None
    assert torch.equal(y, F.linear(x, w, b).detach())


def test_gradient_of_non_leaf_input_flows_further(oracle, gen):
    """meProp sits in the middle of a graph: its grad_input reaches an earlier leaf."""
    a = make_input((7,), 12, torch.float64, gen)
    scale = 1.5
    x = a * scale
    w, b = make_params(12, 20, torch.float64, True, gen)
    G = oracle.grad_output((7,), 20, dtype=torch.float64, generator=gen)
    meprop_linear(x, w, b, k=4, backend="torch").backward(G)
    ref = oracle.grads(x, w, G, 4)
    oracle.assert_within_bound(a.grad, scale * ref["grad_x"], scale * ref["bound_x"], 4, what="grad_a")


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, gen):
    x = make_input((9, 4), 33, dtype, gen)
    w, b = make_params(33, 47, dtype, True, gen)
    G = torch.randn(9, 4, 47, dtype=dtype, generator=gen)
    grads = []
    for _ in range(2):
        for t in (x, w, b):
            t.grad = None
        meprop_linear(x, w, b, k=0.2, backend="torch").backward(G)
        grads.append([t.grad.clone() for t in (x, w, b)])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_auto_backend_on_cpu_matches_torch_backend(gen):
    x = make_input((6,), 16, torch.float32, gen)
    w, b = make_params(16, 24, torch.float32, True, gen)
    G = torch.randn(6, 24, generator=gen)
    results = []
    for backend in ("auto", "torch"):
        for t in (x, w, b):
            t.grad = None
        meprop_linear(x, w, b, k=5, backend=backend).backward(G)
        results.append([t.grad.clone() for t in (x, w, b)])
    for g1, g2 in zip(*results):
        assert torch.equal(g1, g2)


def test_gradients_accumulate_into_existing_grad(oracle, gen):
    x = make_input((5,), 8, torch.float64, gen)
    w, b = make_params(8, 12, torch.float64, True, gen)
    w.grad = torch.randn(12, 8, dtype=torch.float64, generator=gen)
    before = w.grad.clone()
    G = oracle.grad_output((5,), 12, dtype=torch.float64, generator=gen)
    meprop_linear(x, w, b, k=3, backend="torch").backward(G)
    ref = oracle.grads(x, w, G, 3)
    delta = w.grad - before
    oracle.assert_within_bound(delta, ref["grad_w"], ref["bound_w"] + np.abs(before.numpy()), 5, what="accumulated")


FRACTIONS = [0.05, 0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0]


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    k=st.one_of(st.integers(1, 30), st.sampled_from(FRACTIONS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(lead, in_f, out_f, k, dtype, bias, seed, oracle):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(lead, in_f, dtype, gen)
    w, b = make_params(in_f, out_f, dtype, bias, gen)
    G = oracle.grad_output(lead, out_f, dtype=dtype, generator=gen)
    ref = check_against_oracle(oracle, x, w, b, G, k)
    assert len(oracle.selected_rows(w.grad)) == oracle.k_units(k, out_f)
    assert len(ref["selected"]) == oracle.k_units(k, out_f)


def test_functorch_grad_matches_autograd():
    """Under a functorch transform ``MePropFunction.apply`` takes torch's ordinary route
    (it skips the signature binding only outside transforms); both give one gradient."""
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(9, 6, generator=gen)
    x = torch.randn(4, 6, generator=gen)
    G = torch.randn(4, 9, generator=gen)

    def loss(w):
        return (meprop_linear(x, w, None, k=3, backend="torch") * G).sum()

    got = torch.func.grad(loss)(W)
    w = W.clone().requires_grad_()
    loss(w).backward()
    assert torch.equal(got, w.grad)
    assert int((got != 0).any(1).sum()) == 3


def test_apply_takes_leftovers_of_a_functorch_transform():
    """The fast ``apply`` keeps what torch's own does outside transforms: a tensor that
    leaked out of a finished ``torch.func`` transform is unwrapped. ``MePropFunction``
    (the form for transforms) also works eagerly. Its ``apply`` is torch's own, which
    takes keyword arguments on torch 2.13 and later but not on 2.11 (``apply() takes no
    keyword arguments``), so none are passed here."""
    from meprop_triton.functional import MePropFunction

    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    leak = []

    def f(w_):
        y = meprop_linear(x, w_, None, k=3, backend="torch")
        leak.append(y)
        return y.sum()

    torch.func.grad(f)(w)
    w2 = torch.randn(6, 5, generator=gen, requires_grad=True)
    meprop_linear(leak[0], w2, None, k=2, backend="torch").sum().backward()
    assert int((w2.grad != 0).any(1).sum()) == 2

    w3 = w.clone().requires_grad_()
    y = MePropFunction.apply(x, w3, None, 2, "torch", True, "topk", False, None)
    y.sum().backward()
    assert int((w3.grad != 0).any(1).sum()) == 2
