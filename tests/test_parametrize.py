"""``convert`` on parametrized ``nn.Linear`` layers (``torch.nn.utils.parametrize``:
``weight_norm``, ``spectral_norm``, a parametrization of one's own): the layer becomes a
``MePropLinear`` that keeps the same parametrization modules, original parameters and
state, and the meProp gradient of the computed weight flows back through them. These
layers were left dense before ("a subclass of nn.Linear")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from meprop_triton import MePropLinear, Simplifier, apply_settings, convert, meprop_settings, reference


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w + 0.1


def _scale(layer):
    parametrize.register_parametrization(layer, "weight", _Scale())
    return layer


def _bias_only(layer):
    parametrize.register_parametrization(layer, "bias", _Scale())
    return layer


KINDS = {"weight_norm": weight_norm, "spectral_norm": spectral_norm, "own": _scale, "bias-only": _bias_only}


def _model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    KINDS[kind](model[0])
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_converted_layer_keeps_its_parametrization_and_state(kind):
    model = _model(kind)
    dense = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters())
    _, report = convert(model, k=3, exclude=["2"], report=True)
    layer = model[0]
    assert isinstance(layer, MePropLinear) and parametrize.is_parametrized(layer, "bias" if kind == "bias-only" else "weight")
    assert report.converted == {"0": "ParametrizedLinear"}  # torch's class for a parametrized nn.Linear
    # the same Parameter objects under the same names: the optimizer and checkpoints keep working
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params_before.items()}
    assert all(any(p is q for q in model.parameters()) for g in opt.param_groups for p in g["params"])
    assert model.state_dict().keys() == dense.state_dict().keys()
    x = torch.randn(5, 6, dtype=torch.double)
    for _ in range(2):  # spectral_norm's power iteration advances its state at each training forward
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    assert meprop_settings(model)["0"]["type"] == "MePropLinear"


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_meprop_of_the_computed_weight_chained_through_the_parametrization(kind, unified):
    model = convert(_model(kind), k=3, unified=unified, exclude=["2"])
    layer = model[0]
    layer.eval()  # spectral_norm: no power-iteration step, so the computed weight stays put
    x = torch.randn(5, 6, dtype=torch.double)
    g = torch.randn(5, 12, dtype=torch.double)
    (layer(x) * g).sum().backward()
    with torch.no_grad():
        w = layer.weight.clone()
    # the definition: meProp's gradient of the computed weight (fp64 reference) ...
    k_idx = reference.unified_topk_indices(g, 3) if unified else reference.per_example_topk_indices(g, 3)
    if unified:
        _, grad_w, _ = reference.unified_backward(g, x, w, k_idx)
    else:
        _, grad_w, _ = reference.per_example_backward(g, x, w, k_idx)
    assert (grad_w == 0).all(1).any()
    # ... back through the parametrization to its original parameters
    for name, grad_t in (("weight", grad_w), ("bias", g.sum(0))):
        if parametrize.is_parametrized(layer, name):
            originals = list(layer.parametrizations[name].parameters())
            with torch.enable_grad():
                expected = torch.autograd.grad(getattr(layer, name), originals, grad_t)
        else:
            originals, expected = [getattr(layer, name)], [grad_t]
        for p, e in zip(originals, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-13)


def test_settings_round_trip_through_a_dense_parametrized_model():
    model = convert(_model("weight_norm"), k=3, exclude=["2"])
    settings = meprop_settings(model)
    fresh = _model("weight_norm")
    fresh.load_state_dict(model.state_dict())
    apply_settings(fresh, settings)
    assert isinstance(fresh[0], MePropLinear) and meprop_settings(fresh) == settings


def test_sparse_grad_and_meSimp_are_refused_by_name():
    model = _model("weight_norm")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"sparse_grad=True cannot run on a parametrized layer \(torch.nn.utils.parametrize\)"):
        convert(model, k=3, sparse_grad=True, exclude=["2"])
    assert type(model[0]).__name__ == "ParametrizedLinear"  # nothing changed
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())
    convert(model, k=3, exclude=["2"])
    model[0].sparse_grad = True
    with pytest.raises(ValueError, match=r"sparse_grad=True cannot run on a parametrized layer \(torch.nn.utils.parametrize\)"):
        model(torch.randn(2, 6, dtype=torch.double))
    model[0].sparse_grad = False
    with pytest.raises(TypeError, match="its weight is computed by a parametrization"):
        Simplifier(model)


def test_parametrized_lstm_and_conv1d_stay_dense_with_the_reason():
    """Only a parametrized nn.Linear is converted; a parametrized LSTM (convert(...,
    lstm=True) raised from deep inside the swap) or Conv1D (left out of the report
    without a word) stays dense, and the report says why."""
    from test_conv1d import Conv1D

    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(5, 7), "proj": Conv1D(8, 7), "head": nn.Linear(8, 3)})
    weight_norm(model["rnn"], "weight_hh_l0")
    parametrize.register_parametrization(model["proj"], "weight", _Scale())
    _, report = convert(model, k=2, lstm=True, report=True)
    assert report.converted == {"head": "Linear"}
    for name, kind in (("rnn", "LSTM"), ("proj", "Conv1D")):
        assert report.left_dense[name] == (
            f"a parametrized {kind} (torch.nn.utils.parametrize); only a parametrized nn.Linear is converted"
        )
        assert parametrize.is_parametrized(model[name])


class _Counting(nn.Module):
    calls = 0

    def forward(self, w):
        _Counting.calls += 1
        return w


def test_the_parametrization_runs_once_per_forward_under_autocast():
    """Under autocast (and every other route to the full checks) the layer read its
    parametrized weight three times: three times the cost, and spectral_norm's power
    iteration advanced three steps a forward, so the outputs left the dense layer's."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 12)
    parametrize.register_parametrization(layer, "weight", _Counting())
    converted = convert(nn.Sequential(copy.deepcopy(layer)), k=3)[0]
    x = torch.randn(5, 6)
    for model in (layer, converted):
        _Counting.calls = 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        assert _Counting.calls == 1

    dense = nn.Sequential(spectral_norm(nn.Linear(6, 12)))
    model = convert(copy.deepcopy(dense), k=3)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


def test_a_parametrized_layer_tied_through_its_original_stays_dense():
    """A head whose parametrization's original is the embedding's weight (no
    right_inverse: the original is the Parameter itself) is tied like an unparametrized
    one; it was converted without a word."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6)
            self.head = nn.Linear(6, 12, bias=False)
            self.head.weight = self.emb.weight
            parametrize.register_parametrization(self.head, "weight", _Scale())

    model = LM()
    with pytest.warns(UserWarning, match="convert changed nothing"):
        _, report = convert(model, k=3, report=True)
    assert report.left_dense == {"head": "tied: its weight's original is emb.weight too; pass tied='convert' to convert it anyway"}
    _, report = convert(model, k=3, tied="convert", report=True)
    assert list(report.converted) == ["head"]
