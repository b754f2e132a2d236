"""Property-test machinery shared by tests/test_properties.py (torch path) and
tests/kernels/test_properties_triton.py (the Triton path through the interpreter).

One generated case is a whole call: input shape (1-D to 4-D, empty batches included),
layout (contiguous or a strided view), in/out sizes, k (int or fraction: 1, out - 1,
>= out, ...), dtype, bias, mode (unified / per-example, top-k / random), dense or sparse
gradients. ``check_case`` runs ``meprop_linear`` forward and backward and compares every
gradient with the definition (the README's "Semantics"), computed here in fp64 numpy from a 0/1
mask: nothing of ``meprop_triton.reference`` decides what is expected, except the random
draw of ``selection="random"``, which is replayed from the same generator state (a random
set cannot be predicted otherwise) and then checked to be a k-subset of distinct units.

Hypothesis runs derandomized (``derandomize=True``): the same cases on every run.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import strategies as st

from meprop_triton import MePropLinear, meprop_linear, reference

FRACTIONS = (0.05, 0.1, 0.25, 1 / 3, 0.5, 1.0)
# weighted towards k < out (the dense cases need only a few draws)
K_SPECS = ("1", "1", "out-1", "out-1", "out", "out+3", "int", "int", "int", "frac", "frac")
MODES = ("unified-topk", "per-example-topk", "unified-random", "per-example-random")


def k_units(k, out_features: int) -> int:
    """``k`` resolved independently, in exact arithmetic: an int as is; a float as the
    decimal it was written as (its shortest repr, in its own precision for a numpy
    float32) times ``out_features``, rounded up unless it exceeds a whole number by at
    most a millionth of itself (rounding noise); clamped to [1, out_features]."""
    if isinstance(k, (float, np.floating)):
        units = Fraction(str(k)) * out_features
        n = math.floor(units)
        n += units - n > Fraction(1, 10**6) * units
    else:
        n = int(k)
    return max(1, min(n, out_features))


@st.composite
def cases(draw, *, dtypes, sparse=True, max_dim=24):
    # 1-D to 4-D inputs; about one case in eight has an empty batch
    empty = draw(st.integers(0, 7)) == 0
    lead = tuple(draw(st.lists(st.integers(0 if empty else 1, 4), min_size=1 if empty else 0, max_size=3)))
    if empty and 0 not in lead:
        lead = lead[:-1] + (0,)
    in_f = draw(st.integers(1, max_dim))
    out_f = draw(st.integers(2, max_dim))
    spec = draw(st.sampled_from(K_SPECS))
    if spec == "int":
        k = draw(st.integers(1, out_f + 2))
    elif spec == "frac":
        k = draw(st.sampled_from(FRACTIONS))
    else:
        k = {"1": 1, "out-1": max(1, out_f - 1), "out": out_f, "out+3": out_f + 3}[spec]
    return dict(
        lead=lead,
        in_f=in_f,
        out_f=out_f,
        k=k,
        layout=draw(st.sampled_from(["contiguous", "strided"])),
        dtype=draw(st.sampled_from(dtypes)),
        bias=draw(st.booleans()),
        mode=draw(st.sampled_from(MODES)),
        sparse=draw(st.booleans()) if sparse else False,
        # through meprop_linear, or through a MePropLinear layer holding the parameters
        # (which draws random sets from torch's default generator: top-k there)
        module=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _input(lead, in_f, dtype, gen, layout, device):
    if layout == "strided" and len(lead) >= 1:
        # every other element of a wider tensor: no unit stride anywhere
        base = torch.randn(*lead, 2 * in_f, generator=gen).to(dtype)
        x = base[..., ::2]
    else:
        x = torch.randn(*lead, in_f, generator=gen).to(dtype)
    return x.to(device).requires_grad_()


def _grad_output(lead, out_f, dtype, gen, mode, device):
    """Random G; for unified top-k its column scores are kept far apart (no near-ties
    that fp32 and fp64 sums could order differently)."""
    M = math.prod(lead)
    G = torch.randn(M, out_f, dtype=torch.float64, generator=gen)
    if mode == "unified-topk" and M > 0:
        target = out_f + torch.randperm(out_f, generator=gen).to(torch.float64)
        G = G * (target / G.abs().sum(0))
    return G.reshape(*lead, out_f).to(dtype).to(device)


def expected_masks(G2, mode, ku, replayed):
    """(M, out) boolean mask of the kept entries, from the definition."""
    M, out_f = G2.shape
    mask = np.zeros((M, out_f), dtype=bool)
    if ku >= out_f:
        mask[:] = True
        return mask
    if mode == "unified-topk":
        scores = np.abs(G2).sum(0)
        scores[~np.isfinite(scores)] = np.inf
        mask[:, np.argsort(-scores, kind="stable")[:ku]] = True
    elif mode == "per-example-topk":
        a = np.abs(G2)
        order = np.argsort(-a, axis=1, kind="stable")[:, :ku]
        np.put_along_axis(mask, order, True, axis=1)
    elif mode == "unified-random":
        mask[:, replayed] = True
    else:
        np.put_along_axis(mask, replayed.reshape(M, ku), True, axis=1)
    return mask


def _replay_random(mode, M, out_f, ku, state, device):
    gen = torch.Generator(device=device)
    gen.set_state(state)
    if mode == "unified-random":
        idx = reference.random_indices(out_f, ku, generator=gen, device=device).cpu().numpy()
        assert len(set(idx.tolist())) == ku and idx.min() >= 0 and idx.max() < out_f
        return idx
    idx = reference.per_example_random_indices(M, out_f, ku, generator=gen, device=device).cpu().numpy()
    for row in idx:
        assert len(set(row.tolist())) == ku and row.min() >= 0 and row.max() < out_f
    return idx


def _close(got, exact, bound, length, dtype, what, in_round=0.0):
    assert got is not None, f"{what}: no gradient"
    g = got.detach().to(torch.float64).cpu().numpy()
    assert g.shape == exact.shape, f"{what}: shape {g.shape} != {exact.shape}"
    assert np.isfinite(g).all(), f"{what}: non-finite values"
    # fp32 accumulation of ``length`` terms plus rounding to the output dtype
    tol = 2 * (max(length, 1) * 2.0**-24 + in_round + torch.finfo(dtype).eps) * bound + 1e-30
    err = np.abs(g - exact)
    assert (err <= tol).all(), f"{what}: worst error {err.max():.3e} (tolerance {tol.reshape(-1)[err.argmax()]:.3e})"


def check_case(case, *, backend, device="cpu", in_round=0.0):
    """Run one case; ``in_round``: relative rounding of the products' inputs (tf32)."""
    lead, in_f, out_f, k, dtype = case["lead"], case["in_f"], case["out_f"], case["k"], case["dtype"]
    mode, sparse = case["mode"], case["sparse"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = _input(lead, in_f, dtype, gen, case["layout"], device)
    w = (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(dtype).to(device).requires_grad_()
    b = torch.randn(out_f, generator=gen).to(dtype).to(device).requires_grad_() if case["bias"] else None
    G = _grad_output(lead, out_f, dtype, gen, mode, device)
    unified = mode.startswith("unified")
    selection = "random" if mode.endswith("random") else "topk"
    rgen = torch.Generator(device=device).manual_seed(case["seed"] + 1) if selection == "random" else None
    state = rgen.get_state() if rgen is not None else None

    if case["module"] and selection == "topk":
        layer = MePropLinear(in_f, out_f, bias=b is not None, k=k, unified=unified,
                             sparse_grad=sparse, backend=backend, device=device, dtype=dtype)
        layer.weight, layer.bias = torch.nn.Parameter(w), None if b is None else torch.nn.Parameter(b)
        w, b = layer.weight, layer.bias
        y = layer(x)
    else:
        y = meprop_linear(x, w, b, k=k, unified=unified, selection=selection, sparse_grad=sparse,
                          backend=backend, generator=rgen)
    # the forward is F.linear, unchanged
    ref_y = torch.nn.functional.linear(x.detach(), w.detach(), None if b is None else b.detach())
    assert y.shape == ref_y.shape and torch.equal(y.detach(), ref_y), "forward differs from F.linear"
    y.backward(G)

    M = math.prod(lead)
    ku = k_units(k, out_f)
    W = w.detach().double().cpu().numpy()
    X = x.detach().double().cpu().reshape(M, in_f).numpy()
    G2 = G.double().cpu().reshape(M, out_f).numpy()
    replayed = None
    if selection == "random" and ku < out_f and M > 0:
        replayed = _replay_random(mode, M, out_f, ku, state, device)
    if M == 0 and selection == "random" and ku < out_f:
        mask = np.zeros((0, out_f), dtype=bool)
    else:
        mask = expected_masks(G2, mode, ku, replayed)
    Gm = np.where(mask, G2, 0.0)
    _close(x.grad.reshape(M, in_f), Gm @ W, np.abs(Gm) @ np.abs(W), out_f, dtype, "grad_x", in_round)
    assert x.grad.shape == x.shape

    gw = w.grad
    if sparse:
        assert gw.is_sparse, "sparse_grad=True must give a sparse weight gradient"
        gw = gw.to_dense()
    else:
        assert not gw.is_sparse
    _close(gw, Gm.T @ X, np.abs(Gm).T @ np.abs(X), M, dtype, "grad_w", in_round)
    if b is not None:
        gb = b.grad
        exact_b, bound_b = G2.sum(0), np.abs(G2).sum(0)
        if sparse:
            assert gb.is_sparse
            gb = gb.to_dense()
            if ku < out_f:  # the bias gradient restricted to the rows kept (M = 0: all zero)
                exact_b = np.where(mask.any(0), exact_b, 0.0)
        _close(gb, exact_b, bound_b, M, dtype, "grad_b")
    # unified: exactly k rows of W may change (all when k >= out)
    if unified and not sparse and M > 0:
        nonzero_rows = int((w.grad != 0).any(1).sum())
        assert nonzero_rows <= ku
