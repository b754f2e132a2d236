"""``MePropConv1D`` (transformers' Conv1D layout, weight stored (in, out)) on the Triton
backend: the ops run on the transposed view and match the torch path in every mode.

Under the interpreter on CPU machines, on CUDA tensors on a GPU: the same tests.
"""

from __future__ import annotations

import pytest
import torch

import meprop_triton.conv1d as conv1d
import meprop_triton.triton_ops as triton_ops
from kernel_checks import BACKEND_TOL
from meprop_triton import MePropConv1D

pytestmark = pytest.mark.interpreter

OPS = {
    (True, "topk"): "_triton_unified_topk",  # conv1d's own op: products in the (in, out) layout
    (False, "topk"): "per_example_topk_backward",
    (True, "random"): None,  # a random draw and torch GEMMs in the stored layout, no kernel
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_conv1d_on_triton_matches_torch(unified, selection, dtype, rng, device, monkeypatch):
    calls = []
    op = OPS[(unified, selection)]
    if op is not None:
        module = conv1d if op.startswith("_") else triton_ops
        real = getattr(module, op)
        monkeypatch.setattr(module, op, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    nx, nf = 24, 70
    layer = MePropConv1D(nf, nx, k=0.1, unified=unified, selection=selection, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(nx, nf, generator=rng) / nx**0.5)
        layer.bias.copy_(torch.randn(nf, generator=rng))
    x = torch.randn(3, 3, nx, generator=rng).to(device, dtype)
    # Column magnitudes spread apart so the selection has no near-ties in fp16 / bf16.
    scale = torch.linspace(0.5, 2.0, nf)[torch.randperm(nf, generator=rng)]
    g = (torch.randn(3, 3, nf, generator=rng) * scale).to(device, dtype)
    layer.backend = "triton"
    y_t, gx_t, gw_t, gb_t = grads(layer, x, g, 7)
    assert len(calls) == (op is not None)
    layer.backend = "torch"
    y_r, gx_r, gw_r, gb_r = grads(layer, x, g, 7)
    assert torch.equal(y_t, y_r)
    assert gw_t.shape == (nx, nf)
    cols_t = gw_t.abs().sum(0).nonzero().flatten()
    assert torch.equal(cols_t, gw_r.abs().sum(0).nonzero().flatten())
    if unified:
        assert cols_t.numel() == 7
    tol = BACKEND_TOL[dtype]
    torch.testing.assert_close(gx_t, gx_r, **tol)
    torch.testing.assert_close(gw_t, gw_r, **tol)
    torch.testing.assert_close(gb_t, gb_r, **tol)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["x-and-W", "x-only", "W-only"])
def test_unified_topk_writes_the_weight_gradient_in_the_stored_layout(needs, rng, device):
    """Unified top-k on the Triton backend hands autograd an (in, out) contiguous weight
    gradient (no transposed copy), equal to the torch path's."""
    need_x, need_w = needs
    layer = MePropConv1D(40, 16, k=5, backend="triton", device=device)
    layer.weight.requires_grad_(need_w)
    x = torch.randn(6, 16, generator=rng).to(device).requires_grad_(need_x)
    g = torch.randn(6, 40, generator=rng).to(device)
    seen = []
    if need_w:
        layer.weight.register_hook(lambda grad: seen.append(grad.is_contiguous()))
    layer(x).backward(g)
    if need_w:
        assert seen == [True] and layer.weight.grad.shape == (16, 40)
        assert int((layer.weight.grad != 0).any(0).sum()) == 5
    got = (x.grad, layer.weight.grad, layer.bias.grad)
    layer.zero_grad(set_to_none=True)
    layer.backend = "torch"
    x2 = x.detach().clone().requires_grad_(need_x)
    layer(x2).backward(g)
    for a, b in zip(got, (x2.grad, layer.weight.grad, layer.bias.grad)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unified_topk_compiles_in_one_graph(rng, device):
    """torch.compile sees the Conv1D op (a triton_op on a GPU; an opaque custom op with a
    fake under the interpreter)."""
    torch._dynamo.reset()
    layer = MePropConv1D(40, 16, k=5, backend="triton", device=device)
    x = torch.randn(2, 3, 16, generator=rng).to(device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    w_compiled = layer.weight.grad.clone()
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()
    torch.testing.assert_close(w_compiled, layer.weight.grad, rtol=1e-4, atol=1e-5)
    assert int((w_compiled != 0).any(0).sum()) == 5
