"""``MePropConv1D`` (transformers' Conv1D layout, weight stored (in, out)) on the Triton
backend: the ops run on the transposed view and match the torch path in every mode.

Under the interpreter on CPU machines, on CUDA tensors on a GPU: the same tests.
"""

from __future__ import annotations

import pytest
import torch

import meprop_triton.triton_ops as triton_ops
from meprop_triton import MePropConv1D

pytestmark = pytest.mark.interpreter

OPS = {
    (True, "topk"): "unified_topk_backward",
    (False, "topk"): "per_example_topk_backward",
    (True, "random"): "unified_backward_from_indices",
    (False, "random"): "per_example_backward_from_indices",
}


def grads(layer, x, g, seed):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # random-k draws from the default generator: the same units
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("selection", ["topk", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv1d_on_triton_matches_torch(unified, selection, dtype, rng, device, monkeypatch):
    calls = []
    op = OPS[(unified, selection)]
    real = getattr(triton_ops, op)
    monkeypatch.setattr(triton_ops, op, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    nx, nf = 24, 70
    layer = MePropConv1D(nf, nx, k=0.1, unified=unified, selection=selection, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(nx, nf, generator=rng) / nx**0.5)
        layer.bias.copy_(torch.randn(nf, generator=rng))
    x = torch.randn(3, 3, nx, generator=rng).to(device, dtype)
    # Column magnitudes spread apart so the selection has no near-ties in fp16.
    scale = torch.linspace(0.5, 2.0, nf)[torch.randperm(nf, generator=rng)]
    g = (torch.randn(3, 3, nf, generator=rng) * scale).to(device, dtype)
    layer.backend = "triton"
    y_t, gx_t, gw_t, gb_t = grads(layer, x, g, 7)
    assert len(calls) == 1
    layer.backend = "torch"
    y_r, gx_r, gw_r, gb_r = grads(layer, x, g, 7)
    assert torch.equal(y_t, y_r)
    assert gw_t.shape == (nx, nf)
    cols_t = gw_t.abs().sum(0).nonzero().flatten()
    assert torch.equal(cols_t, gw_r.abs().sum(0).nonzero().flatten())
    if unified:
        assert cols_t.numel() == 7
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, **tol)
    torch.testing.assert_close(gw_t, gw_r, **tol)
    torch.testing.assert_close(gb_t, gb_r, **tol)
