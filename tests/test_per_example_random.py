"""Per-example meProp (``unified=False``) and random-k selection on the torch path.

Per-example gradients are compared with an independent fp64 numpy statement of the
definition (a per-row stable argsort and a dense mask); random-k is checked for
uniformity (chi-square), independence from the gradient's magnitudes and seeding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear, convert, meprop_linear, reference



def expected_k_units(k, out_f):
    return out_f if k == "out" else max(1, min(out_f, math.ceil(k * out_f) if isinstance(k, float) else k))


def per_example_oracle(x, w, G, k_units):
    W = w.detach().double().numpy()
    out_f, in_f = W.shape
    X = x.detach().double().reshape(-1, in_f).numpy()
    Gn = G.detach().double().reshape(-1, out_f).numpy()
    a = np.abs(Gn)
    a[~np.isfinite(a)] = np.inf
    order = np.argsort(-a, axis=1, kind="stable")[:, :k_units]
    mask = np.zeros_like(Gn, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    Gm = np.where(mask, Gn, 0.0)
    return {
        "mask": mask,
        "grad_x": (Gm @ W).reshape(tuple(x.shape)),
        "grad_w": Gm.T @ X,
        "grad_b": Gn.sum(0),
        "bound_x": (np.abs(Gm) @ np.abs(W)).reshape(tuple(x.shape)),
        "bound_w": np.abs(Gm).T @ np.abs(X),
    }


def assert_within(got, exact, bound, length, dtype):
    eps = torch.finfo(dtype).eps
    err = np.abs(got.detach().double().numpy() - exact)
    assert np.all(err <= 4 * max(length, 1) * eps * bound + 1e-300), float(err.max())


@pytest.mark.parametrize("lead", [(), (9,), (3, 4)], ids=["1d", "M9", "B3T4"])
@pytest.mark.parametrize("size", [(7, 37), (30, 12), (5, 1)], ids=["in7-out37", "in30-out12", "in5-out1"])
@pytest.mark.parametrize("k", [1, 0.25, "out-1", "out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_per_example_matches_definition(lead, size, k, dtype, bias):
    in_f, out_f = size
    k = max(1, out_f - 1) if k == "out-1" else out_f if k == "out" else k
    gen = torch.Generator().manual_seed(hash((lead, size, str(k))) % 2**31)
    x = torch.randn(*lead, in_f, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(out_f, in_f, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(out_f, dtype=dtype, generator=gen, requires_grad=True) if bias else None
    G = torch.randn(*lead, out_f, dtype=dtype, generator=gen)
    y = meprop_linear(x, w, b, k=k, unified=False, backend="torch")
    y.backward(G)
    o = per_example_oracle(x, w, G, expected_k_units(k, out_f))
    assert_within(x.grad, o["grad_x"], o["bound_x"], out_f, dtype)
    assert_within(w.grad, o["grad_w"], o["bound_w"], max(1, math.prod(lead)), dtype)
    # Rows of grad_W that no example selected are exactly zero.
    never = ~o["mask"].any(0)
    assert torch.all(w.grad[torch.from_numpy(never)] == 0)
    if bias:
        np.testing.assert_allclose(b.grad.double().numpy(), o["grad_b"], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_per_example_selection_ties_and_nonfinite():
    nan, inf = float("nan"), float("inf")
    g = torch.tensor(
        [[1.0, 3.0, 3.0, 3.0, 0.5], [2.0, nan, 2.0, -inf, 2.0], [1.0, inf, 2.0, nan, 0.0]]
    )
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        idx = reference.per_example_topk_indices(g.to(dtype), 2)
        assert idx.tolist() == [[1, 2], [1, 3], [1, 3]], dtype
        # NaN and +inf both count as +inf: the lower index wins.
        assert reference.per_example_topk_indices(g[2:].to(dtype), 1).tolist() == [[1]], dtype


def test_per_example_nan_reaches_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(10, 6, requires_grad=True)
    G = torch.randn(4, 10) * 1e-3
    G[2, 7] = float("nan")
    meprop_linear(x, w, k=2, unified=False).backward(G)
    assert torch.isnan(x.grad[2]).all() and not torch.isnan(x.grad[[0, 1, 3]]).any()
    assert torch.isnan(w.grad[7]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_per_example_low_precision_on_cpu(dtype):
    torch.manual_seed(1)
    x32 = torch.randn(6, 16)
    w32 = torch.randn(20, 16)
    G32 = torch.randn(6, 20)
    x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
    meprop_linear(x, w, k=5, unified=False).backward(G32.to(dtype))
    o = per_example_oracle(x, w, G32.to(dtype), 5)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    np.testing.assert_allclose(x.grad.double().numpy(), o["grad_x"], rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(w.grad.double().numpy(), o["grad_w"], rtol=2e-2, atol=5e-2)


def selected_units(unified, k, out_f=20, M=1, seed=None, generator=None, G=None):
    """The units a random-k backward selects, read off grad_W (x = 1, so a selected
    unit's row is G[m, j] != 0 and an unselected one's is 0)."""
    x = torch.ones(M, 1, requires_grad=True)
    w = torch.zeros(out_f, 1, requires_grad=True)
    if G is None:
        G = torch.arange(1, out_f + 1, dtype=torch.float32).repeat(M, 1)
    if seed is not None:
        torch.manual_seed(seed)
    y = meprop_linear(x, w, k=k, unified=unified, selection="random", generator=generator)
    y.backward(G)
    return (w.grad[:, 0] != 0).nonzero().flatten()


CHI2_CRIT_DF19_P001 = 43.82  # chi-square critical value, 19 degrees of freedom, p = 0.001


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_random_k_is_uniform_whatever_the_magnitudes(unified):
    out_f, k, draws = 20, 5, 2000
    # Magnitudes spanning 12 orders: top-k would always pick the last units.
    G = torch.logspace(-6, 6, out_f).unsqueeze(0)
    gen = torch.Generator().manual_seed(1234)
    counts = np.zeros(out_f)
    for _ in range(draws):
        sel = selected_units(unified, k, out_f=out_f, generator=gen, G=G)
        assert len(sel) == k
        counts[sel.numpy()] += 1
    expected = draws * k / out_f
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_CRIT_DF19_P001, (chi2, counts)


def test_per_example_random_draws_a_set_per_row():
    M, out_f, k = 64, 30, 3
    x = torch.eye(M, requires_grad=True)  # row m of x is e_m, so grad_W[j, m] = G[m, j] if kept
    w = torch.zeros(out_f, M, requires_grad=True)
    gen = torch.Generator().manual_seed(7)
    meprop_linear(x, w, k=k, unified=False, selection="random", generator=gen).backward(torch.ones(M, out_f))
    kept = w.grad.t() != 0  # (M, out): row m = the set S_m
    assert torch.all(kept.sum(1) == k)
    assert len({tuple(r.nonzero().flatten().tolist()) for r in kept}) > M // 2


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_random_k_reproducible_from_seed_and_generator(unified):
    a = selected_units(unified, 5, out_f=50, seed=11)
    b = selected_units(unified, 5, out_f=50, seed=11)
    c = selected_units(unified, 5, out_f=50, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (5, 5, 6))
    a, b, c = (selected_units(unified, 5, out_f=50, generator=g) for g in (g1, g2, g3))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_k_gradients_match_definition_for_the_drawn_set():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(25, 12, dtype=torch.float64, requires_grad=True)
    G = torch.randn(8, 25, dtype=torch.float64)
    meprop_linear(x, w, k=6, selection="random", generator=gen).backward(G)
    sel = torch.from_numpy(np.flatnonzero(w.grad.abs().sum(1).numpy() != 0))
    assert len(sel) == 6
    assert torch.equal(sel, reference.random_indices(25, 6, generator=torch.Generator().manual_seed(3)))
    mask = torch.zeros(25, dtype=torch.bool)
    mask[sel] = True
    Gm = G * mask
    torch.testing.assert_close(x.grad, Gm @ w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, Gm.t() @ x.detach(), rtol=1e-12, atol=1e-12)


def test_options_on_module_and_convert():
    layer = MePropLinear(8, 16, k=4, unified=False, selection="random")
    assert "unified=False" in repr(layer) and "selection='random'" in repr(layer)
    layer(torch.randn(3, 8)).sum().backward()
    assert int((layer.weight.grad != 0).any(1).sum()) <= 12  # at most 3 rows x 4 units
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    convert(model, k=0.25, unified=False, selection="random", exclude=["2"])
    assert model[0].unified is False and model[0].selection == "random"
    model(torch.randn(5, 8)).sum().backward()
    assert model[0].weight.grad is not None


def test_generator_errors():
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        meprop_linear(x, w, k=1, selection="random", generator=7)
    xm, wm = torch.randn(2, 3, device="meta", requires_grad=True), torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="generator lives on 'cpu' but the tensors on 'meta'"):
        meprop_linear(xm, wm, k=1, selection="random", generator=torch.Generator())


@pytest.mark.parametrize("route", ["as-is", "torch-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_unsorted_selection_is_the_same_sets(dtype, route, monkeypatch):
    """``sort=False`` (what the backward takes) gives each row the same set as the
    sorted selection, ties and non-finite values included (on the CPU's numpy route
    where k is over 1/64 of the units, and on torch's ``topk``)."""
    if route == "torch-only":
        monkeypatch.setattr(reference, "_numpy_may_read", lambda t: False)
    gen = torch.Generator().manual_seed(11)
    G = torch.randn(13, 40, generator=gen).to(dtype)
    G[2, :] = 1.0  # a row of ties
    G[5, 7], G[5, 30], G[6, 3] = float("nan"), float("inf"), float("-inf")
    for k in (1, 6, 39):
        got = reference.per_example_topk_indices(G, k, sort=False)
        want = reference.per_example_topk_indices(G, k)
        assert torch.equal(got.sort(dim=1).values, want)
    r1 = reference.per_example_random_indices(13, 40, 6, generator=torch.Generator().manual_seed(3), sort=False)
    r2 = reference.per_example_random_indices(13, 40, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1.sort(dim=1).values, r2)
