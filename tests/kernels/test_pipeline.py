"""The kernels chained as the backward uses them, against the reference end to end."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import assert_reduction_close, poisoned, randn, skip_unsupported
from meprop_triton import reference

pytestmark = pytest.mark.interpreter


def pipeline(G, X, W, k):
    from meprop_triton.kernels.matmul import gathered_grad_input, scattered_grad_weight
    from meprop_triton.kernels.scores import column_scores_and_bias
    from meprop_triton.kernels.topk import topk_indices

    scores, grad_b = column_scores_and_bias(G)
    idx, rest = topk_indices(scores, k, return_rest=True)
    grad_x = gathered_grad_input(G, W, idx, out=poisoned((G.shape[0], W.shape[1]), G.dtype, G.device))
    grad_w = scattered_grad_weight(G, X, idx, rest, out=poisoned(W.shape, G.dtype, G.device))
    return idx, grad_x, grad_w, grad_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("k", [1, 64, 129, 130], ids=["k1", "k64", "k_out_minus_1", "k_out"])
def test_tied_integer_grad_matches_reference_exactly(k, dtype, rng, device):
    """Integer-valued G: scores are exact, so the selected set is the reference's, ties
    included; 3-D activations flattened as the autograd Function does."""
    skip_unsupported(dtype)
    g3 = torch.randint(-2, 3, (3, 13, 130), generator=rng).to(dtype).to(device)
    x3 = randn((3, 13, 64), dtype, rng, device)
    W = randn((130, 64), dtype, rng, device)
    G, X = g3.reshape(-1, 130), x3.reshape(-1, 64)
    idx, grad_x, grad_w, grad_b = pipeline(G, X, W, k)
    ref_idx = reference.unified_topk_indices(G, k)
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    d = lambda t: t.to(torch.float64).cpu()  # noqa: E731
    rx, rw, rb = reference.unified_backward(d(G), d(X), d(W), ref_idx.cpu())
    bx, bw, _ = reference.unified_backward(d(G).abs(), d(X).abs(), d(W).abs(), ref_idx.cpu())
    assert_reduction_close(grad_x, rx, bx, k, what="grad_x")
    assert_reduction_close(grad_w, rw, bw, G.shape[0], what="grad_W")
    assert torch.equal(grad_b.cpu(), rb.to(dtype))  # small integers: exact


def test_nonfinite_grad_is_always_selected(rng, device):
    """A NaN / inf column wins selection (GradScaler must see the overflow)."""
    G = randn((37, 130), torch.float32, rng, device) * 1e-3
    X = randn((37, 64), torch.float32, rng, device)
    W = randn((130, 64), torch.float32, rng, device)
    G[4, 100] = math.nan
    G[5, 17] = math.inf
    idx, grad_x, grad_w, grad_b = pipeline(G, X, W, 2)
    assert idx.tolist() == [17, 100]
    assert torch.isnan(grad_x).any() and torch.isnan(grad_w[100]).all()
    assert torch.isnan(grad_b[100]) and grad_b[17] == math.inf
    keep = torch.ones(130, dtype=torch.bool)
    keep[[17, 100]] = False
    assert (grad_w.cpu()[keep] == 0).all()
