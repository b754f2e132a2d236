"""``autograd.grad(..., is_grads_batched=True)`` and ``jacobian`` / ``hessian`` with
``vectorize=True``: torch runs the backward once over a batch of grad_outputs under its
older vmap, whose batched tensors have no storage to read on the host. Each batched
grad_output is its own backward, as under ``torch.func.vmap``: the same numbers as a loop
of single backwards; settings that cannot be batched are refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

from meprop_triton import MePropConv1D, MePropLinear, MePropLSTM


def _batched_equals_a_loop(layer, x, params, n=4):
    out = layer(x)
    torch.manual_seed(1)
    V = torch.randn(n, *out.shape, dtype=out.dtype)
    batched = torch.autograd.grad(out, params, V, is_grads_batched=True, retain_graph=True)
    for i in range(n):
        single = torch.autograd.grad(out, params, V[i], retain_graph=True)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("opts", [{}, {"unified": False}, {"k": 7}, {"unified": False, "out": 40}],
                         ids=["unified", "per-example", "dense-k", "per-example-row-sums"])
def test_linear_batched_backward_is_a_loop_of_backwards(opts, shape):
    # (out 40, k 2: a single per-example backward takes the row sums, not the masked GEMMs)
    torch.manual_seed(0)
    opts = {"k": 2, "out": 7, **opts}
    layer = MePropLinear(5, opts.pop("out"), **opts, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    _batched_equals_a_loop(layer, x, [x, layer.weight, layer.bias])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_16_and_32_bit_batched_backward_is_a_loop_of_backwards(unified, dtype):
    """fp32 / bf16 per-example selection packs each |g|'s bits into a key: a dtype view
    torch's older vmap cannot batch, so the batched backward takes the stable sort."""
    torch.manual_seed(0)
    layer = MePropLinear(5, 7, k=2, unified=unified, dtype=dtype)
    x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    out = layer(x)
    V = torch.randn(4, *out.shape, dtype=dtype)
    batched = torch.autograd.grad(out, [x, layer.weight], V, is_grads_batched=True, retain_graph=True)
    for i in range(4):
        single = torch.autograd.grad(out, [x, layer.weight], V[i], retain_graph=True)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_triton_backend_batched_backward_takes_the_torch_path(kind, monkeypatch):
    """backend='triton' (what CUDA tensors get by default; here through the interpreter):
    the batched backward runs the torch path, as under torch.func.vmap."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    if kind == "linear":
        layer = MePropLinear(5, 7, k=2, backend="triton")
    else:
        layer = MePropConv1D(7, 5, k=2, backend="triton")
    x = torch.randn(3, 5, requires_grad=True)
    out = layer(x)
    V = torch.randn(4, *out.shape)
    batched = torch.autograd.grad(out, [x, layer.weight], V, is_grads_batched=True, retain_graph=True)
    torch_layer = copy.deepcopy(layer)
    torch_layer.backend = "torch"
    out_t = torch_layer(x)
    for i in range(4):
        single = torch.autograd.grad(out_t, [x, torch_layer.weight], V[i], retain_graph=True)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i], s)


@pytest.mark.parametrize("nf", [7, 40], ids=["masked", "row-sums"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_conv1d_batched_backward_is_a_loop_of_backwards(unified, nf):
    torch.manual_seed(0)
    layer = MePropConv1D(nf, 5, k=2, unified=unified, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    _batched_equals_a_loop(layer, x, [x, layer.weight, layer.bias])


@pytest.mark.parametrize("opts", [{}, {"unified": False}], ids=["unified", "per-example"])
def test_jacobian_vectorized_equals_the_loop(opts):
    torch.manual_seed(0)
    layer = MePropLinear(5, 40, k=2, **opts, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    fast = torch.autograd.functional.jacobian(layer, x, vectorize=True)
    slow = torch.autograd.functional.jacobian(layer, x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "make,what",
    [
        (lambda: MePropLinear(5, 7, k=2, selection="random"), r"MePropLinear with selection='random'"),
        (lambda: MePropLinear(5, 7, k=2, sparse_grad=True), r"MePropLinear with sparse_grad=True"),
        (lambda: MePropLinear(5, 7, k=2, track_selection=True), r"MePropLinear with track_selection=True"),
        (lambda: MePropConv1D(7, 5, k=2, selection="random"), r"MePropConv1D with selection='random'"),
        (lambda: MePropLSTM(5, 7, k=2), r"MePropLSTM cannot"),
    ],
    ids=["random", "sparse_grad", "track_selection", "conv1d-random", "lstm"],
)
def test_settings_that_cannot_be_batched_are_refused_with_the_way_out(make, what):
    layer = make()
    x = torch.randn(3, 5, requires_grad=True)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    with pytest.raises(NotImplementedError, match=what + r".*batched backward.*vectorize=False") as caught:
        torch.autograd.grad(out, [x], torch.randn(2, *out.shape), is_grads_batched=True)
    # torch.func.vmap is offered only where it runs the setting
    assert ("torch.func.vmap" in str(caught.value)) == ("random" in what or "track_selection" in what)


@pytest.mark.parametrize("setting", ["_LAZY_ZEROS_BYTES", "_SCORE_CHUNK"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_batched_backward_past_a_size_threshold(unified, setting, monkeypatch):
    # Routes a single backward takes past a size, with the threshold lowered so that a
    # small layer takes them: a weight of 32 MiB or more gets its zeros from numpy's
    # lazily mapped pages, and a gradient of over 2^18 elements is scored a block of
    # rows at a time; torch's older vmap could not copy batched rows into the first's
    # plain tensor, nor add them into the second's plain zeros.
    from meprop_triton import reference

    monkeypatch.setattr(reference, setting, 0 if setting == "_LAZY_ZEROS_BYTES" else 40)
    torch.manual_seed(0)
    layer = MePropLinear(5, 40, k=2, unified=unified, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    _batched_equals_a_loop(layer, x, [x, layer.weight, layer.bias])
