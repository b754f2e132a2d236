"""Capturing a meProp model for inference: ``torch.jit.trace`` and ``torch.export`` record
the ordinary forward (``F.linear``, torch's LSTM op), so the captured module passes
trace's own check, saves, loads and gives the eager model's outputs; the eager model
goes on training with meProp afterwards."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from meprop_triton import MePropConv1D, MePropLinear, MePropLSTM, convert, meprop_linear


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(9, 6))
        self.bias = nn.Parameter(torch.randn(9))

    def forward(self, x):
        return meprop_linear(x, self.weight, self.bias, k=2)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = MePropLSTM(6, 7, k=2, num_layers=2, bidirectional=True)
        self.out = MePropLinear(14, 5, k=2)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def _models():
    torch.manual_seed(0)
    mlp = convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), k=2)
    return {
        "mlp": (mlp, torch.randn(4, 6)),
        "conv1d": (MePropConv1D(9, 6, k=2), torch.randn(2, 3, 6)),
        "functional": (_Functional(), torch.randn(4, 6)),
        "lstm": (_Tagger(), torch.randn(5, 3, 6)),
    }


NAMES = ["mlp", "conv1d", "functional", "lstm"]


def _inference(model, x):
    """The eager model's inference output (the LSTM's training forward, which keeps its
    gates, rounds differently from torch's LSTM op)."""
    with torch.no_grad():
        return model(x)


def _check_meprop_still_trains(model, x):
    """After the capture the eager model's backward is meProp's: some weight gradient
    rows are exactly zero (k = 2 of at least 3 units kept)."""
    model.zero_grad()
    model(x).pow(2).sum().backward()
    w = next(p for n, p in model.named_parameters() if p.dim() == 2)
    rows = w.grad if not isinstance(model, MePropConv1D) else w.grad.t()
    assert (rows == 0).all(1).any()


# torch.jit is deprecated (FutureWarning on torch 2.15, DeprecationWarning on 2.11)
@pytest.mark.filterwarnings("ignore:`torch.jit", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_records_the_forward(name, tmp_path):
    """It failed trace's own check ("Tracing failed sanity checks"), and with the check
    off the module could not be saved ("Could not export Python function call")."""
    model, x = _models()[name]
    traced = torch.jit.trace(model, (x,))  # grad enabled, parameters requiring grad
    assert "PythonOp" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), _inference(model, x), rtol=0, atol=0)
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x), _inference(model, x), rtol=0, atol=0)
    _check_meprop_still_trains(model, x)


@pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")  # torch.export.load's own
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name", NAMES)
def test_export_saves_loads_and_runs(name, strict):
    """An exported MePropLSTM failed when run ("a view ... is being modified inplace"):
    export recorded the training forward that keeps the gates for the backward."""
    if strict and name == "lstm" and torch.__version__ < "2.15":
        pytest.skip("strict export of MePropLSTM needs torch >= 2.15 (README)")
    model, x = _models()[name]
    ep = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(ep.module()(x), _inference(model, x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.export.load(buf).module()(x), _inference(model, x), rtol=0, atol=0)
    _check_meprop_still_trains(model, x)
