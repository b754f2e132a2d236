"""kernels/scores.py against reference.column_scores and G.sum(0)."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import (
    DTYPE_IDS,
    DTYPES,
    assert_reduction_close,
    poisoned,
    randn,
    skip_unsupported,
    strided_copy,
)
from meprop_triton import reference

pytestmark = pytest.mark.interpreter

SHAPES = [(1, 1), (7, 5), (37, 130), (37, 1000), (300, 130)]  # (M, out)


def run(G, split=None):
    """The launcher with NaN-poisoned output buffers (an unwritten entry fails)."""
    from meprop_triton.kernels.scores import column_scores_and_bias

    N = G.shape[1]
    out = (poisoned((N,), torch.float32, G.device), poisoned((N,), G.dtype, G.device))
    scores, grad_b = column_scores_and_bias(G, out=out, split=split)
    assert scores is out[0] and grad_b is out[1]
    return scores, grad_b


def check(G, scores, grad_b):
    M = G.shape[0]
    g64 = G.detach().to(torch.float64).cpu()
    exact_s = g64.abs().sum(0)
    exact_s = torch.where(torch.isfinite(exact_s), exact_s, torch.full_like(exact_s, math.inf))
    assert scores.dtype == torch.float32 and grad_b.dtype == G.dtype
    assert_reduction_close(scores, exact_s, exact_s, M, what="scores")
    # reference.column_scores is fp32 too: the same bound, two-sided, holds for it
    ref = reference.column_scores(G)
    assert_reduction_close(ref, exact_s, exact_s, M, what="reference scores")
    assert_reduction_close(grad_b, g64.sum(0), g64.abs().sum(0), M, what="grad_b")


@pytest.mark.parametrize("split", [None, 1, 3], ids=["split_auto", "split1", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,N", SHAPES, ids=[f"M{m}_out{n}" for m, n in SHAPES])
def test_scores_and_bias(M, N, dtype, split, rng, device):
    skip_unsupported(dtype, dot=False)  # no tl.dot here: bf16 runs in the interpreter too
    G = randn((M, N), dtype, rng, device)
    check(G, *run(G, split))


@pytest.mark.parametrize("layout", ["transposed", "padded", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_strided_grad(layout, dtype, rng, device):
    G = strided_copy(randn((37, 130), dtype, rng, device), layout)
    assert not G.is_contiguous()
    for split in (1, 4):
        check(G, *run(G, split))


def test_three_d_flattened(rng, device):
    G3 = randn((3, 13, 70), torch.float32, rng, device).transpose(0, 1)  # (13, 3, 70), strided
    G = G3.reshape(-1, 70)
    check(G, *run(G, 2))


# the interpreter's numpy reductions warn about the NaN / inf they are given on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_nan_and_inf_give_inf_scores(dtype, rng, device):
    G = randn((37, 130), dtype, rng, device)
    G[3, 5] = math.nan
    G[4, 7] = math.inf
    G[5, 9] = -math.inf
    G[6, 9] = math.inf  # +inf and -inf in one column: NaN bias, +inf score
    G[8, 11] = -math.inf
    for split in (1, 3):
        scores, grad_b = run(G, split)
        check(G, scores, grad_b)
        for j in (5, 7, 9, 11):
            assert scores[j].item() == math.inf
        assert math.isnan(grad_b[5].item()) and math.isnan(grad_b[9].item())
        assert grad_b[7].item() == math.inf and grad_b[11].item() == -math.inf
        assert torch.isfinite(scores[12:]).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_fp32_overflow_counts_as_inf(device):
    G = torch.full((4, 3), 3e38, dtype=torch.float32, device=device)
    scores, grad_b = run(G, 1)
    assert (scores == math.inf).all() and (grad_b == math.inf).all()


def test_integer_grad_is_exact(rng, device):
    """Small integers sum exactly: the kernel equals the reference bit for bit (ties too)."""
    G = torch.randint(-3, 4, (37, 130), generator=rng).to(torch.float16).to(device)
    for split in (1, 3):
        scores, grad_b = run(G, split)
        assert torch.equal(scores, reference.column_scores(G))
        assert torch.equal(grad_b, G.sum(0))


def test_deterministic(rng, device):
    G = randn((300, 130), torch.float32, rng, device)
    first = run(G, 5)
    for _ in range(2):
        again = run(G, 5)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_forced_split_stays_launchable(device):
    """A forced ``split`` is cut to what one launch can hold: at most MAX_SPLIT row slices
    (CUDA's limit on a grid's second dimension) and few enough that finish_kernel's
    int32 offsets into the workspace, up to ``(split + 2) * N``, cannot overflow; the
    default split is far below both. (Host arithmetic only: such a launch is too large
    for the interpreter.)"""
    from meprop_triton.kernels import scores

    assert scores.MAX_SPLIT == 65535
    for M, N, split in [(2_100_000, 1, 2_100_000), (10**6, 2**20, 4096), (10**6, 2**30, 7), (64, 3, 10**9)]:
        s, rows = scores._slices(M, N, split, torch.device(device))
        assert 1 <= s <= min(M, scores.MAX_SPLIT) and (s + 2) * N < 2**31 or s == 1, (M, N, split, s)
        assert (s - 1) * rows < M <= s * rows  # every row in exactly one slice, none empty
    assert scores._slices(2_100_000, 1, 2_100_000, torch.device(device))[0] > 30000
    assert scores._slices(10**6, 2**20, 4096, torch.device(device))[0] <= 2046
    assert scores._slices(10**6, 2**30, 7, torch.device(device))[0] == 1


def test_empty_rows(device):
    G = torch.empty((0, 6), dtype=torch.float32, device=device)
    scores, grad_b = run(G)
    assert torch.equal(scores, torch.zeros(6, device=device))
    assert torch.equal(grad_b, torch.zeros(6, device=device))


def test_rejects_unsupported_dtype(device):
    from meprop_triton.kernels.scores import column_scores_and_bias

    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        column_scores_and_bias(torch.ones(2, 3, dtype=torch.float64, device=device))
