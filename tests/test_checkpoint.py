"""Activation checkpointing (``torch.utils.checkpoint``, which transformers'
``gradient_checkpointing_enable`` uses): the recomputed forward records the same meProp
backward, so the gradients are the ones without checkpointing, bit for bit (fp64).

With ``use_reentrant=True`` the first forward runs under ``no_grad`` (``F.linear``; for the
LSTM torch's fused op) and the recompute under grad (the meProp Function; for the LSTM
the step-by-step forward that keeps its gates, which rounds differently)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from meprop_triton import MePropLSTM, convert


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.b2 = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.out = nn.Linear(32, 5)
        self.reentrant = None  # None: no checkpointing

    def forward(self, x):
        if self.reentrant is None:
            return self.out(self.b2(self.b1(x)))
        h = checkpoint(self.b1, x, use_reentrant=self.reentrant)
        h = checkpoint(self.b2, h, use_reentrant=self.reentrant)
        return self.out(h)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = MePropLSTM(6, 9, k=2, bidirectional=True)
        self.reentrant = None

    def _rnn(self, x):
        return self.rnn(x)[0]

    def forward(self, x):
        if self.reentrant is None:
            return self._rnn(x)
        return checkpoint(self._rnn, x, use_reentrant=self.reentrant)


def _grads(base, x, reentrant, seed=5):
    model = copy.deepcopy(base)
    model.reentrant = reentrant
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # random-k draws in the backward
    model(x).pow(2).sum().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "options", [dict(), dict(unified=False), dict(selection="random")], ids=["unified", "per-example", "random"]
)
def test_checkpointed_linear_blocks_give_the_same_gradients(options, reentrant):
    torch.manual_seed(0)
    base = convert(_Net().double(), k=4, **options)
    x = torch.randn(16, 12, dtype=torch.double)
    plain = _grads(base, x, None)
    assert any((g == 0).all(1).any() for g in plain[1:] if g.dim() == 2)  # meProp's zero rows
    for a, b in zip(plain, _grads(base, x, reentrant)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_lstm_gives_the_same_gradients(reentrant):
    torch.manual_seed(0)
    base = _Tagger().double()
    x = torch.randn(5, 3, 6, dtype=torch.double)
    plain = _grads(base, x, None)
    for a, b in zip(plain, _grads(base, x, reentrant)):
        if reentrant:  # the first forward was torch's fused op: equal up to rounding
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        else:
            assert torch.equal(a, b)
