"""Shared test helpers.

The ``oracle`` fixture is an independent fp64 numpy statement of unified top-k meProp
(the README's "Semantics"), written with a dense 0/1 mask and a stable ``argsort``; it shares no
code with ``meprop_triton.reference``. Values are compared with a bound scaled by the
reduction length: ``|got - exact| <= c * L * eps * (|A| @ |B|)`` (no absolute tolerance).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch



def auto_workers(cpus: int, cuda: bool) -> int:
    """How many workers ``pytest -n auto`` starts (pytest-xdist): one per CPU, at most 8
    (each worker's torch also runs a thread per CPU), and at most 4 when a CUDA GPU is
    present, since every worker then holds a CUDA context on it."""
    return max(1, min(cpus, 4 if cuda else 8))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: without it, never called
def pytest_xdist_auto_num_workers(config):
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return auto_workers(cpus, torch.cuda.is_available())


def expected_k_units(k, out_features: int) -> int:
    """``k`` resolved independently: tests/properties.py's ``k_units``, imported when
    first used (it imports the package, and with it triton, which the kernel tests must
    import in the Triton mode they choose)."""
    from properties import k_units

    return k_units(k, out_features)


def meprop_oracle(x, weight, grad_out, k_units: int) -> dict:
    """Unified top-k meProp gradients in fp64 numpy, from a dense mask.

    Returns ``selected`` (sorted indices), ``grad_x`` (shape of ``x``), ``grad_w``,
    ``grad_b`` and, for each gradient, ``bound_*`` = the same product with absolute
    values (what the rounding error of a length-L reduction is proportional to).
    """
    W = weight.detach().to(torch.float64).cpu().numpy()
    out_features, in_features = W.shape
    X = x.detach().to(torch.float64).cpu().reshape(-1, in_features).numpy()
    G = grad_out.detach().to(torch.float64).cpu().reshape(-1, out_features).numpy()
    scores = np.abs(G).sum(axis=0)
    scores[~np.isfinite(scores)] = np.inf
    order = np.argsort(-scores, kind="stable")  # largest first, ties in index order
    selected = np.sort(order[:k_units])
    mask = np.zeros(out_features, dtype=bool)
    mask[selected] = True
    Gm = np.where(mask[None, :], G, 0.0)
    return {
        "selected": selected,
        "scores": scores,
        "mask": mask,
        "grad_x": (Gm @ W).reshape(tuple(x.shape)),
        "grad_w": Gm.T @ X,
        "grad_b": G.sum(axis=0),
        "bound_x": (np.abs(Gm) @ np.abs(W)).reshape(tuple(x.shape)),
        "bound_w": np.abs(Gm).T @ np.abs(X),
        "bound_b": np.abs(G).sum(axis=0),
    }


def assert_within_bound(got, expected, bound, length: int, *, c: float = 2.0, what: str = ""):
    """``|got - expected| <= c * max(length, 1) * eps(got.dtype) * bound``, elementwise."""
    assert got is not None, f"{what}: gradient is None"
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)} != {expected.shape}"
    assert got.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    eps = torch.finfo(got.dtype).eps
    g = got.detach().to(torch.float64).cpu().numpy()
    assert np.isfinite(g).all(), f"{what}: non-finite values"
    err = np.abs(g - expected)
    tol = c * max(length, 1) * eps * bound
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} entries off; worst error {err.max():.3e}, "
        f"tolerance there {tol.reshape(-1)[np.argmax(err)]:.3e}"
    )


def distinct_score_grad(lead_shape, out_features: int, *, dtype, generator) -> torch.Tensor:
    """A random grad_output whose column scores sum_m |G[m, j]| are pairwise well apart.

    The scores are a random permutation of out, out+1, ..., 2*out-1 (relative gaps
    >= 1/(2*out), far above rounding), so the top-k set has no ties and no near-ties.
    Needs at least one row.
    """
    M = math.prod(lead_shape)
    assert M >= 1
    G = torch.randn(M, out_features, dtype=torch.float64, generator=generator)
    target = out_features + torch.randperm(out_features, generator=generator).to(torch.float64)
    G = G * (target / G.abs().sum(0))
    return G.reshape(*lead_shape, out_features).to(dtype)


def selected_rows(grad_w: torch.Tensor) -> np.ndarray:
    """Sorted indices of the rows of ``grad_w`` holding any nonzero (NaN counts)."""
    return np.flatnonzero((grad_w != 0).any(dim=1).cpu().numpy())


@pytest.fixture(scope="session")
def oracle():
    """The independent oracle and its helpers, as one namespace (stateless)."""
    return SimpleNamespace(
        grads=meprop_oracle,
        k_units=expected_k_units,
        assert_within_bound=assert_within_bound,
        grad_output=distinct_score_grad,
        selected_rows=selected_rows,
    )


@pytest.fixture
def gen():
    """A fresh, seeded CPU generator: each test draws its own random inputs."""
    return torch.Generator().manual_seed(20170611)
