"""Row-sparse gradients (``sparse_grad=True``): only the selected rows are touched."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import meprop_triton
from meprop_triton import MePropLinear, convert, meprop_linear

MODES = [
    pytest.param(dict(unified=True, selection="topk"), id="unified-topk"),
    pytest.param(dict(unified=False, selection="topk"), id="per-example-topk"),
    pytest.param(dict(unified=True, selection="random"), id="unified-random"),
    pytest.param(dict(unified=False, selection="random"), id="per-example-random"),
]


def twins(mode, in_f=12, out_f=30, k=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, dtype=dtype)
    dense = MePropLinear(in_f, out_f, k=k, dtype=dtype, **mode)
    sparse = MePropLinear(in_f, out_f, k=k, dtype=dtype, sparse_grad=True, **mode)
    dense.load_state_dict(base.state_dict())
    sparse.load_state_dict(base.state_dict())
    return dense, sparse


def run(layer, x, g, seed=5):
    torch.manual_seed(seed)  # random modes draw the same sets in both twins
    layer(x).backward(g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=["M7", "B2T3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sparse_gradient_equals_dense_mode(mode, lead, dtype):
    dense, sparse = twins(mode, dtype=dtype)
    x = torch.randn(*lead, 12, dtype=dtype)
    g = torch.randn(*lead, 30, dtype=dtype)
    run(dense, x, g)
    run(sparse, x, g)
    gw, gb = sparse.weight.grad, sparse.bias.grad
    assert gw.is_sparse and gb.is_sparse
    assert gw.sparse_dim() == 1 and gb.sparse_dim() == 1
    rows = gw._indices()[0]
    # Exactly the selected rows: those the dense-mode gradient has nonzero.
    assert torch.equal(rows, dense.weight.grad.abs().sum(1).nonzero().flatten())
    torch.testing.assert_close(gw.to_dense(), dense.weight.grad)
    # The bias holds the same rows of the exact (dense) bias gradient.
    assert torch.equal(gb._indices()[0], rows)
    torch.testing.assert_close(gb._values(), dense.bias.grad[rows])


def test_k_at_least_out_keeps_every_row_sparse():
    dense, sparse = twins(dict(), k=30)
    x, g = torch.randn(4, 12), torch.randn(4, 30)
    run(dense, x, g)
    run(sparse, x, g)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    torch.testing.assert_close(sparse.bias.grad.to_dense(), dense.bias.grad)


@pytest.mark.parametrize("mode", MODES)
def test_two_backward_passes_accumulate(mode):
    dense, sparse = twins(mode)
    _, single = twins(mode)
    bias_sum = torch.zeros(30)
    for seed in (1, 2):
        x, g = torch.randn(5, 12), torch.randn(5, 30)
        run(dense, x, g, seed=seed)
        run(sparse, x, g, seed=seed)
        single.zero_grad()
        run(single, x, g, seed=seed)
        bias_sum += single.bias.grad.to_dense()
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    # Each pass adds the exact bias gradient on its own selected rows.
    torch.testing.assert_close(sparse.bias.grad.to_dense(), bias_sum)


def test_layer_used_twice_in_one_graph():
    dense, sparse = twins(dict(), in_f=30, out_f=30)
    x = torch.randn(4, 30)
    for layer in (dense, sparse):
        layer(torch.tanh(layer(x))).sum().backward()
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)


# torch's Adagrad builds a sparse tensor and warns that invariant checks are off by default
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.Adagrad, dict(lr=0.1)),
        (torch.optim.SparseAdam, dict(lr=0.1)),
    ],
    ids=["sgd", "sgd-momentum", "adagrad", "sparse-adam"],
)
def test_optimizers_move_only_selected_rows(mode, opt_cls, kw):
    _, layer = twins(mode)
    opt = opt_cls(layer.parameters(), **kw)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    run(layer, torch.randn(6, 12), torch.randn(6, 30))
    rows = layer.weight.grad.coalesce()._indices()[0]
    opt.step()
    moved_w = (layer.weight.detach() != w0).any(1).nonzero().flatten()
    moved_b = (layer.bias.detach() != b0).nonzero().flatten()
    assert 0 < len(rows) < 30
    assert torch.equal(moved_w, rows)
    assert set(moved_b.tolist()) <= set(rows.tolist())


def test_dense_optimizer_gives_its_own_clear_error():
    _, layer = twins(dict())
    opt = torch.optim.Adam(layer.parameters())
    run(layer, torch.randn(3, 12), torch.randn(3, 30))
    with pytest.raises(RuntimeError, match="SparseAdam"):
        opt.step()


def test_zero_grad_clip_and_mixed_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3))
    convert(model, k=0.1, sparse_grad=True, exclude=["4"])
    sparse_params = [p for m in model if isinstance(m, MePropLinear) for p in m.parameters()]
    dense_params = list(model[4].parameters())
    opts = [torch.optim.SparseAdam(sparse_params, lr=1e-2), torch.optim.Adam(dense_params, lr=1e-2)]
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for _ in range(2):
        for o in opts:
            o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert model[0].weight.grad.is_sparse and not model[4].weight.grad.is_sparse
        grads = [p.grad.to_dense().clone() for p in model.parameters()]
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        total = meprop_triton.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        torch.testing.assert_close(total, expected)
        clipped = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.to_dense()) for p in model.parameters()])
        )
        assert clipped <= 1e-3 * 1.001
        for o in opts:
            o.step()
    for o in opts:
        o.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_clip_grad_norm_coalesces_accumulated_rows():
    _, layer = twins(dict())
    x, g = torch.randn(4, 12), torch.randn(4, 30)
    run(layer, x, g)
    run(layer, x, g)  # the same rows twice: uncoalesced duplicates
    expected = torch.linalg.vector_norm(
        torch.cat([layer.weight.grad.to_dense().flatten(), layer.bias.grad.to_dense()])
    )
    total = meprop_triton.clip_grad_norm_(layer.parameters(), max_norm=1e9)
    torch.testing.assert_close(total, expected)


def test_functional_sparse_grad():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    meprop_linear(x, w, k=2, sparse_grad=True).sum().backward()
    assert w.grad.is_sparse and w.grad._nnz() == 2 and x.grad.shape == (3, 4)


def test_sparse_grad_under_autocast_is_refused_clearly():
    layer = MePropLinear(4, 8, k=2, sparse_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="sparse_grad=True cannot run under torch.autocast"):
            layer(torch.randn(3, 4))
    assert layer.weight.grad is None


@pytest.mark.parametrize("bad", [-1.0, math.nan, "1", True, None], ids=["negative", "nan", "str", "bool", "None"])
def test_clip_grad_norm_refuses_a_bad_max_norm_and_changes_nothing(bad):
    """A negative max_norm would flip every gradient's sign and NaN would make them all
    NaN, silently (torch's own function does both)."""
    _, layer = twins(dict())
    x, g = torch.randn(4, 12), torch.randn(4, 30)
    run(layer, x, g)
    run(layer, x, g)  # uncoalesced: a refused call must not replace it either
    before = [(p.grad, p.grad.to_dense().clone()) for p in layer.parameters()]
    with pytest.raises(ValueError, match=rf"max_norm must be (a real number|>= 0).*got {re.escape(repr(bad))}"):
        meprop_triton.clip_grad_norm_(layer.parameters(), max_norm=bad)
    for p, (grad, dense) in zip(layer.parameters(), before):
        assert p.grad is grad and torch.equal(p.grad.to_dense(), dense)


def test_clip_grad_norm_refused_as_non_finite_leaves_the_sparse_grad_object_alone():
    q = nn.Parameter(torch.zeros(3, 2))
    q.grad = torch.sparse_coo_tensor([[0, 0]], [[1.0, 1.0], [math.inf, 1.0]], (3, 2))
    grad = q.grad
    with pytest.raises(RuntimeError, match="non-finite"):
        meprop_triton.clip_grad_norm_([q], max_norm=1.0, error_if_nonfinite=True)
    assert q.grad is grad and not q.grad.is_coalesced()
    total = meprop_triton.clip_grad_norm_([q], max_norm=1.0)  # allowed: coalesced and scaled
    assert q.grad.is_coalesced() and math.isinf(total)


def test_clip_grad_norm_takes_numpy_and_tensor_max_norms():
    for max_norm in (np.float32(0.5), torch.tensor(0.5), 0):
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([3.0, -4.0, 0.0])
        meprop_triton.clip_grad_norm_([p], max_norm=max_norm)
        torch.testing.assert_close(p.grad.norm(), torch.tensor(float(max_norm)), atol=1e-5, rtol=1e-5)


def test_clip_grad_norm_takes_norm_type_as_torch_does():
    for norm_type in ("inf", float("inf"), torch.tensor(2.0), 1):
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([3.0, -4.0, 0.0])
        q = nn.Parameter(torch.zeros(3))
        q.grad = p.grad.clone()
        total = meprop_triton.clip_grad_norm_([p], max_norm=1.0, norm_type=norm_type)
        want = torch.nn.utils.clip_grad_norm_([q], max_norm=1.0, norm_type=norm_type)
        torch.testing.assert_close(total, want)
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match=r"norm_type must be a real number or 'inf'; got 'two'"):
        meprop_triton.clip_grad_norm_([p], max_norm=1.0, norm_type="two")
