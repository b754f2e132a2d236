"""MePropLSTM(sparse_grad=True): row-sparse weight gradients (the kept rows) and sparse
bias gradients (every row), equal to the dense-gradient mode's; optimizers that take
sparse gradients then move only the kept rows of the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_sequence

from meprop_triton import MePropLSTM, convert, meprop_settings

I, H = 5, 7


def _pair(k, *, layers=1, bidirectional=False, batch_first=False, unified=True, dtype=torch.double):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, layers, bidirectional=bidirectional, batch_first=batch_first).to(dtype)
    dense = MePropLSTM.from_lstm(ref, k=k, unified=unified)
    sparse = MePropLSTM.from_lstm(ref, k=k, unified=unified, sparse_grad=True)
    return dense, sparse


def _grads(model, x, g):
    out, _ = model(x)
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return torch.autograd.grad((out * g).sum(), [x, *model.parameters()])


def _inputs(T, B, dtype, batch_first, dirs, packed, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if packed:  # ragged: lengths T, T - 2, ..., at least 1
        seqs = [torch.randn(max(T - 2 * b, 1), I, generator=gen, dtype=dtype) for b in range(B)]
        x = pack_sequence(seqs, enforce_sorted=False)
        x = nn.utils.rnn.PackedSequence(x.data.requires_grad_(), x.batch_sizes, x.sorted_indices,
                                        x.unsorted_indices)
        g = torch.randn(x.data.shape[0], dirs * H, generator=gen, dtype=dtype)
        return x, x.data, g
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn((*shape[:2], dirs * H), generator=gen, dtype=dtype)
    return x, x, g


CASES = [
    dict(layers=1, bidirectional=False),
    dict(layers=2, bidirectional=True),
    dict(layers=1, bidirectional=False, batch_first=True),
    dict(layers=1, bidirectional=True, packed=True),
]


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("k", [2, H], ids=["k2", "dense-k"])
@pytest.mark.parametrize("case", CASES, ids=["1-layer", "2-layer-bi", "batch-first", "packed-bi"])
def test_sparse_gradients_equal_the_dense_mode(case, k, unified):
    case = dict(case)
    packed = case.pop("packed", False)
    dense, sparse = _pair(k, unified=unified, **case)
    dirs = 2 if case.get("bidirectional") else 1
    x, x_leaf, g = _inputs(6, 3, torch.double, case.get("batch_first", False), dirs, packed)
    want = torch.autograd.grad(((dense(x)[0].data if packed else dense(x)[0]) * g).sum(),
                               [x_leaf, *dense.parameters()])
    got = torch.autograd.grad(((sparse(x)[0].data if packed else sparse(x)[0]) * g).sum(),
                              [x_leaf, *sparse.parameters()])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)  # dx: dense in both modes
    for (name, _), w, s in zip(sparse.named_parameters(), want[1:], got[1:]):
        assert s.is_sparse and s.is_coalesced() and s.shape == w.shape, name
        torch.testing.assert_close(s.to_dense(), w, rtol=1e-12, atol=1e-12, msg=name)
        rows = s.indices()[0]
        if name.startswith("bias") or k >= H:  # exact bias, or every unit kept: every row
            assert torch.equal(rows, torch.arange(4 * H)), name
        else:  # the kept rows: every row where the dense mode's gradient is non-zero, and
            # rows kept with a zero gradient (the forget gate at step 0 from c0 = 0)
            nonzero = w.abs().sum(1).nonzero().squeeze(1)
            assert set(nonzero.tolist()) <= set(rows.tolist()), name
            if unified and not packed:  # 6 steps x 2 units: not every row of every gate (seeded)
                assert rows.numel() < 4 * H, name


@pytest.mark.parametrize(
    "opt_cls,kw",
    [(torch.optim.SGD, dict(lr=0.1)), (torch.optim.Adagrad, dict(lr=0.1)), (torch.optim.SparseAdam, dict(lr=0.1))],
    ids=["sgd", "adagrad", "sparse-adam"],
)
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_optimizers_move_only_the_kept_rows(opt_cls, kw):
    torch.manual_seed(0)
    lstm = MePropLSTM(I, H, k=1, sparse_grad=True)
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    opt = opt_cls(lstm.parameters(), **kw)
    x = torch.randn(3, 1, I)  # 3 steps x 4 gates x 1 unit: at most 12 of the 28 rows
    out, _ = lstm(x)
    out.pow(2).sum().backward()
    kept = lstm.weight_hh_l0.grad.coalesce().indices()[0]
    assert 0 < kept.numel() <= 12
    opt.step()
    for n, p in lstm.named_parameters():
        moved = (p.detach() != before[n]).reshape(4 * H, -1).any(1).nonzero().squeeze(1)
        if n.startswith("bias"):
            assert moved.numel() > 4 * H // 2, n  # exact bias gradient: (almost) every row moves
        else:
            assert set(moved.tolist()) <= set(kept.tolist()) and moved.numel() > 0, n


def test_setting_is_checked_shown_and_carried():
    lstm = MePropLSTM(I, H, k=2)
    assert lstm.sparse_grad is False
    with pytest.raises(TypeError, match="sparse_grad"):
        lstm.sparse_grad = "yes"
    assert lstm.sparse_grad is False
    with pytest.raises(TypeError, match="sparse_grad"):
        MePropLSTM(I, H, k=2, sparse_grad=1)
    lstm.sparse_grad = True
    assert "sparse_grad=True" in repr(lstm)
    assert MePropLSTM.from_lstm(nn.LSTM(I, H), k=2, sparse_grad=True).sparse_grad is True
    model = nn.Sequential(nn.Linear(I, I), nn.LSTM(I, H))
    convert(model, k=2, lstm=True, sparse_grad=True)
    assert model[1].sparse_grad is True and model[0].sparse_grad is True
    assert meprop_settings(model)["1"]["sparse_grad"] is True


def test_refused_under_ddp_before_any_work(monkeypatch):
    lstm = MePropLSTM(I, H, k=2, sparse_grad=True)

    class _FakeDDP:  # what DDP's forward exposes: the module's parameters it reduces
        _module_parameters = list(lstm.parameters())

    monkeypatch.setattr(DistributedDataParallel, "_active_ddp_module", _FakeDDP(), raising=False)
    x = torch.randn(3, 2, I, requires_grad=True)
    with pytest.raises(RuntimeError, match="sparse_grad=False"):
        lstm(x)
    assert x.grad is None and all(p.grad is None for p in lstm.parameters())
    lstm.sparse_grad = False
    out, _ = lstm(x)  # the same layer runs with dense gradients
    out.sum().backward()
    assert not lstm.weight_hh_l0.grad.is_sparse
